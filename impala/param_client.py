"""The actor's side of the parameter protocol (docs/protocol.md, `get_params`):
at most one request in flight, replies checked, then applied to the acting agent.

Parameters are fetched without blocking: `refresh()` sends a request at an
unroll boundary and applies the reply at a later one, so neither the actor nor
the learner waits for the other. Only the first parameters are waited for
(`wait_first`).

An actor does not trust what it loads (docs/protocol.md, "What an actor checks"):
a reply larger than this agent's parameters can be is cut off at the transport
(ZMQ_MAXMSGSIZE) and by `wire.recv`; a 'params' reply must hold exactly the
agent's names, shapes and dtypes, all finite and plausibly sized. A bad reply
leaves the parameters as they were, is logged in one rate-limited line, and the
next request waits a back-off that doubles with each bad reply in a row. A
'finished' reply says the learner has ended the run: `finished` becomes True and
the actor exits.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
import zmq
from absl import logging
from zmq.utils.monitor import recv_monitor_message

from impala import wire
from impala.nets import Agent

PARAMS_RETRY_S = 3.0  # resend a parameter request unanswered this long (e.g. the learner restarted)
WAIT_QUIET_S = 2.0  # waiting for the first parameters this long is a normal start: say nothing
WAIT_LOG_EVERY_S = 30.0  # then say that it still waits this often
_SEND_RETRY_S = 0.1  # a request skipped because no learner is connected yet is tried again this soon

BAD_REPLY_BACKOFF_S = 1.0  # after a bad reply, ask again after this; doubled for each bad reply in a row ...
MAX_BAD_REPLY_BACKOFF_S = 30.0  # ... up to this
BAD_REPLY_LOG_EVERY_S = 60.0  # bad replies are logged in one line at most this often
# Largest parameter magnitude loaded. Not a property of any network but a plausibility
# bound: RMSProp moves a parameter by at most about lr / sqrt(1 - decay) per update
# (6e-3 with the original's Atari settings), so even a billion-frame run drifts by
# ~1e4 at most, while 1e30 (a value a hostile or broken learner sends) overflows
# float32 activations to inf in one layer and NaN in the next.
MAX_PARAM_ABS = 1e6
MAX_REPLIES_PER_CALL = 4  # replies read per call: a learner flooding replies cannot keep the actor here
REPLY_RCVHWM = 2  # replies queued at the actor (one request in flight, one resent); ZeroMQ holds back the rest
REPLY_KINDS = ("params", "params_unchanged", "finished")
MAX_RUN_ID_CHARS = 64


class BadParams(ValueError):
    """A 'params' reply this agent must not load; the message is one line."""


def expected_params(agent: Agent) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every entry of the agent's state_dict, as the learner
    sends it: floating-point entries as float32 (the learner trains in float32; an
    acting agent in --inference_dtype=bfloat16 casts them when loading), others as they are."""

    def wire_dtype(t: torch.Tensor) -> np.dtype:
        return np.dtype(np.float32) if t.is_floating_point() else torch.empty(0, dtype=t.dtype).numpy().dtype

    return {k: (tuple(v.shape), wire_dtype(v)) for k, v in agent.state_dict().items()}


def reply_limit(expected: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """The most bytes a well-formed 'params' reply for these parameters can take:
    the arrays, the padding before each, the length field and the largest header."""
    arrays = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in expected.values())
    return arrays + wire.ALIGNMENT * len(expected) + 4 + wire.MAX_HEADER_BYTES


def _few(names: list[str]) -> str:
    """Up to three names, each cut short: a peer chose them."""
    shown = ", ".join(repr(n[:40]) for n in names[:3])
    return f"[{shown}{', ...' if len(names) > 3 else ''}]"


