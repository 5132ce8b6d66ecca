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

from impala import envs, security, unroll, wire
from impala.actor_host import ActorHost
from impala.config import Config
from impala.memory import reuse_freed_memory
from impala.metrics import Stopwatch
from impala.nets import Agent, make_agent, sample_actions

PARAMS_RETRY_S = 3.0  # resend a parameter request unanswered this long (e.g. the learner restarted)
UNROLL_SNDHWM = 2  # unrolls queued towards the learner before send blocks (back-pressure)


class ParameterClient:
    """Keeps at most one parameter request in flight and applies replies."""

    def __init__(self, socket: zmq.Socket, agent: Agent, task: int):
        self.socket, self.agent, self.task = socket, agent, task
        self.version = -1
        self.run: str | None = None  # the learner process that numbered `version`
        self._sent_at: float | None = None
        self._names = {k: (tuple(v.shape), v.dtype) for k, v in agent.state_dict().items()}

    def _request(self) -> None:
        try:  # never blocks: with no learner connected (IMMEDIATE) the request is skipped
            wire.send(self.socket, "get_params", task=self.task, flags=zmq.NOBLOCK,
                      meta={"version": self.version, "run": self.run})
        except zmq.Again:
            pass
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
    reuse_freed_memory()
    seed = config.seed + 1000 * task
    torch.manual_seed(seed)
    level = envs.level_for_task(config.level_name, task)
    # With env workers, the environments live in worker processes behind the host.
    host = ActorHost.from_config(config, level, seed) if config.env_workers_per_actor else None
    environments = [] if host else [
        envs.make(level, seed=seed + i, num_action_repeats=config.num_action_repeats,
                  **envs.options(config))
        for i in range(config.num_envs_per_actor)
    ]
    first = host or environments[0]
    instruction_length = envs.instruction_length(first)  # > 0 on levels with instructions (DMLab)
    agent = make_agent(config, first.observation_shape, first.num_actions, instruction_length, acting=True)
    spec = unroll.unroll_spec(config.unroll_length, first.observation_shape, first.observation_dtype,
                              first.num_actions, [s.shape[1] for s in agent.initial_state(1)],
                              instruction_length=instruction_length)

    context = zmq.Context.instance()
    unroll_socket = context.socket(zmq.DEALER)
    params_socket = context.socket(zmq.DEALER)
    for s in (unroll_socket, params_socket):
        s.setsockopt(zmq.LINGER, 0)
        if config.keys_dir:
            security.connect_securely(s, config.keys_dir)
    unroll_socket.setsockopt(zmq.SNDHWM, UNROLL_SNDHWM)
    params_socket.setsockopt(zmq.IMMEDIATE, 1)
    unroll_socket.connect(unroll_address)
    params_socket.connect(params_address)
    params = ParameterClient(params_socket, agent, task)
    # Where this actor's time goes, sent with each unroll (the learner logs the sums).
    watch = host.stopwatch if host else Stopwatch()
    try:
        params.wait_first(params_address, stop)
        logging.info("Actor %d: acting on %s with %d env(s), parameters v%d.", task, level,
                     config.num_envs_per_actor, params.version)
        buffer = unroll.new_unroll(spec, config.num_envs_per_actor)
        if host:
            host.initial(buffer)
        for i, env in enumerate(environments):
            _write_step(buffer, 0, i, env.initial())
        state = agent.initial_state(config.num_envs_per_actor)
        sent = 0
        while not (stop is not None and stop.is_set()) and (max_unrolls is None or sent < max_unrolls):
            initial_state = [s.numpy().copy() for s in state]
            acted_with = params.version
            if host:
                with watch("act"):
                    state = host.act(agent, buffer, state, config.unroll_length)
            else:
                state = _act(agent, environments, buffer, state, config.unroll_length, watch)
            arrays = dict(buffer)
            arrays.update({f"core_state_{k}": s for k, s in enumerate(initial_state)})
            meta = {"level": level, "run": params.run, "seconds": watch.take()}
            with watch("send"):
                _send_unroll(unroll_socket, arrays, task, acted_with, meta, unroll_address, stop)
            sent += 1
            buffer = unroll.next_unroll(spec, buffer)
            with watch("params"):
                params.refresh()
    finally:
        for env in environments:
            env.close()
        if host:
            host.close()
        unroll_socket.close(linger=0)
        params_socket.close(linger=0)


def _send_unroll(socket: zmq.Socket, arrays: unroll.Unroll, task: int, param_version: int, meta: dict,
                 address: str, stop: threading.Event | None) -> None:
    """Sends one unroll, waiting (and saying so) while the learner takes none:
    its queues are full (back-pressure) or it is down (ZeroMQ reconnects by itself)."""
    frames = wire.encode("unroll", arrays, task=task, param_version=param_version, meta=meta)
    start = time.monotonic()
    next_warning = start + 10.0
    while not (stop is not None and stop.is_set()):
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            if next_warning > start + 10.0:
                logging.info("Actor %d: the learner at %s takes unrolls again.", task, address)
            return
        except zmq.Again:
            socket.poll(1000, zmq.POLLOUT)
            if time.monotonic() >= next_warning:
                logging.warning("Actor %d: the learner at %s has taken no unroll for %.0fs; waiting.",
                                task, address, time.monotonic() - start)
                next_warning += 60.0


@torch.no_grad()
def _act(agent: Agent, environments: list, buffer: unroll.Unroll, state, unroll_length: int,
         watch: Stopwatch | None = None):
    """Fills steps 1..T of `buffer` (step 0 is already there); returns the core state.
    Time spent in inference and in the environments goes to `watch`."""
    watch = watch or Stopwatch()
    for t in range(1, unroll_length + 1):
        with watch("inference"):
            output, state = agent(
                torch.from_numpy(buffer["observation"][t - 1])[None],
                torch.from_numpy(buffer["action"][t - 1])[None],
                torch.from_numpy(buffer["reward"][t - 1])[None],
                torch.from_numpy(buffer["done"][t - 1])[None],
                state,
                instruction=_instruction(buffer, t - 1),
            )
            logits = output.policy_logits[0]
            actions = sample_actions(logits).numpy()
            buffer["action"][t] = actions
            buffer["policy_logits"][t] = logits.numpy()
        with watch("env"):
            for i, env in enumerate(environments):
                _write_step(buffer, t, i, env.step(int(actions[i])))
    return state


def _write_step(buffer: unroll.Unroll, t: int, i: int, step: envs.StepOutput) -> None:
    buffer["observation"][t, i] = step.observation
    buffer["reward"][t, i] = step.reward
    buffer["done"][t, i] = step.done
    buffer["episode_return"][t, i] = step.episode_return
    buffer["episode_step"][t, i] = step.episode_step
    if "instruction" in buffer:  # levels with instructions
        buffer["instruction"][t, i] = step.instruction


def _instruction(buffer: unroll.Unroll, t: int) -> torch.Tensor | None:
    """The instructions that came with env outputs t, [1, n, L], or None without them."""
    return torch.from_numpy(buffer["instruction"][t])[None] if "instruction" in buffer else None
