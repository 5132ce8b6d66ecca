"""An actor: steps environments with the behaviour policy and ships unrolls.

One actor process owns `num_envs_per_actor` environments. `run_actor` is one
loop over a stepping interface (`Stepper`) with two implementations:

  - `LockStep` (here): the environments in this process, stepped in lock-step
    with one batched forward pass per step;
  - `ActorHost` (impala/actor_host.py, --env_workers_per_actor > 0): the
    environments in worker processes, their policy calls batched dynamically.

Either fills steps 1..T of an unroll (impala/unroll.py) per `act` and keeps the
core state across unrolls; the loop keeps the unroll's last step as the next
one's step 0, so consecutive unrolls overlap by one step. Parameters are
fetched without blocking (impala/param_client.py); with --low_lag the actor
waits, before each unroll, for room towards the learner and for the newest
parameters, so that what it sends was acted with parameters as new as the
queues allow.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

import torch
import zmq
from absl import logging

from impala import envs, security, step, unroll, wire
from impala.actor_host import ActorHost
from impala.config import Config
from impala.memory import reuse_freed_memory
from impala.metrics import Stopwatch
from impala.nets import Agent, CoreState, make_agent, sample_actions
from impala.param_client import ParameterClient
from impala.policy import call_agent, inputs_at

UNROLL_SNDHWM = 2  # unrolls queued towards the learner before send blocks (back-pressure)
LOW_LAG_SNDHWM = 1  # with --low_lag: the unroll being sent and none behind it
NEWEST_PARAMS_WAIT_S = 1.0  # with --low_lag: how long an actor waits for the answer to its request
UNROLL_SOCKET_MAX_IN = 64 * 2**10  # largest message taken in on the unroll socket (the handshake's are < 1 KiB)


class Stepper(Protocol):
    """How run_actor steps its n environments (LockStep, ActorHost)."""

    spec: step.EnvSpec  # the environments' spaces
    num_envs: int
    stopwatch: Stopwatch  # where the time went ('env', 'inference', 'act'); run_actor ships its sums

    def initial(self, buffer: unroll.Unroll) -> None:
        """Writes every environment's first output into step 0 of `buffer` [T+1, n, ...]."""

    def act(self, agent: Agent, buffer: unroll.Unroll, state: CoreState, unroll_length: int) -> CoreState:
        """Fills steps 1..T of `buffer` (step 0 is already there) acting with `agent`
        from core `state` ([n, H] tensors); returns the core state after step T."""

    def close(self) -> None: ...


class LockStep:
    """n environments in this process, stepped in lock-step: one batched forward
    pass for all of them per step, then each environment's step. Time spent in
    inference and in the environments goes to `stopwatch`."""

    def __init__(self, environments: Sequence[envs.Environment]):
        self.environments = list(environments)
        self.num_envs = len(self.environments)
        self.spec = step.EnvSpec.of(self.environments[0])
        self.stopwatch = Stopwatch()

    @classmethod
    def from_config(cls, config: Config, level: str, seed: int) -> LockStep:
        """Env i seeded seed + i, as in the actor host."""
        return cls(
            [
                envs.make(level, seed=seed + i, num_action_repeats=config.num_action_repeats, **envs.options(config))
                for i in range(config.num_envs_per_actor)
            ]
        )

    def initial(self, buffer: unroll.Unroll) -> None:
        for i, env in enumerate(self.environments):
            step.write(buffer, (0, i), env.initial())

    @torch.no_grad()
    def act(self, agent: Agent, buffer: unroll.Unroll, state: CoreState, unroll_length: int) -> CoreState:
        watch = self.stopwatch
        for t in range(1, unroll_length + 1):
            with watch("inference"):
                output, state = call_agent(agent, inputs_at(buffer, t - 1), state)
                logits = output.policy_logits[0]
                actions = sample_actions(logits).numpy()
                buffer["action"][t] = actions
                buffer["policy_logits"][t] = logits.numpy()
            with watch("env"):
                for i, env in enumerate(self.environments):
                    step.write(buffer, (t, i), env.step(int(actions[i])))
        return state

    def close(self) -> None:
        for env in self.environments:
            env.close()


def make_stepper(config: Config, level: str, seed: int) -> Stepper:
    """The actor host with env workers (--env_workers_per_actor > 0), else LockStep."""
    if config.env_workers_per_actor:
        return ActorHost.from_config(config, level, seed)
    return LockStep.from_config(config, level, seed)