def check_params(arrays: dict[str, np.ndarray], expected: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Raises BadParams unless `arrays` has exactly the expected names, shapes and
    dtypes, and every float is finite with |x| <= MAX_PARAM_ABS."""
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise BadParams(f"names do not fit this network (missing {_few(missing)}, unexpected {_few(extra)})")
    for name, (shape, dtype) in expected.items():
        array = arrays[name]
        if array.dtype != dtype or array.shape != shape:
            raise BadParams(
                f"{name} is {array.dtype.name}{list(array.shape)}, this network has {dtype.name}{list(shape)}"
            )
        if dtype.kind == "f" and array.size and not np.abs(array).max() <= MAX_PARAM_ABS:  # NaN fails too
            what = "non-finite values" if not np.isfinite(array).all() else f"values beyond {MAX_PARAM_ABS:g}"
            raise BadParams(f"{name} holds {what}")


class HandshakeWatch:
    """What a ZeroMQ socket monitor says about a socket's connections to the learner:
    TCP connections made, handshakes done, and handshakes the learner refused.

    ZeroMQ reports a refused CurveZMQ key only on the learner's side; here it shows as
    EVENT_HANDSHAKE_FAILED_AUTH (the learner's ZAP handler said no), and a wrong learner
    public key as a failed handshake without detail. Owned by the actor's main thread."""

    EVENTS = (
        zmq.EVENT_CONNECTED
        | zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )

    def __init__(self, socket: zmq.Socket):
        self.socket = socket
        self._monitor = socket.get_monitor_socket(self.EVENTS)
        self.connected = self.succeeded = self.refused = self.failed = 0

    def update(self) -> None:
        """Reads the events that have arrived (never blocks)."""
        for _ in range(1000):  # bounded: a reconnect loop cannot keep the actor here
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_CONNECTED:
                self.connected += 1
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded += 1
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refused += 1
            else:
                self.failed += 1

    def diagnosis(self) -> str:
        """Why no learner answers, as far as the connections tell."""
        self.update()
        if self.refused:
            return (
                "the learner refused this actor's CurveZMQ key (probably: its public key is not in the "
                "learner's authorized_actors/); ZeroMQ does not retry a refused connection, so restart "
                "this actor once its key is authorized"
            )
        if self.failed:
            return (
                "the CurveZMQ handshake with the learner failed (is learner.key in --keys_dir the "
                "learner's public key, and does the learner use --keys_dir too?)"
            )
        if self.connected and not self.succeeded:
            return "TCP connections are made but no handshake completes (check --keys_dir on both sides)"
        return "it is not up yet or not reachable"

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)


class ParameterClient:
    """Keeps at most one parameter request in flight, checks replies and applies
    good ones. Give it the parameter socket before connecting that: it sets the
    socket's limits, which ZeroMQ applies to connections made afterwards.

    Owned by the actor's main thread (not thread-safe)."""

    def __init__(self, socket: zmq.Socket, agent: Agent, task: int):
        self.socket, self.agent, self.task = socket, agent, task
        self.version = -1
        self.run: str | None = None  # the learner process that numbered `version`
        self.finished = False  # the learner said the run is over
        self.bad_replies = 0
        self._expected = expected_params(agent)
        self.max_reply_bytes = reply_limit(self._expected)
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_reply_bytes)  # larger: ZeroMQ drops the connection
        socket.setsockopt(zmq.RCVHWM, REPLY_RCVHWM)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # with no learner connected, a request is skipped, not queued
        self.handshakes = HandshakeWatch(socket)
        self._sent_at: float | None = None  # when the request in flight went out
        self._not_before = 0.0  # no request before this (back-off after a bad reply or a skipped send)
        self._backoff_s = 0.0
        self._next_bad_log = 0.0

    def close(self) -> None:
        self.handshakes.close()

    def _due(self, now: float) -> bool:
        return now >= self._not_before and (self._sent_at is None or now - self._sent_at > PARAMS_RETRY_S)

    def _request(self) -> None:
        """Sends a request; one skipped (no learner connected) is tried again soon."""
        now = time.monotonic()
        try:  # never blocks: with no learner connected (IMMEDIATE) the request is skipped
            wire.send(
                self.socket,
                "get_params",
                task=self.task,
                flags=zmq.NOBLOCK,
                meta={"version": self.version, "run": self.run},
            )
            self._sent_at = now
        except zmq.Again:
            self._not_before = now + _SEND_RETRY_S

    def _receive(self, timeout_ms: int) -> bool:
        """Handles the replies waiting (up to `timeout_ms` for the first, at most
        MAX_REPLIES_PER_CALL); True if the parameters changed."""
        changed = False
        for _ in range(MAX_REPLIES_PER_CALL):
            if not self.socket.poll(timeout_ms):
                break
            timeout_ms = 0
            try:
                changed |= self._apply(
                    wire.recv(self.socket, max_frame_bytes=self.max_reply_bytes, allowed_kinds=REPLY_KINDS)
                )
            except (wire.WireError, BadParams) as e:
                self._bad_reply(e)
        return changed

    def _apply(self, message: wire.Message) -> bool:
        """Applies one decoded reply; BadParams if it must not be loaded."""
        run = message.meta.get("run")
        if type(run) is not str or not 0 < len(run) <= MAX_RUN_ID_CHARS:
            raise BadParams(f"run id of type {type(run).__name__} is not a short string")
        self._sent_at = None
        changed = False
        if message.kind == "finished":
            self.finished = True
        elif message.kind == "params" and (message.param_version > self.version or run != self.run):
            check_params(message.arrays, self._expected)
            if self.run is not None and run != self.run:
                logging.info(
                    "Actor %d: the learner restarted; taking its parameters v%d.", self.task, message.param_version
                )
            self.agent.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in message.arrays.items()})
            self.version, self.run = message.param_version, run
            changed = True
        self._backoff_s = 0.0
        return changed

    def _bad_reply(self, error: Exception) -> None:
        """Keeps the parameters, backs off, and says so at most every BAD_REPLY_LOG_EVERY_S."""
        now = time.monotonic()
        self.bad_replies += 1
        self._sent_at = None  # answered, if badly: the next request waits for the back-off only
        self._backoff_s = min(max(2 * self._backoff_s, BAD_REPLY_BACKOFF_S), MAX_BAD_REPLY_BACKOFF_S)
        self._not_before = now + self._backoff_s
        if now >= self._next_bad_log:
            self._next_bad_log = now + BAD_REPLY_LOG_EVERY_S
            logging.warning(
                "Actor %d: ignored a bad reply from the learner (%d so far; keeping parameters v%d, "
                "asking again in %.0fs): %s",
                self.task,
                self.bad_replies,
                self.version,
                self._backoff_s,
                str(error).splitlines()[0],
            )

    def refresh(self) -> None:
        """Non-blocking: handles replies that have arrived, keeps one request out."""
        self._receive(0)
        self.handshakes.update()  # read, so that the monitor's events never pile up
        if not self.finished and self._due(time.monotonic()):
            self._request()

    def fetch_newest(self, timeout_s: float) -> None:
        """Like `refresh`, then waits up to `timeout_s` for the answer to the request
        out, so that the next unroll acts with the parameters the learner has now
        (--low_lag). A learner that does not answer in time costs only the wait:
        the actor goes on with what it has."""
        self.refresh()
        if self._sent_at is not None and not self.finished:
            self._receive(int(timeout_s * 1000))

    def wait_first(self, address: str, stop: threading.Event | None = None) -> None:
        """Blocks until the first parameters arrive, the learner says the run is
        finished, or `stop` is set. A request goes out as soon as the learner is
        connected and is resent every PARAMS_RETRY_S while unanswered (later after
        a bad reply), so an actor started before its learner joins at most that
        late. Quiet for the first WAIT_QUIET_S (a normal start), then it says once
        that it waits, and why as far as its connections tell, and again every
        WAIT_LOG_EVERY_S."""
        start = time.monotonic()
        next_log = start + WAIT_QUIET_S
        while self.version < 0 and not self.finished and not (stop is not None and stop.is_set()):
            now = time.monotonic()
            if self._due(now):
                self._request()
            wake = self._not_before if self._sent_at is None else max(self._not_before, self._sent_at + PARAMS_RETRY_S)
            if self._receive(int(min(max(wake - now, 0.0), 0.5, max(next_log - now, 0.0)) * 1000)):
                return
            now = time.monotonic()
            if now >= next_log and self.version < 0 and not self.finished:
                logging.info(
                    "Actor %d: waiting for the learner at %s for %.0fs now (%s); asking every %.0fs.",
                    self.task,
                    address,
                    now - start,
                    self.handshakes.diagnosis(),
                    PARAMS_RETRY_S,
                )
                next_log = now + WAIT_LOG_EVERY_S
