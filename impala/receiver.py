"""Receiving unrolls: decode, validate, book what each actor sends, assemble batches.

Three parts, each built and tested alone (none needs a socket):
  - `BatchAssembler` gathers unrolls of any number of envs into batches of exactly
    `batch_size` envs;
  - `ActorBook` keeps what the learner knows of its actors: unroll counts, policy
    lags, finished episodes, actions taken, bad messages, and liveness. Liveness is
    decided here, where unrolls arrive: an actor is back when an unroll comes from it
    after silence or over a new connection (a restarted process), and gone after
    ACTOR_SILENT_S without one;
  - `UnrollReceiver` handles one message of the unroll socket with them and puts
    finished batches, as tensors, into a bounded queue (back-pressure: a full queue
    stops reads, and the actors' sends then block).

Threads: the 'unrolls' server thread calls `UnrollReceiver.handle` and alone owns
the assembler; `ActorBook` is written by that thread and read by the training
thread (`take_report`, `bad_message`), always under the book's own lock; the batch
queue is the only other thing the two threads share.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
import zmq
from absl import logging

from impala import unroll, wire
from impala.metrics import Stopwatch

ACTOR_SILENT_S = 30.0  # an actor not heard from this long is reported gone
# Parts of an actor's time it reports with its unrolls (meta 'seconds'); others are ignored.
ACTOR_TIMES = ("env", "inference", "act", "send", "params")
MAX_LEVEL_NAME = 200  # longer level names from an actor are replaced by the configured one


class BatchBuffers:
    """Reused memory for batches: sets of tensors of one batch's shapes, pinned when
    the learner copies to a GPU (so that copies can be non_blocking). A set goes out
    with a batch (`take`, the 'unrolls' thread) and comes back through `give_back`
    (the training thread) once its batch has been used. When none is free a new set
    is made, so a consumer that never gives sets back only loses the reuse; at most
    `keep` free sets are kept."""

    def __init__(self, spec: Mapping, batch_size: int, pin_memory: bool = False, keep: int = 4):
        self.shapes = {name: ((shape[0], batch_size, *shape[1:]) if time_major else (batch_size, *shape), dtype)
                       for name, (dtype, shape, time_major) in spec.items()}
        self.pin_memory, self.keep = pin_memory, keep
        self._free: queue.Queue = queue.Queue(maxsize=keep)
        self.made = 0  # sets allocated so far

    def take(self) -> dict[str, torch.Tensor]:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            self.made += 1
            return {name: torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=self.pin_memory)
                    for name, (shape, dtype) in self.shapes.items()}

    def give_back(self, tensors: dict[str, torch.Tensor]) -> None:
        """Returns a set taken earlier; its batch must not be used afterwards."""
        try:
            self._free.put_nowait(tensors)
        except queue.Full:
            pass


def _torch_dtype(dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


class Batch(dict):
    """An assembled batch: its arrays by name (numpy views of `tensors`), and the
    tensors that hold them (from BatchBuffers, pinned when asked)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__((name, t.numpy()) for name, t in tensors.items())
        self.tensors = tensors


class BatchAssembler:
    """Gathers unrolls of any number of envs into batches of exactly `batch_size`
    envs, time-major [T+1, B, ...] (states [B, ...]). Leftover envs wait for the
    next batch, so nothing received is dropped. Each batch is written once, straight
    into a set of `buffers` (by default a pool of its own, unpinned)."""

    def __init__(self, spec: Mapping, batch_size: int, buffers: BatchBuffers | None = None):
        self.spec = spec
        self.batch_size = batch_size
        self.buffers = buffers or BatchBuffers(spec, batch_size)
        self._pending: list[unroll.Unroll] = []
        self._pending_envs = 0

    def add(self, arrays: unroll.Unroll) -> list[Batch]:
        """Adds a validated unroll; returns the batches that are now complete."""
        self._pending.append(arrays)
        self._pending_envs += arrays["reward"].shape[1]
        batches = []
        while self._pending_envs >= self.batch_size:
            batches.append(self._take(self.batch_size))
        return batches

    def _take(self, count: int) -> Batch:
        parts, taken = [], 0
        while taken < count:
            arrays = self._pending[0]
            n = arrays["reward"].shape[1]
            use = min(n, count - taken)
            if use == n:
                parts.append(self._pending.pop(0))
            else:
                parts.append(self._slice(arrays, 0, use))
                self._pending[0] = self._slice(arrays, use, n)
            taken += use
        self._pending_envs -= count
        batch = Batch(self.buffers.take())
        for name, (_, _, time_major) in self.spec.items():
            np.concatenate([p[name] for p in parts], axis=1 if time_major else 0, out=batch[name])
        return batch

    def _slice(self, arrays: unroll.Unroll, start: int, stop: int) -> unroll.Unroll:
        return {
            name: (arrays[name][:, start:stop] if time_major else arrays[name][start:stop])
            for name, (_, _, time_major) in self.spec.items()
        }


