"""Tests for the actor host (impala/actor_host.py, impala/env_worker.py): its
unrolls are the lock-step actor's, workers fail loudly, and no process or shared
memory outlives its owner."""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import impala.actor
import impala.actor_host
from impala import envs
from impala.actor import LockStep
from impala.actor_host import ActorHost
from impala.env_worker import EnvWorkerError
from impala.envs.gym import GymEnvironment
from impala.nets import Agent, AgentOutput
from impala.unroll import new_unroll, next_unroll, unroll_spec, validate
from tests import cli

T = 7
TIME_MAJOR = ("observation", "reward", "done", "episode_return", "episode_step", "action", "policy_logits")
# Picklable factories that a spawned worker can call without importing torch or this file.
CARTPOLE = functools.partial(envs.make, "CartPole-v1")
SHORT_CARTPOLE = functools.partial(GymEnvironment.from_level, "CartPole-v1", max_episode_steps=3)


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_actor does; the workers need the other core
    yield
    torch.set_num_threads(threads)


class StepCounter(nn.Module):
    """A deterministic stand-in for Agent, exact in float32, so that the host and
    the lock-step actor must agree bit for bit whatever rows share a batch.

    Its core state is (steps since the episode started, return so far), reset
    where done as the LSTM's is; it chooses action (steps + last action + [pole
    angle > 0]) mod 2, so a row sent to the wrong environment, a state not carried
    or not reset, or an off-by-one in time changes the trajectory."""

    num_actions = 2

    def initial_state(self, batch_size: int):
        return torch.zeros(batch_size, 1), torch.zeros(batch_size, 1)

    def forward(self, observation, last_action, reward, done, core_state, instruction=None):
        steps, returns = core_state
        not_done = (~done[0].bool()).float()[:, None]
        steps = steps * not_done + 1
        returns = returns * not_done + reward[0][:, None]
        choice = (steps[:, 0].long() + last_action[0] + (observation[0, :, 2] > 0).long()) % 2
        logits = F.one_hot(choice, 2).float() * 4.0 - 2.0
        return AgentOutput(logits[None], returns[:, 0][None]), (steps, returns)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _spec(environment_like, agent) -> dict:
    return unroll_spec(
        T,
        environment_like.observation_shape,
        environment_like.observation_dtype,
        environment_like.num_actions,
        [s.shape[1] for s in agent.initial_state(1)],
    )


def _lock_step_unrolls(make_env, seeds, agent, count):
    """What run_actor ships without env workers (impala/actor.py `LockStep`)."""
    stepper = LockStep([make_env(seed=seed) for seed in seeds])
    spec = _spec(stepper.environments[0], agent)
    buffer = new_unroll(spec, len(seeds))
    stepper.initial(buffer)
    state, unrolls = agent.initial_state(len(seeds)), []
    for _ in range(count):
        initial_state = [s.numpy().copy() for s in state]
        state = stepper.act(agent, buffer, state, T)
        unrolls.append({**buffer, **{f"core_state_{k}": s for k, s in enumerate(initial_state)}})
        buffer = next_unroll(spec, buffer)
    stepper.close()
    return unrolls


