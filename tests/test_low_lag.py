"""--low_lag: a real actor (`run_actor` on CartPole, in a thread) against a ROUTER
playing the learner over inproc://, whose queues hold exactly SNDHWM + RCVHWM
messages (no kernel buffers, unlike tcp://). The learner stops reading unrolls
until the actor is blocked, publishes newer parameters, then reads again: with
--low_lag every unroll that was not already queued acts with the newer ones."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

import pytest
import zmq

from impala import learner as learner_lib
from impala import wire
from impala.actor import LOW_LAG_SNDHWM, UNROLL_SNDHWM
from impala.nets import make_agent
from tests.actors import CARTPOLE_ACTOR, start_actor

OLD, NEW = 1, 5  # parameter versions before and after the learner's pause
_addresses = itertools.count()


class PausingLearner:
    """A ROUTER on each of the learner's ports, RCVHWM `rcvhwm` for unrolls; parameter
    requests are answered with `version` (the same weights, renumbered)."""

    def __init__(self, rcvhwm: int):
        context = zmq.Context.instance()  # inproc:// needs the actor's context
        self.unrolls_socket, self.params_socket = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
        for s in (self.unrolls_socket, self.params_socket):
            s.setsockopt(zmq.LINGER, 0)
        self.unrolls_socket.setsockopt(zmq.RCVHWM, rcvhwm)
        n = next(_addresses)
        self.unroll_address, self.params_address = f"inproc://low-lag-unrolls-{n}", f"inproc://low-lag-params-{n}"
        self.unrolls_socket.bind(self.unroll_address)
        self.params_socket.bind(self.params_address)
        agent = make_agent(CARTPOLE_ACTOR, (4,), 2, 0, acting=True)
        self.arrays = {k: v.numpy().copy() for k, v in agent.state_dict().items()}
        self.version = OLD
        self.versions: list[int] = []  # the parameter version of each unroll read, in order

    def serve(self, seconds: float, read_unrolls: int = 0) -> None:
        """Answers parameter requests for `seconds`, or until `read_unrolls` unrolls were read."""
        deadline = time.monotonic() + seconds
        wanted = len(self.versions) + read_unrolls
        while time.monotonic() < deadline and (not read_unrolls or len(self.versions) < wanted):
            if read_unrolls and self.unrolls_socket.poll(0):
                self.versions.append(wire.recv_routed(self.unrolls_socket)[1].param_version)
            if self.params_socket.poll(10):
                identity, _ = wire.recv_routed(self.params_socket, allowed_kinds=("get_params",))
                wire.send_routed(
                    self.params_socket, identity, "params", self.arrays, param_version=self.version, meta={"run": "r"}
                )

    def close(self) -> None:
        self.unrolls_socket.close()
        self.params_socket.close()


@pytest.mark.parametrize("low_lag", [True, False], ids=["low_lag", "default"])
def test_with_low_lag_only_the_queued_unrolls_act_with_older_parameters(low_lag):
    config = dataclasses.replace(CARTPOLE_ACTOR, low_lag=low_lag)
    rcvhwm = learner_lib.unroll_rcvhwm(10**9, low_lag=low_lag)  # the learner's choice for large unrolls
    learner = PausingLearner(rcvhwm)
    stop = threading.Event()
    actor, errors = start_actor(config, learner.unroll_address, learner.params_address, stop)
    try:
        learner.serve(3.0)  # the actor fills the queues and blocks; nothing is read
        learner.version = NEW
        learner.serve(3.0)  # it keeps asking for parameters while it waits
        learner.serve(30.0, read_unrolls=6)
        assert not errors, f"the actor died: {errors[0]!r}"
        assert len(learner.versions) == 6, learner.versions
        queued = (LOW_LAG_SNDHWM if low_lag else UNROLL_SNDHWM) + rcvhwm  # inproc: exactly this many
        old = learner.versions.count(OLD)
        assert learner.versions == [OLD] * old + [NEW] * (6 - old), learner.versions
        if low_lag:
            assert old == queued == 2, learner.versions
        else:  # the default acts first and then waits: one more unroll behind the queues
            assert old == queued + 1, learner.versions
    finally:
        stop.set()
        actor.join(10)
        learner.close()


def test_the_learner_queues_one_unroll_per_actor_with_low_lag():
    pong_16_envs = 9 * 2**20
    assert learner_lib.unroll_rcvhwm(pong_16_envs, low_lag=True) == learner_lib.LOW_LAG_UNROLL_RCVHWM == 1
    assert learner_lib.unroll_rcvhwm(pong_16_envs) == learner_lib.MIN_UNROLL_RCVHWM
