"""The actor's side of the parameter protocol (docs/protocol.md, `get_params`):
at most one request in flight, replies applied to the acting agent.

Parameters are fetched without blocking: `refresh()` sends a request at an
unroll boundary and applies the reply at a later one, so neither the actor nor
the learner waits for the other. Only the first parameters are waited for
(`wait_first`).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
import zmq
from absl import logging

from impala import wire
from impala.nets import Agent

PARAMS_RETRY_S = 3.0  # resend a parameter request unanswered this long (e.g. the learner restarted)
WAIT_QUIET_S = 2.0  # waiting for the first parameters this long is a normal start: say nothing
WAIT_LOG_EVERY_S = 30.0  # then say that it still waits this often
_SEND_RETRY_S = 0.1  # a request skipped because no learner is connected yet is tried again this soon


class ParameterClient:
    """Keeps at most one parameter request in flight and applies replies.

    Owned by the actor's main thread (not thread-safe)."""

    def __init__(self, socket: zmq.Socket, agent: Agent, task: int):
        self.socket, self.agent, self.task = socket, agent, task
        self.version = -1
        self.run: str | None = None  # the learner process that numbered `version`
        self._sent_at: float | None = None
        self._names = {k: (tuple(v.shape), v.dtype) for k, v in agent.state_dict().items()}

    def _request(self) -> bool:
        """Sends a request; False if it was skipped (no learner connected)."""
        self._sent_at = time.monotonic()
        try:  # never blocks: with no learner connected (IMMEDIATE) the request is skipped
            wire.send(self.socket, "get_params", task=self.task, flags=zmq.NOBLOCK,
                      meta={"version": self.version, "run": self.run})
        except zmq.Again:
            return False
        return True

    def _receive(self, timeout_ms: int) -> bool:
        """Applies every reply waiting (up to `timeout_ms` for the first); True if
        the parameters changed."""
        changed = False
        while self.socket.poll(timeout_ms):
            timeout_ms = 0
            try:
                message = wire.recv(self.socket, allowed_kinds=("params", "params_unchanged"))
            except wire.WireError as e:
                logging.warning("Actor %d: ignored a bad reply from the learner: %s", self.task, e)
                continue
            self._sent_at = None
            run = message.meta.get("run")
            if message.kind == "params" and (message.param_version > self.version or run != self.run):
                if self.run is not None and run != self.run:
                    logging.info("Actor %d: the learner restarted; taking its parameters v%d.",
                                 self.task, message.param_version)
                changed |= self._load(message)
        return changed

    def _load(self, message: wire.Message) -> bool:
        got = {k: (tuple(v.shape), v.dtype) for k, v in message.arrays.items()}
        if set(got) != set(self._names) or any(got[k][0] != self._names[k][0] for k in got):
            logging.warning("Actor %d: ignored parameters that do not fit this network.", self.task)
            return False
        self.agent.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in message.arrays.items()})
        self.version, self.run = message.param_version, message.meta.get("run")
        return True

    def refresh(self) -> None:
        """Non-blocking: applies a reply that has arrived, keeps one request out."""
        self._receive(0)
        if self._sent_at is None or time.monotonic() - self._sent_at > PARAMS_RETRY_S:
            self._request()

    def wait_first(self, address: str, stop: threading.Event | None = None) -> None:
        """Blocks until the first parameters arrive (or `stop` is set). A request
        goes out as soon as the learner is connected and is resent every
        PARAMS_RETRY_S while unanswered, so an actor started before its learner
        joins at most that late. Quiet for the first WAIT_QUIET_S (a normal start),
        then it says once that it waits, and again every WAIT_LOG_EVERY_S."""
        start = time.monotonic()
        next_log = start + WAIT_QUIET_S
        sent_at = None  # when the latest request actually went out
        while self.version < 0 and not (stop is not None and stop.is_set()):
            if sent_at is None or time.monotonic() - sent_at >= PARAMS_RETRY_S:
                sent_at = time.monotonic() if self._request() else None
            wait_s = _SEND_RETRY_S if sent_at is None else max(0.0, sent_at + PARAMS_RETRY_S - time.monotonic())
            if self._receive(int(wait_s * 1000)):
                return
            now = time.monotonic()
            if now >= next_log:
                logging.info("Actor %d: waiting for the learner at %s for %.0fs now (it is not up yet or "
                             "not reachable); asking every %.0fs.", self.task, address, now - start,
                             PARAMS_RETRY_S)
                next_log = now + WAIT_LOG_EVERY_S