def _in_thread(fn, timeout=60.0):
    """fn() in a daemon thread, so that a deadlock fails the test instead of hanging it."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert out, "deadlocked (or failed: see the thread's traceback above)"
    return out[0]


def _host_unrolls(host, agent, count):
    """What run_actor ships with env workers: the same loop, stepping through the host."""
    spec = _spec(host, agent)
    buffer = new_unroll(spec, host.num_envs)
    host.initial(buffer)
    state, unrolls = agent.initial_state(host.num_envs), []
    for _ in range(count):
        initial_state = [s.numpy().copy() for s in state]
        state = host.act(agent, buffer, state, T)
        arrays = {**buffer, **{f"core_state_{k}": s for k, s in enumerate(initial_state)}}
        assert validate(arrays, spec) == host.num_envs
        unrolls.append(arrays)
        buffer = next_unroll(spec, buffer)
    return unrolls


@pytest.mark.parametrize(
    "make_env,minimum,maximum,timeout_ms",
    [
        (SHORT_CARTPOLE, 1, 2, 1),
        (CARTPOLE, 1, 2, 1),
        (CARTPOLE, 4, 4, 1),  # the last envs of an unroll are fewer than the minimum
        (CARTPOLE, 1, 3, 600_000),  # 5 envs never fill batches of 3 evenly, and nobody waits 10 minutes
    ],
    ids=["3_step_episodes", "cartpole", "minimum_4_of_5_envs", "no_waiting_for_rows_that_cannot_come"],
)
def test_host_unrolls_equal_the_lock_step_actors(make_env, minimum, maximum, timeout_ms, monkeypatch):
    monkeypatch.setattr(impala.actor, "sample_actions", _argmax)
    monkeypatch.setattr(impala.actor_host, "sample_actions", _argmax)
    seeds, count = [11, 12, 13, 14, 15], 3
    expected = _lock_step_unrolls(make_env, seeds, StepCounter(), count)
    # 5 envs over 2 workers (3 + 2), small batches: rows of different workers and
    # times share batches in whatever order they arrive. When no env is being
    # stepped, the rows waiting are all that can come: the host must not wait for more.
    with ActorHost(
        make_env, seeds, num_workers=2, minimum_batch_size=minimum, maximum_batch_size=maximum, timeout_ms=timeout_ms
    ) as host:
        got = _in_thread(lambda: _host_unrolls(host, StepCounter(), count))
        assert host.batches > count * T  # really batched many times, not once per step
    for k, (want, have) in enumerate(zip(expected, got)):
        assert set(want) == set(have)
        for name in want:
            np.testing.assert_array_equal(have[name], want[name], err_msg=f"unroll {k}, {name}")
    # The comparison had something to compare: episodes ended, actions varied, states moved.
    assert any(u["done"][1:].any() for u in got)
    assert len(np.unique(np.concatenate([u["action"][1:].ravel() for u in got]))) == 2
    assert got[-1]["core_state_0"].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_unrolls_with_a_real_agent_overlap_replay_and_match_the_learner(dtype):
    torch.manual_seed(0)
    agent = Agent((4,), 2, network="mlp", use_lstm=True, lstm_size=8, hidden_sizes=(16,))
    seeds = [3, 4, 5]
    with ActorHost(SHORT_CARTPOLE, seeds, num_workers=2, maximum_batch_size=2, timeout_ms=1) as host:
        assert (host.observation_shape, host.observation_dtype, host.num_actions) == ((4,), np.float32, 2)
        # --inference_dtype: the actor acts with a rounded copy of the learner's agent.
        first, second = _host_unrolls(host, copy.deepcopy(agent).to(dtype), 2)
    for name in TIME_MAJOR:  # step 0 repeats the previous unroll's step T
        np.testing.assert_array_equal(second[name][0], first[name][T], err_msg=name)
    for i, seed in enumerate(seeds):  # env output t came from action t, episodes end every 3 steps
        env = SHORT_CARTPOLE(seed=seed)
        np.testing.assert_array_equal(first["observation"][0, i], env.initial().observation)
        for u in (first, second):
            for t in range(1, T + 1):
                out = env.step(int(u["action"][t, i]))
                np.testing.assert_array_equal(u["observation"][t, i], out.observation)
                assert (u["reward"][t, i], u["done"][t, i]) == (out.reward, out.done)
                assert (u["episode_return"][t, i], u["episode_step"][t, i]) == (out.episode_return, out.episode_step)
        env.close()
    assert first["done"][1:].sum() == 2 * len(seeds)  # steps 3 and 6 of 7
    # The behaviour logits are what the learner computes from the unroll's initial
    # core state over env outputs 0..T-1, across the cut too (to bfloat16's rounding).
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    with torch.no_grad():
        for u in (first, second):
            assert u["policy_logits"].dtype == u["core_state_0"].dtype == np.float32
            inputs = (torch.from_numpy(u[k][:-1]) for k in ("observation", "action", "reward", "done"))
            state = (torch.from_numpy(u["core_state_0"]), torch.from_numpy(u["core_state_1"]))
            output, _ = agent(*inputs, state)
            np.testing.assert_allclose(output.policy_logits.numpy(), u["policy_logits"][1:], **tolerance)
    assert not first["core_state_0"].any() and second["core_state_0"].any()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _wait_gone(pids, timeout=20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _shared_segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_close_ends_the_workers_cleanly_and_leaves_no_shared_memory():
    before = _shared_segments()
    host = ActorHost(CARTPOLE, [0, 1, 2], num_workers=2)
    processes = [w.process for w in host._workers]
    assert all(p.is_alive() for p in processes)
    assert _shared_segments() - before == set()  # names dropped once both sides mapped them
    host.close()
    assert [p.exitcode for p in processes] == [0, 0]  # they quit when asked, nobody killed them
    host.close()  # idempotent
    agent = StepCounter()
    with pytest.raises(EnvWorkerError, match="closed"):
        host.act(agent, new_unroll(_spec(host, agent), 3), agent.initial_state(3), T)


def test_a_worker_that_cannot_start_is_reported_with_its_traceback():
    with pytest.raises(EnvWorkerError, match="(?s)env-worker-0 failed to start.*NoSuchLevel"):
        ActorHost(functools.partial(envs.make, "NoSuchLevel-v0"), [0], num_workers=1)


def test_a_worker_that_dies_is_reported_by_act():
    agent = StepCounter()
    with ActorHost(CARTPOLE, [0, 1], num_workers=2) as host:
        buffer = new_unroll(_spec(host, agent), 2)
        host.initial(buffer)
        os.kill(host.worker_pids[1], signal.SIGKILL)
        with pytest.raises(EnvWorkerError, match="env-worker-1 exited unexpectedly"):
            host.act(agent, buffer, agent.initial_state(2), T)


_ORPHAN_SCRIPT = """
import functools, json, os, sys, time
from impala import envs
from impala.actor_host import ActorHost
if __name__ == "__main__":
    host = ActorHost(functools.partial(envs.make, "CartPole-v1"), [0, 1], num_workers=2)
    print(json.dumps(host.worker_pids), flush=True)
    time.sleep(600)