def run_actor(
    config: Config,
    task: int,
    unroll_address: str,
    params_address: str,
    stop: threading.Event | None = None,
    max_unrolls: int | None = None,
) -> None:
    """Acts until `stop` is set, `max_unrolls` were sent, the learner says the run
    is finished, or the process is killed."""
    torch.set_num_threads(1)
    reuse_freed_memory()
    seed = config.seed + 1000 * task
    torch.manual_seed(seed)
    level = envs.level_for_task(config.level_name, task)
    stepper = make_stepper(config, level, seed)
    context = zmq.Context.instance()
    unroll_socket = context.socket(zmq.DEALER)
    params_socket = context.socket(zmq.DEALER)
    params = None
    try:
        spec = stepper.spec
        agent = make_agent(config, spec.observation_shape, spec.num_actions, spec.instruction_length, acting=True)
        layout = unroll.spec_of(config.unroll_length, spec, [s.shape[1] for s in agent.initial_state(1)])
        for s in (unroll_socket, params_socket):
            s.setsockopt(zmq.LINGER, 0)
            if config.keys_dir:
                security.connect_securely(s, config.keys_dir)
        unroll_socket.setsockopt(zmq.SNDHWM, LOW_LAG_SNDHWM if config.low_lag else UNROLL_SNDHWM)
        # The learner sends nothing on this socket: what a peer sends here anyway is
        # bounded, never read, and costs at most a message or two of this size.
        unroll_socket.setsockopt(zmq.MAXMSGSIZE, UNROLL_SOCKET_MAX_IN)
        unroll_socket.setsockopt(zmq.RCVHWM, 1)
        params = ParameterClient(params_socket, agent, task)  # sets its socket's limits: before connecting
        unroll_socket.connect(unroll_address)
        params_socket.connect(params_address)
        watch = stepper.stopwatch  # where this actor's time goes, sent with each unroll (the learner logs the sums)
        params.wait_first(params_address, stop)
        if params.finished:
            logging.info("Actor %d: the learner at %s says the run is finished; exiting.", task, params_address)
            return
        logging.info(
            "Actor %d: acting on %s with %d env(s), parameters v%d.",
            task,
            level,
            config.num_envs_per_actor,
            params.version,
        )
        buffer = unroll.new_unroll(layout, config.num_envs_per_actor)
        stepper.initial(buffer)
        state = agent.initial_state(config.num_envs_per_actor)
        sent = 0
        while (
            not (stop is not None and stop.is_set())
            and not params.finished
            and (max_unrolls is None or sent < max_unrolls)
        ):
            if config.low_lag:  # act only once the unroll can go, and with the newest parameters
                with watch("send"):
                    if not _wait_for_room(unroll_socket, task, unroll_address, stop, params):
                        break
                with watch("params"):
                    params.fetch_newest(NEWEST_PARAMS_WAIT_S)
            initial_state = [s.numpy().copy() for s in state]
            acted_with = params.version
            state = stepper.act(agent, buffer, state, config.unroll_length)
            arrays = dict(buffer)
            arrays.update({f"core_state_{k}": s for k, s in enumerate(initial_state)})
            meta = {"level": level, "run": params.run, "seconds": watch.take()}
            with watch("send"):
                _send_unroll(unroll_socket, arrays, task, acted_with, meta, unroll_address, stop, params)
            sent += 1
            buffer = unroll.next_unroll(layout, buffer)
            with watch("params"):
                params.refresh()
        if params.finished:
            logging.info("Actor %d: the learner says the run is finished; exiting after %d unrolls.", task, sent)
    finally:
        if params is not None:
            params.close()
        stepper.close()
        unroll_socket.close(linger=0)
        params_socket.close(linger=0)


def _wait_for_room(
    socket: zmq.Socket, task: int, address: str, stop: threading.Event | None, params: ParameterClient
) -> bool:
    """Waits (and says so) while the learner takes no unroll: its queues are full
    (back-pressure) or it is down (ZeroMQ reconnects by itself). While waiting it keeps
    asking for parameters, so that it learns when the learner has finished the run (a
    learner that has stopped training takes no more unrolls). True once `socket` can
    take a message; False if `stop` is set or the run is finished first."""
    start = time.monotonic()
    next_warning = start + 10.0
    while not (stop is not None and stop.is_set()) and not params.finished:
        if socket.poll(1000, zmq.POLLOUT):
            if next_warning > start + 10.0:
                logging.info("Actor %d: the learner at %s takes unrolls again.", task, address)
            return True
        params.refresh()
        if time.monotonic() >= next_warning:
            logging.warning(
                "Actor %d: the learner at %s has taken no unroll for %.0fs; waiting.",
                task,
                address,
                time.monotonic() - start,
            )
            next_warning += 60.0
    return False


def _send_unroll(
    socket: zmq.Socket,
    arrays: unroll.Unroll,
    task: int,
    param_version: int,
    meta: dict,
    address: str,
    stop: threading.Event | None,
    params: ParameterClient,
) -> None:
    """Sends one unroll as soon as the learner takes it (`_wait_for_room`); gives up
    if `stop` is set or the run is finished first."""
    frames = wire.encode("unroll", arrays, task=task, param_version=param_version, meta=meta)
    while _wait_for_room(socket, task, address, stop, params):
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return
        except zmq.Again:  # the room was gone again: wait once more
            continue