class Episode(NamedTuple):
    level: str
    episode_return: float
    frames: int  # environment frames (agent steps x --num_action_repeats), as the original logs them


@dataclass
class ActorStats:
    peer: bytes  # the connection its unrolls come over; a new one means a new process
    unrolls: int = 0
    envs: int = 0
    last_seen: float = 0.0
    unrolls_reported: int = 0  # unrolls at the previous report, for rates
    silent: bool = False


@dataclass
class Report:
    """What arrived since the previous report (ActorBook.take_report)."""

    elapsed: float  # seconds since the previous report
    unroll_rates: dict[int, float]  # live actor -> unrolls/s
    lags: list[int]  # policy lag of each unroll, in parameter versions
    episodes: list[Episode]
    action_counts: np.ndarray  # [num_actions] actions taken in the unrolls
    bad_messages: int  # since the start


@dataclass
class ActorBook:
    """What the learner knows of its actors; thread-safe (see the module docstring)."""

    num_actions: int
    num_action_repeats: int
    clock: Callable[[], float] = time.monotonic
    _actors: dict[int, ActorStats] = field(default_factory=dict)
    _lags: list[int] = field(default_factory=list)
    _episodes: list[Episode] = field(default_factory=list)
    _bad_messages: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._actions = np.zeros(self.num_actions, np.int64)
        self._last_report = self.clock()

    def record(self, task: int, peer: bytes, level: str, arrays: unroll.Unroll, lag: int | None) -> None:
        """Books a validated unroll of actor `task` that came over connection `peer`;
        `lag` is None when its parameter version is from an earlier learner."""
        done = arrays["done"][1:]  # step 0 repeats the previous unroll's last step
        episodes = [Episode(level, float(r), int(n) * self.num_action_repeats)
                    for r, n in zip(arrays["episode_return"][1:][done], arrays["episode_step"][1:][done])]
        actions = np.bincount(arrays["action"][1:].ravel(), minlength=self.num_actions)
        with self._lock:
            actor = self._actors.get(task)
            if actor is None:
                logging.info("Actor %d connected (level %s).", task, level)
                actor = self._actors[task] = ActorStats(peer)
            elif actor.silent or actor.peer != peer:
                logging.info("Actor %d is back (level %s%s).", task, level,
                             "" if actor.peer == peer else "; a new connection, so probably a restarted actor")
                actor.silent, actor.peer = False, peer
            actor.unrolls += 1
            actor.envs += arrays["reward"].shape[1]
            actor.last_seen = self.clock()
            if lag is not None:
                self._lags.append(lag)
            self._episodes.extend(episodes)
            self._actions += actions

    def bad_message(self) -> int:
        """Counts a dropped message; returns the count so far."""
        with self._lock:
            self._bad_messages += 1
            return self._bad_messages

    def known(self, task: int) -> bool:
        with self._lock:
            return task in self._actors

    def take_report(self) -> Report:
        """What arrived since the previous report; actors silent for ACTOR_SILENT_S are
        marked gone (and said so) and left out of the rates."""
        with self._lock:
            now = self.clock()
            elapsed = max(now - self._last_report, 1e-9)
            rates = {}
            for task, actor in sorted(self._actors.items()):
                if actor.silent:
                    continue
                if now - actor.last_seen > ACTOR_SILENT_S:
                    actor.silent = True
                    logging.warning("Actor %d silent for %.0fs; counted as gone.", task, now - actor.last_seen)
                    continue
                rates[task] = (actor.unrolls - actor.unrolls_reported) / elapsed
                actor.unrolls_reported = actor.unrolls
            report = Report(elapsed, rates, self._lags, self._episodes, self._actions, self._bad_messages)
            self._lags, self._episodes = [], []
            self._actions = np.zeros(self.num_actions, np.int64)
            self._last_report = now
        return report