"""


def test_workers_die_with_their_actor_even_when_it_is_killed():
    before = _shared_segments()
    actor = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT],
        cwd=cli.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        worker_pids = json.loads(actor.stdout.readline())
        assert len(worker_pids) == 2 and all(_alive(p) for p in worker_pids)
        actor.kill()  # SIGKILL: no finally block, no close(); only PR_SET_PDEATHSIG is left
        actor.wait(timeout=30)
        assert _wait_gone(worker_pids) == []
        assert cli.wait_session_gone(actor.pid, timeout=20) == []  # nothing else either
        assert _shared_segments() - before == set()
    finally:
        cli.kill_session(actor.pid)


def test_training_with_env_workers_runs_and_stops_every_process(tmp_path):
    # bfloat16 acting too: the actor's agent loads the learner's float32 parameters.
    process = cli.start(
        "--flagfile=configs/cartpole.cfg",
        "--num_actors=1",
        "--num_envs_per_actor=4",
        "--env_workers_per_actor=2",
        "--inference_dtype=bfloat16",
        "--total_environment_frames=6000",
        "--log_interval_s=1",
        f"--logdir={tmp_path}",
    )
    try:
        out, _ = process.communicate(timeout=240)
        assert process.returncode == 0, out[-3000:]
        assert cli.wait_session_gone(process.pid) == []  # the actor and its env workers too
    finally:
        cli.kill_session(process.pid)
    frames = [json.loads(line)["frames"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert frames[-1] >= 6000
    assert "leaked" not in out  # no shared memory left for the resource tracker to clean up
