"""The learner's traffic between the host and its device, kept off the training
thread's critical path (issue 13: a GPU learner that never waits).

  - `BatchFeed` hands the training thread its batches on the device. On a GPU the
    next batch's copy (pinned host memory -> device, non_blocking, on a copy stream)
    starts before the current update runs, so the two overlap. On the CPU the
    received tensors are used as they are (no copy), and no batch is taken from the
    queue early (the bounded queue keeps its meaning, and the policy lag with it).
  - `SnapshotPublisher` makes the parameter snapshots that actors fetch. The
    training thread only copies the parameters into buffers of the publisher's (on
    a GPU a device-side copy queued behind the update: it never waits for the
    device); the 'publisher' thread waits for them to reach the host, encodes the
    message and hands it to the ParamServer.

Threads: a BatchFeed belongs to the training thread. SnapshotPublisher: the
training thread calls `offer`; the snapshot buffers belong to the 'publisher'
thread from a successful `offer` until it has published them (`idle` set again),
and to the training thread otherwise. A failure of the publisher thread is kept in
`error` for the training thread to stop the run (as the learner's server threads).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping

import torch
from absl import logging

Batch = dict[str, torch.Tensor]  # [T+1, B, ...] tensors (core states [B, ...]), see impala/unroll.py


class BatchFeed:
    """Batches on `device` from `next_batch` (host batches, pinned for a GPU), each
    given back through `release` once the update that used it is over."""

    def __init__(
        self, next_batch: Callable[[float], Batch | None], release: Callable[[Batch], None], device: torch.device
    ):
        # `source` is public so that a caller may wrap it (scripts/load.py checks every batch).
        self.source, self._release, self.device = next_batch, release, device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[Batch, Batch, torch.cuda.Event | None] | None = None  # copy under way
        self._used: tuple[Batch, torch.cuda.Event | None] | None = None  # host side of the last batch

    def next(self, timeout: float) -> Batch | None:
        """The next batch on the device, or None after `timeout` seconds. The batch
        handed out before is given back now: the caller must be done with it."""
        self._give_back_used()
        ahead = self._ahead if self._ahead is not None else self._start(self.source(timeout))
        self._ahead = None
        if ahead is None:
            return None
        host, batch, copied = ahead
        if copied is not None:  # the update's stream waits for the copy; the host does not
            torch.cuda.current_stream(self.device).wait_event(copied)
        self._used = (host, copied)
        if self._stream is not None:  # start the next batch's copy, to overlap this update
            self._ahead = self._start(self.source(0.0))
        return batch

    def _start(self, host: Batch | None) -> tuple[Batch, Batch, torch.cuda.Event | None] | None:
        if host is None:
            return None
        if self._stream is None:  # on the CPU .to() returns the tensors themselves
            return host, {name: t.to(self.device) for name, t in host.items()}, None
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            batch = {name: t.to(self.device, non_blocking=True) for name, t in host.items()}
            copied = torch.cuda.Event()
            copied.record(self._stream)
        for t in batch.values():  # made on the copy stream, used (and freed) on the update's
            t.record_stream(consumer)
        return host, batch, copied

    def _give_back_used(self) -> None:
        if self._used is not None:
            host, copied = self._used
            if copied is not None:  # the host memory is read until the copy has ended
                copied.synchronize()
            self._used = None
            self._release(host)


class SnapshotPublisher(threading.Thread):
    """Publishes snapshots of `state` (the agent's state_dict: tensors that share
    the parameters' memory) through `publish(arrays, version)` on its own thread."""

    def __init__(
        self,
        state: Mapping[str, torch.Tensor],
        publish: Callable[[Mapping[str, torch.Tensor], int], None],
        stop: threading.Event,
        device: torch.device,
    ):
        super().__init__(name="publisher", daemon=True)
        self._live, self._publish, self.stop, self.device = dict(state), publish, stop, device
        cuda = device.type == "cuda"
        self._host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for name, t in self._live.items()}
        # On a GPU the parameters are first copied on the device, behind the update:
        # the next update may change them while the host copy is still under way.
        self._on_device = {name: torch.empty_like(t) for name, t in self._live.items()} if cuda else None
        self._stream = torch.cuda.Stream(device) if cuda else None
        self._handoff: queue.Queue = queue.Queue(maxsize=1)
        self.idle = threading.Event()
        self.idle.set()
        self.error: BaseException | None = None

    @torch.no_grad()
    def offer(self, version: int) -> bool:
        """Snapshots the parameters as `version` (training thread), unless the
        previous snapshot is still being published: then False, and the caller
        offers again later (the newest version is the one that matters)."""
        if not self.idle.is_set():
            return False
        self.idle.clear()
        copied = None
        if self._stream is None:
            for name, t in self._live.items():
                self._host[name].copy_(t)
        else:
            for name, t in self._live.items():
                self._on_device[name].copy_(t)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for name, t in self._on_device.items():
                    self._host[name].copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._stream)
        self._handoff.put_nowait((version, copied))
        return True

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    version, copied = self._handoff.get(timeout=0.1)
                except queue.Empty:
                    continue
                if copied is not None:
                    copied.synchronize()
                self._publish(self._host, version)
                self.idle.set()
        except BaseException as e:  # noqa: BLE001 -- every failure must end the run, loudly
            if not self.stop.is_set():
                self.error = e
                logging.error("The learner's publisher thread failed: %s: %s", type(e).__name__, e)