def check_actions(arrays: unroll.Unroll, num_actions: int) -> None:
    """Refuses actions outside [0, num_actions): they would fail the update."""
    actions = arrays["action"]
    if actions.size and not (0 <= int(actions.min()) and int(actions.max()) < num_actions):
        raise unroll.UnrollError(f"unroll actions outside [0, {num_actions})")


def level_of(meta: Mapping, default: str) -> str:
    level = meta.get("level")
    return level if isinstance(level, str) and len(level) <= MAX_LEVEL_NAME else default


class UnrollReceiver:
    """Handles the unroll socket's messages (in the 'unrolls' thread) and hands
    batches to the training thread through a bounded queue."""

    def __init__(self, spec: Mapping, batch_size: int, num_actions: int, book: ActorBook, watch: Stopwatch,
                 default_level: str, run_id: str, param_version: Callable[[], int], max_queued_batches: int,
                 pin_memory: bool = False):
        self.spec, self.num_actions, self.book, self.watch = spec, num_actions, book, watch
        self.default_level, self.run_id, self.param_version = default_level, run_id, param_version
        # Free sets: one per queue slot, one being assembled, the training thread's
        # current batch and the one it copies ahead to the device.
        self.buffers = BatchBuffers(spec, batch_size, pin_memory=pin_memory, keep=max_queued_batches + 3)
        self.assembler = BatchAssembler(spec, batch_size, self.buffers)
        self.batches: queue.Queue = queue.Queue(maxsize=max_queued_batches)
        self.stop = threading.Event()

    def handle(self, socket: zmq.Socket) -> None:
        """Receives one message; wire.WireError or unroll.UnrollError for a bad one."""
        with self.watch("learner_receive"):
            identity, message = wire.recv_routed(socket, allowed_kinds=("unroll",))
            self.receive(identity, message)

    def receive(self, identity: bytes, message: wire.Message) -> None:
        """Validates and books a decoded unroll, and queues the batches it completes."""
        unroll.validate(message.arrays, self.spec)
        check_actions(message.arrays, self.num_actions)
        # Versions of an earlier learner (another run id) do not compare with ours.
        lag = self.param_version() - message.param_version if message.meta.get("run") == self.run_id else None
        self.book.record(message.task, identity, level_of(message.meta, self.default_level), message.arrays, lag)
        seconds = message.meta.get("seconds")
        if isinstance(seconds, dict):
            for part in ACTOR_TIMES:
                value = seconds.get(part)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e6:
                    self.watch.add(f"actor_{part}", float(value))
        with self.watch("learner_assemble"):
            batches = self.assembler.add(dict(message.arrays))
        for batch in batches:
            self._put(batch)

    def _put(self, batch: Batch) -> None:
        with self.watch("learner_queue_full"):
            while not self.stop.is_set():
                try:
                    self.batches.put(batch.tensors, timeout=0.1)
                    return
                except queue.Full:
                    continue

    def next_batch(self, timeout: float) -> dict[str, torch.Tensor] | None:
        """The next batch on the CPU (training thread), or None after `timeout` seconds.
        Give it back (`release`) once it has been used, so that its memory is reused."""
        try:
            return self.batches.get(timeout=timeout)
        except queue.Empty:
            return None

    def release(self, batch: dict[str, torch.Tensor]) -> None:
        """Takes back a batch of `next_batch` whose contents are no longer needed."""
        self.buffers.give_back(batch)
