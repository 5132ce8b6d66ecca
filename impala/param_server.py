"""Serving parameters: an actor asks with the version it has and gets the newest
snapshot, or 'params_unchanged'; once the run is over, 'finished'.

Threads: the learner's 'publisher' thread (impala/transfer.py) calls `publish`
with each new snapshot, the training thread once at the start; the 'params'
server thread calls `handle`. They share one attribute, `_snapshot`, a tuple that
`publish` replaces whole (a single assignment under the GIL), so the serving
thread always reads a complete version, and a snapshot's frames are never changed
after they are made (frames still being sent stay valid).
At the end of the run the training thread calls `finish` (one bool) and reads
`has_told`; the serving thread fills the set of tasks told.
"""

from __future__ import annotations

from typing import Mapping

import torch
import zmq

from impala import wire


class ParamServer:
    def __init__(self, run_id: str):
        self.run_id = run_id  # tells actors that parameter versions restarted
        self._snapshot: tuple[int, list] = (0, [])
        self._finished = False  # set once by the training thread (`finish`)
        self._told: set[int] = set()  # tasks answered 'finished' (filled only after `finish`)

    @property
    def version(self) -> int:
        return self._snapshot[0]

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

    def reply(self, message: wire.Message) -> list:
        """The frames answering a 'get_params' message; wire.WireError if it is malformed."""
        have, run = message.meta.get("version"), message.meta.get("run")
        if not isinstance(have, int) or isinstance(have, bool):
            raise wire.WireError("get_params without an integer 'version'")
        version, frames = self._snapshot
        if self._finished:
            self._told.add(message.task)
            return wire.encode("finished", param_version=version, meta={"run": self.run_id})
        # A different run id means the asker's version belongs to an earlier learner
        # (restarted from a checkpoint): it must take ours even if its number is higher.
        if version > have or run != self.run_id:
            return frames
        return wire.encode("params_unchanged", param_version=version, meta={"run": self.run_id})

    def handle(self, socket: zmq.Socket) -> None:
        """Answers one request on the parameter socket."""
        identity, message = wire.recv_routed(socket, allowed_kinds=("get_params",))
        socket.send_multipart([identity, *self.reply(message)], copy=False)
