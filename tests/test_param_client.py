"""The actor's parameter client (impala/param_client.py) against a real ZeroMQ
ROUTER standing in for the learner's parameter socket: a learner already up is
joined without a word, one that comes up late is waited for quietly at first,
then with one line, and an unanswered request is resent."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq

from impala import param_client, wire
from impala.nets import Agent
from impala.param_client import ParameterClient


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def logged(monkeypatch):
    lines = []
    monkeypatch.setattr(param_client.logging, "info", lambda fmt, *args: lines.append(fmt % args))
    return lines


def _client(address: str, agent: Agent) -> ParameterClient:
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    client = ParameterClient(dealer, agent, task=3)  # sets the socket's limits, so before connecting
    dealer.connect(address)
    return client


def _learner(address: str) -> zmq.Socket:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)
    return router


def _reply_params(router: zmq.Socket, agent: Agent, version: int) -> None:
    identity, message = wire.recv_routed(router, allowed_kinds=("get_params",))
    assert message.meta == {"version": -1, "run": None}
    arrays = {k: v.numpy() for k, v in agent.state_dict().items()}
    wire.send_routed(router, identity, "params", arrays, param_version=version, meta={"run": "r1"})


def _agent(seed: int) -> Agent:
    import torch

    torch.manual_seed(seed)
    return Agent((4,), 2, network="mlp", use_lstm=False, hidden_sizes=(8,))


def _waiting(client: ParameterClient, address: str) -> threading.Thread:
    thread = threading.Thread(target=client.wait_first, args=(address,), daemon=True)
    thread.start()
    return thread


def test_a_learner_that_is_up_is_joined_without_a_word(logged):
    address = _free_address()
    router = _learner(address)
    learner_agent, actor_agent = _agent(1), _agent(2)
    client = _client(address, actor_agent)
    thread = _waiting(client, address)
    assert router.poll(10_000)
    _reply_params(router, learner_agent, version=5)
    thread.join(10)
    assert not thread.is_alive() and client.version == 5 and client.run == "r1"
    assert all(v.equal(learner_agent.state_dict()[k]) for k, v in actor_agent.state_dict().items())
    assert not [line for line in logged if "waiting" in line], logged
    client.close()
    client.socket.close()
    router.close()


def test_a_late_learner_is_waited_for_with_one_line_and_unanswered_requests_are_resent(logged, monkeypatch):
    monkeypatch.setattr(param_client, "WAIT_QUIET_S", 0.2)
    monkeypatch.setattr(param_client, "PARAMS_RETRY_S", 0.5)
    monkeypatch.setattr(param_client, "WAIT_LOG_EVERY_S", 600.0)
    address = _free_address()
    learner_agent = _agent(1)
    client = _client(address, _agent(2))
    thread = _waiting(client, address)
    deadline = time.monotonic() + 30
    while not logged and time.monotonic() < deadline:  # no learner yet: it says so after the quiet time
        time.sleep(0.05)
    time.sleep(1.0)  # and says nothing more for a while (many retries of the skipped request)
    waiting = [line for line in logged if "waiting for the learner" in line]
    assert len(waiting) == 1 and address in waiting[0], logged
    router = _learner(address)
    assert router.poll(10_000)
    router.recv_multipart()  # the first request that gets through goes unanswered ...
    assert router.poll(10_000)  # ... and is resent
    _reply_params(router, learner_agent, version=7)
    thread.join(10)
    assert not thread.is_alive() and client.version == 7
    assert len([line for line in logged if "waiting for the learner" in line]) == 1, logged
    client.close()
    client.socket.close()
    router.close()
