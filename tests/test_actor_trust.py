"""Actors check what they load (issue 18, finding 7): a real actor (`run_actor` on
CartPole, in a thread) against a hostile ROUTER playing the learner. The learner
first sends good parameters, then answers every request with a bad reply; the
actor must stay alive, keep acting with the good parameters, ask again at a
bounded rate, and say so in one line."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from impala import param_client, wire
from impala.nets import make_agent
from tests.actors import CARTPOLE_ACTOR, start_actor

GOOD_LOGITS = np.array([0.0, 5.0], np.float32)  # what the good parameters make of any input
WINDOW_S = 6.0  # how long the hostile replies go on
# Requests the actor may make in WINDOW_S of bad replies: its back-off (1 s, then 2 s, 4 s,
# ...) allows 3, the 3 s resend of an unanswered request 3 too; one more for the one in flight.
MAX_REQUESTS = 4


def _good_arrays() -> dict[str, np.ndarray]:
    """Zero weights, so the policy's logits are its bias: GOOD_LOGITS for every input."""
    agent = make_agent(CARTPOLE_ACTOR, (4,), 2, 0, acting=True)
    arrays = {k: np.zeros(tuple(v.shape), np.float32) for k, v in agent.state_dict().items()}
    arrays["policy.bias"] = GOOD_LOGITS.copy()
    return arrays


def _params(arrays: dict[str, np.ndarray], version: int = 2) -> list:
    return wire.encode("params", arrays, param_version=version, meta={"run": "hostile"})


def _nan() -> list:
    arrays = _good_arrays()
    arrays["torso.layers.0.weight"][0, 0] = np.nan
    return _params(arrays)


def _huge() -> list:
    return _params({k: np.full(v.shape, 1e30, np.float32) for k, v in _good_arrays().items()})


def _wrong_shapes() -> list:
    arrays = _good_arrays()
    arrays["torso.layers.0.weight"] = np.zeros((17, 4), np.float32)
    return _params(arrays)


def _int8() -> list:
    return _params({k: np.ones(v.shape, np.int8) for k, v in _good_arrays().items()})


def _oversized() -> list:
    """The right parameters and 8 MiB more: far beyond what this network's reply can be."""
    return _params({**_good_arrays(), "padding": np.zeros(2 * 2**20, np.float32)})


def _overflowing_shape() -> list:
    """An empty array claiming shape [0, 2**63] (numpy refuses to reshape to it)."""
    header = msgpack.packb(
        {
            "proto": "impala",
            "v": wire.PROTOCOL_VERSION,
            "kind": "params",
            "task": 0,
            "param_version": 2,
            "meta": {"run": "hostile"},
            "arrays": [["policy.bias", "float32", [0, 2**63]]],
        }
    )
    return [len(header).to_bytes(4, "little") + header]


class HostileLearner:
    """A ROUTER on each of the learner's ports: unrolls are read and kept; the first
    parameter request gets good parameters, every later one `bad`."""

    def __init__(self, bad: list):
        context = zmq.Context.instance()
        self.unrolls_socket, self.params_socket = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
        for s in (self.unrolls_socket, self.params_socket):
            s.setsockopt(zmq.LINGER, 0)
        self.unroll_address = f"tcp://127.0.0.1:{self.unrolls_socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.params_address = f"tcp://127.0.0.1:{self.params_socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.good, self.bad = _params(_good_arrays(), version=1), bad
        self.bad_sent: list[float] = []  # when each bad reply went out
        self.unrolls: list[tuple[float, wire.Message]] = []

    def serve_until(self, done) -> None:
        poller = zmq.Poller()
        poller.register(self.unrolls_socket, zmq.POLLIN)
        poller.register(self.params_socket, zmq.POLLIN)
        deadline = time.monotonic() + 120
        while not done():
            assert time.monotonic() < deadline, "the hostile learner waited too long"
            events = dict(poller.poll(50))
            if self.unrolls_socket in events:
                _, message = wire.recv_routed(self.unrolls_socket)
                self.unrolls.append((time.monotonic(), message))
            if self.params_socket in events:
                identity, message = wire.recv_routed(self.params_socket, allowed_kinds=("get_params",))
                if message.meta["version"] < 0:
                    self.params_socket.send_multipart([identity, *self.good])
                else:
                    self.bad_sent.append(time.monotonic())
                    self.params_socket.send_multipart([identity, *self.bad])

    def close(self) -> None:
        self.unrolls_socket.close()
        self.params_socket.close()


@pytest.fixture
def warnings(monkeypatch):
    lines = []
    monkeypatch.setattr(param_client.logging, "warning", lambda fmt, *args: lines.append(fmt % args))
    return lines


@pytest.mark.parametrize(
    "bad",
    [_nan, _huge, _wrong_shapes, _int8, _oversized, _overflowing_shape],
    ids=["nan", "1e30", "wrong_shapes", "int8", "oversized", "shape_0_2**63"],
)
def test_an_actor_keeps_its_parameters_against_bad_replies(bad, warnings):
    learner = HostileLearner(bad())
    stop = threading.Event()
    actor, errors = start_actor(CARTPOLE_ACTOR, learner.unroll_address, learner.params_address, stop)
    try:
        learner.serve_until(lambda: learner.bad_sent or errors)
        start = learner.bad_sent[0]
        learner.serve_until(lambda: time.monotonic() > start + WINDOW_S or errors)
        end = time.monotonic()
        learner.serve_until(lambda: any(t > end for t, _ in learner.unrolls) or errors)  # still acting
        assert not errors, f"the actor died: {errors[0]!r}"
        assert actor.is_alive()
        requests = [t for t in learner.bad_sent if t <= end]
        assert len(requests) <= MAX_REQUESTS, f"{len(requests)} requests in {end - start:.1f}s"
        later = [m for t, m in learner.unrolls if t > start + 0.5]
        assert later
        for message in later:  # acted with the good parameters all along
            np.testing.assert_array_equal(
                message.arrays["policy_logits"][1:], np.broadcast_to(GOOD_LOGITS, (CARTPOLE_ACTOR.unroll_length, 2, 2))
            )
            assert message.param_version == 1
        bad_lines = [line for line in warnings if "bad reply" in line]
        assert len(bad_lines) <= 1, bad_lines  # one line, however many bad replies
    finally:
        stop.set()
        learner.serve_until(lambda: not actor.is_alive())
        learner.close()


def test_a_reply_limit_fits_the_network_and_checks_name_what_is_wrong():
    agent = make_agent(CARTPOLE_ACTOR, (4,), 2, 0, acting=True)
    expected = param_client.expected_params(agent)
    good = _good_arrays()
    param_client.check_params(good, expected)
    assert len(_params(good)[0]) <= param_client.reply_limit(expected) < len(_oversized()[0])
    cases = {
        "non-finite": {**good, "policy.bias": np.array([np.inf, 0], np.float32)},
        "beyond": {**good, "policy.bias": np.array([2e6, 0], np.float32)},
        "int8": {**good, "policy.bias": np.zeros(2, np.int8)},
        "bool": {**good, "policy.bias": np.zeros(2, bool)},
        "missing": {k: v for k, v in good.items() if k != "policy.bias"},
        "[3]": {**good, "policy.bias": np.zeros(3, np.float32)},
    }
    for words, arrays in cases.items():
        with pytest.raises(param_client.BadParams, match=words.replace("[", r"\[").replace("]", r"\]")):
            param_client.check_params(arrays, expected)
