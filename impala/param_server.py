"""Serving parameters: an actor asks with the version it has and gets the newest
snapshot, or 'params_unchanged'; once the run is over, 'finished'.

Threads: the learner's 'publisher' thread (impala/transfer.py) calls `publish`
with each new snapshot, the training thread once at the start; the 'params'
server thread calls `handle`. They share one attribute, `_snapshot`, a tuple that
`publish` replaces whole (a single assignment under the GIL), so the serving
thread always reads a complete version, and a snapshot's frames are never changed
after they are made (frames still being sent stay valid). `_last_sent` belongs to
the 'params' thread alone.

Fair service: a peer is sent full parameters at most once per `min_interval_s`
(asked again sooner, it gets the small 'params_unchanged'), so one peer asking
back-to-back cannot keep the thread, the network or the snapshots' memory busy; and
the learner's socket queues at most learner.PARAMS_SNDHWM replies per peer (ZeroMQ
drops more for a peer that does not read, without blocking the others).
At the end of the run the training thread calls `finish` (one bool) and reads
`has_told`; the serving thread fills the set of tasks told.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping

import torch
import zmq

from impala import wire

MAX_PEERS_REMEMBERED = 4096  # connections whose last full reply time is kept (oldest forgotten first)


class ParamServer:
    def __init__(self, run_id: str, min_interval_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.run_id = run_id  # tells actors that parameter versions restarted
        self.min_interval_s, self.clock = min_interval_s, clock
        self._snapshot: tuple[int, list] = (0, [])
        self._finished = False  # set once by the training thread (`finish`)
        self._told: set[int] = set()  # tasks answered 'finished' (filled only after `finish`)
        self._last_sent: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    @property
    def version(self) -> int:
        return self._snapshot[0]

    def snapshot(self) -> tuple[int, list]:
        """The newest (version, message frames) published."""
        return self._snapshot

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Snapshots `state_dict` as `version`. The values are copied once, into the
        message (wire.encode): CPU tensors are read in place, so they may change
        afterwards but not during the call; others are first brought to the CPU."""
        arrays = {name: t.detach().cpu().numpy() for name, t in state_dict.items()}
        frames = wire.encode("params", arrays, param_version=version, meta={"run": self.run_id})
        self._snapshot = (version, frames)

    def finish(self) -> None:
        """The run is over: from now on every request is answered 'finished'."""
        self._finished = True

    def has_told(self, tasks: set[int]) -> bool:
        """Whether every one of `tasks` has been answered 'finished'."""
        return tasks <= self._told  # one C call under the GIL: safe while the serving thread adds

    def reply(self, message: wire.Message, identity: bytes = b"") -> list:
        """The frames answering a 'get_params' message from connection `identity`;
        wire.WireError if it is malformed."""
        have, run = message.meta.get("version"), message.meta.get("run")
        if not isinstance(have, int) or isinstance(have, bool):
            raise wire.WireError("get_params without an integer 'version'")
        version, frames = self._snapshot
        if self._finished:
            self._told.add(message.task)
            return wire.encode("finished", param_version=version, meta={"run": self.run_id})
        # A different run id means the asker's version belongs to an earlier learner
        # (restarted from a checkpoint): it must take ours even if its number is higher.
        if (version > have or run != self.run_id) and self._may_send(identity):
            return frames
        return wire.encode("params_unchanged", param_version=version, meta={"run": self.run_id})

    def _may_send(self, identity: bytes) -> bool:
        """True (and remembered) unless `identity` was sent parameters within min_interval_s."""
        now = self.clock()
        last = self._last_sent.get(identity)
        if last is not None and now - last < self.min_interval_s:
            return False
        self._last_sent[identity] = now
        self._last_sent.move_to_end(identity)
        if len(self._last_sent) > MAX_PEERS_REMEMBERED:
            self._last_sent.popitem(last=False)
        return True

    def handle(self, socket: zmq.Socket, identity: bytes, message: wire.Message) -> None:
        """Answers one decoded request from `identity` on the parameter socket (the
        'params' thread). Never blocks: a ROUTER drops a reply to a peer whose queue
        is full (learner.PARAMS_SNDHWM)."""
        socket.send_multipart([identity, *self.reply(message, identity)], flags=zmq.NOBLOCK, copy=False)
