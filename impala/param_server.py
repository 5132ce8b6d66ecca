"""Serving parameters: an actor asks with the version it has and gets the newest
snapshot, or 'params_unchanged'.

Threads: the training thread calls `publish` after each update; the 'params'
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
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Mapping

import torch
import zmq

from impala import wire

MAX_PEERS_REMEMBERED = 4096  # connections whose last full reply time is kept (oldest forgotten first)


class ParamServer:
    def __init__(self, run_id: str, min_interval_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.run_id = run_id  # tells actors that parameter versions restarted
        self.min_interval_s, self.clock = min_interval_s, clock
        self._snapshot: tuple[int, list] = (0, [])
        self._last_sent: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    @property
    def version(self) -> int:
        return self._snapshot[0]

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Snapshots `state_dict` as `version` (a fresh copy on the CPU)."""
        arrays = {name: t.detach().to("cpu", copy=True).numpy() for name, t in state_dict.items()}
        frames = wire.encode("params", arrays, param_version=version, meta={"run": self.run_id})
        self._snapshot = (version, frames)

    def reply(self, message: wire.Message, identity: bytes = b"") -> list:
        """The frames answering a 'get_params' message from connection `identity`;
        wire.WireError if it is malformed."""
        have, run = message.meta.get("version"), message.meta.get("run")
        if not isinstance(have, int) or isinstance(have, bool):
            raise wire.WireError("get_params without an integer 'version'")
        version, frames = self._snapshot
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
