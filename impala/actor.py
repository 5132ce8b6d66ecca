"""An actor: steps environments with the behaviour policy and ships unrolls.

One actor process owns `num_envs_per_actor` environments and steps them in
lock-step, with one batched forward pass per step. It keeps the env output, last
action, its logits and the core state across unrolls, so consecutive unrolls
overlap by one step (see unroll.py). Parameters are fetched without blocking:
a request goes out at an unroll boundary and the reply is applied at a later
one, so neither side waits for the other.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
import zmq
from absl import logging

from impala import envs, unroll, wire
from impala.config import Config
from impala.nets import Agent, make_agent, sample_actions

PARAMS_RETRY_S = 10.0  # resend a parameter request unanswered this long (e.g. learner restarted)
UNROLL_SNDHWM = 2  # unrolls queued towards the learner before send blocks (back-pressure)


class ParameterClient:
    """Keeps at most one parameter request in flight and applies replies."""

    def __init__(self, socket: zmq.Socket, agent: Agent, task: int):
        self.socket, self.agent, self.task = socket, agent, task
        self.version = -1
        self._sent_at: float | None = None
        self._names = {k: (tuple(v.shape), v.dtype) for k, v in agent.state_dict().items()}

    def _request(self) -> None:
        wire.send(self.socket, "get_params", task=self.task, meta={"version": self.version})
        self._sent_at = time.monotonic()

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
            if message.kind == "params" and message.param_version > self.version:
                changed |= self._load(message)
        return changed

    def _load(self, message: wire.Message) -> bool:
        got = {k: (tuple(v.shape), v.dtype) for k, v in message.arrays.items()}
        if set(got) != set(self._names) or any(got[k][0] != self._names[k][0] for k in got):
            logging.warning("Actor %d: ignored parameters that do not fit this network.", self.task)
            return False
        self.agent.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in message.arrays.items()})
        self.version = message.param_version
        return True

    def refresh(self) -> None:
        """Non-blocking: applies a reply that has arrived, keeps one request out."""
        self._receive(0)
        if self._sent_at is None or time.monotonic() - self._sent_at > PARAMS_RETRY_S:
            self._request()

    def wait_first(self, address: str, stop: threading.Event | None = None) -> None:
        """Blocks until the first parameters arrive, retrying with back-off."""
        delay = 1.0
        while self.version < 0:
            self._request()
            if self._receive(int(delay * 1000)):
                return
            if stop is not None and stop.is_set():
                return
            logging.info("Actor %d: waiting for the learner at %s (retrying in %.0fs).", self.task, address, delay)
            delay = min(delay * 2, 30.0)


def run_actor(config: Config, task: int, unroll_address: str, params_address: str,
              stop: threading.Event | None = None, max_unrolls: int | None = None) -> None:
    """Acts until `stop` is set, `max_unrolls` were sent, or the process is killed."""
    torch.set_num_threads(1)
    seed = config.seed + 1000 * task
    torch.manual_seed(seed)
    level = envs.level_for_task(config.level_name, task)
    environments = [
        envs.make(level, seed=seed + i, num_action_repeats=config.num_action_repeats,
                  **envs.options(config))
        for i in range(config.num_envs_per_actor)
    ]
    first = environments[0]
    agent = make_agent(config, first.observation_shape, first.num_actions)
    spec = unroll.unroll_spec(config.unroll_length, first.observation_shape, first.observation_dtype,
                              first.num_actions, [s.shape[1] for s in agent.initial_state(1)])

    context = zmq.Context.instance()
    unroll_socket = context.socket(zmq.DEALER)
    params_socket = context.socket(zmq.DEALER)
    for s in (unroll_socket, params_socket):
        s.setsockopt(zmq.LINGER, 0)
    unroll_socket.setsockopt(zmq.SNDHWM, UNROLL_SNDHWM)
    unroll_socket.connect(unroll_address)
    params_socket.connect(params_address)
    params = ParameterClient(params_socket, agent, task)
    try:
        params.wait_first(params_address, stop)
        logging.info("Actor %d: acting on %s with %d env(s), parameters v%d.", task, level,
                     len(environments), params.version)
        buffer = unroll.new_unroll(spec, len(environments))
        for i, env in enumerate(environments):
            _write_step(buffer, 0, i, env.initial())
        state = agent.initial_state(len(environments))
        sent = 0
        while not (stop is not None and stop.is_set()) and (max_unrolls is None or sent < max_unrolls):
            initial_state = [s.numpy().copy() for s in state]
            acted_with = params.version
            state = _act(agent, environments, buffer, state, config.unroll_length)
            arrays = dict(buffer)
            arrays.update({f"core_state_{k}": s for k, s in enumerate(initial_state)})
            wire.send(unroll_socket, "unroll", arrays, task=task, param_version=acted_with, meta={"level": level})
            sent += 1
            buffer = unroll.next_unroll(spec, buffer)
            params.refresh()
    finally:
        for env in environments:
            env.close()
        unroll_socket.close(linger=0)
        params_socket.close(linger=0)


@torch.no_grad()
def _act(agent: Agent, environments: list, buffer: unroll.Unroll, state, unroll_length: int):
    """Fills steps 1..T of `buffer` (step 0 is already there); returns the core state."""
    for t in range(1, unroll_length + 1):
        output, state = agent(
            torch.from_numpy(buffer["observation"][t - 1])[None],
            torch.from_numpy(buffer["action"][t - 1])[None],
            torch.from_numpy(buffer["reward"][t - 1])[None],
            torch.from_numpy(buffer["done"][t - 1])[None],
            state,
        )
        logits = output.policy_logits[0]
        actions = sample_actions(logits).numpy()
        buffer["action"][t] = actions
        buffer["policy_logits"][t] = logits.numpy()
        for i, env in enumerate(environments):
            _write_step(buffer, t, i, env.step(int(actions[i])))
    return state


def _write_step(buffer: unroll.Unroll, t: int, i: int, step: envs.StepOutput) -> None:
    buffer["observation"][t, i] = step.observation
    buffer["reward"][t, i] = step.reward
    buffer["done"][t, i] = step.done
    buffer["episode_return"][t, i] = step.episode_return
    buffer["episode_step"][t, i] = step.episode_step
