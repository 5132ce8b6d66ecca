"""The data-parallel learner (impala/distributed.py) as real processes: 2 ranks on the
CPU with gloo, launched by hand (the environment torchrun sets) and by torchrun, fed
fixed unrolls over the real wire."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from impala import address, checkpoint, distributed, security, unroll, wire
from impala.config import Config, ConfigError
from impala.learner import learn_step, learning_rate_at, state_sizes
from impala.metrics import read_jsonl
from impala.nets import make_agent
from impala.optim import RMSPropTF
from tests import cli

T, OBS, A = 5, (4,), 2  # CartPole-shaped unrolls
RANKS, BATCH, UPDATES = 2, 4, 4
FLAGS = dict(
    level_name="CartPole-v1",
    num_action_repeats=1,
    network="mlp",
    mlp_sizes="16",
    lstm_size=8,
    unroll_length=T,
    batch_size=BATCH,
    learning_rate=0.01,
    entropy_cost=0.01,
    max_grad_norm=0.0,
    total_environment_frames=UPDATES * BATCH * T,
    seed=3,
    learner_ranks=RANKS,
    log_interval_s=0.2,
    checkpoint_interval_s=1000.0,
    rank_timeout_s=20.0,
)


def _free_ports(count: int) -> int:
    """A port p such that p .. p + count - 1 are free on loopback right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + count >= 65535:
            continue
        try:
            held = []
            for p in range(port, port + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free ports")


def _flags(config: Config, port: int, **extra) -> list[str]:
    values = {name: getattr(config, name) for name in FLAGS} | {"logdir": config.logdir} | extra
    return [
        "--job_name=learner",
        f"--learner_address=tcp://127.0.0.1:{port}",
        *(f"--{k}={v}" for k, v in values.items()),
    ]


def _agent(config: Config):
    torch.manual_seed(1234)  # not the learners' seed: rank 1 must take rank 0's parameters
    agent = make_agent(config, OBS, A)
    return agent, RMSPropTF(
        agent.parameters(),
        lr=config.learning_rate,
        decay=config.decay,
        momentum=config.momentum,
        epsilon=config.epsilon,
    )


def _unrolls(spec: dict, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` distinct one-env unrolls of `spec` with random contents."""
    out = []
    for _ in range(count):
        arrays = unroll.new_unroll(spec, 1)
        arrays["observation"][:] = rng.normal(size=arrays["observation"].shape)
        arrays["reward"][:] = rng.normal(scale=2.0, size=arrays["reward"].shape)
        arrays["done"][:] = rng.random(arrays["done"].shape) < 0.2
        arrays["action"][:] = rng.integers(0, A, size=arrays["action"].shape)
        arrays["policy_logits"][:] = rng.normal(size=arrays["policy_logits"].shape)
        for name in spec:
            if name.startswith("core_state_"):
                arrays[name][:] = rng.normal(scale=0.3, size=arrays[name].shape)
        out.append(arrays)
    return out


def _send(port: int, unrolls: list[dict], logdir: Path) -> list[zmq.Socket]:
    """Sends update k's unrolls 4k .. 4k+3 as actor tasks 0..3: task i goes to rank
    i mod 2 by the address rule, so rank 0's batch k is [4k, 4k+2], rank 1's [4k+1, 4k+3]."""
    context = zmq.Context.instance()
    sockets = {}
    for task in range(BATCH):
        unroll_address, _ = address.learner_addresses(f"tcp://127.0.0.1:{port}", task, RANKS)
        if unroll_address not in sockets:
            s = context.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            # Loopback jobs use the automatic keys of their --logdir (docs/protocol.md).
            security.connect_securely(s, security.local_keys(logdir))
            s.connect(unroll_address)
            sockets[unroll_address] = s
    for i, arrays in enumerate(unrolls):
        task = i % BATCH
        unroll_address, _ = address.learner_addresses(f"tcp://127.0.0.1:{port}", task, RANKS)
        wire.send(sockets[unroll_address], "unroll", arrays, task=task, meta={"level": "CartPole-v1"})
    assert len(sockets) == RANKS
    return list(sockets.values())


def _combined(unrolls: list[dict], k: int) -> dict[str, torch.Tensor]:
    """The single learner's batch k: all four unrolls (rank 0's two, then rank 1's)."""
    parts = [unrolls[4 * k + i] for i in (0, 2, 1, 3)]
    batch = {}
    for name in parts[0]:
        axis = 0 if name.startswith("core_state_") else 1
        batch[name] = torch.from_numpy(np.concatenate([p[name] for p in parts], axis=axis))
    return batch


def _rank_env(rank: int, master_port: int) -> dict:
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(RANKS),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "PYTHONPATH": str(cli.ROOT),
    }


def _start_ranks(flags: list[str], master_port: int, tmp_path: Path, name: str) -> list[subprocess.Popen]:
    """The ranks as torchrun would start them: the same command, RANK etc. in the environment."""
    processes = []
    for rank in range(RANKS):
        with open(tmp_path / f"{name}-rank{rank}.log", "w") as log:  # the child keeps its own copy
            processes.append(
                subprocess.Popen(
                    cli.command(*flags),
                    cwd=cli.ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_rank_env(rank, master_port),
                    start_new_session=True,
                )
            )
    return processes


def _logs(tmp_path: Path, name: str) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob(f"{name}*.log")))


def _wait_rows(logdir: Path, frames: int, processes: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = logdir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(r["frames"] >= frames for r in read_jsonl(path)):
            return
        assert all(p.poll() is None for p in processes), "a rank exited early"
        time.sleep(0.2)
    raise AssertionError(f"no metrics row at {frames} frames")


def _finish(processes: list[subprocess.Popen], timeout: float = 180) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            cli.kill_session(p.pid)


def test_two_ranks_equal_one_learner_on_the_whole_batch_across_a_sigterm_and_torchrun_resume(tmp_path):
    """2 ranks x 2 envs for 4 updates == 1 learner x 4 envs, with a SIGTERM after update 2
    (both ranks stop at the same update, rank 0 checkpoints, all exit 0) and a resume by
    torchrun. Tolerance: rtol 1e-5, atol 1e-6 (parameters are O(0.1-1)): the ranks'
    float32 sums are added in another order than one learner's, which changes the last
    bits of each update (~1e-7 relative), and 4 RMSProp steps (epsilon 0.1 inside the
    square root) do not amplify that. An average instead of a sum of the gradients
    (DDP's default) misses by far more; the test checks that too."""
    logdir = tmp_path / "run"
    config = Config(**FLAGS, logdir=str(logdir))
    agent, optimizer = _agent(config)
    spec = unroll.unroll_spec(T, OBS, np.float32, A, state_sizes(agent))
    unrolls = _unrolls(spec, UPDATES * BATCH, np.random.default_rng(7))
    # The learners start from a checkpoint of these parameters; rank 0 restores it and
    # broadcasts it to rank 1 (whose own initialisation, from --seed, differs).
    checkpoint.save(
        logdir,
        {
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "frames": 0,
            "param_version": 0,
            "signature": checkpoint.network_signature(config, agent),
            "level_name": config.level_name,
        },
        0,
    )
    reference, averaged = _agent(config), _agent(config)
    for k in range(UPDATES):
        lr = learning_rate_at(k * config.frames_per_step, config)
        learn_step(*reference, _combined(unrolls, k), config, lr)
        learn_step(
            *averaged,
            _combined(unrolls, k),
            config,
            lr,
            all_reduce=lambda sums, means: [s.mul_(1 / RANKS) for s in sums],
        )

    # Phase 1: launched by hand, 2 updates, then SIGTERM to both ranks.
    port, master = _free_ports(RANKS + 1), _free_ports(1)
    ranks = _start_ranks(_flags(config, port), master, tmp_path, "phase1")
    sockets = _send(port, unrolls[: 2 * BATCH], logdir)
    try:
        _wait_rows(logdir, 2 * config.frames_per_step, ranks)
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        assert _finish(ranks) == [0, 0], _logs(tmp_path, "phase1")
    finally:
        for s in sockets:
            s.close()
    assert checkpoint.latest(logdir).name == f"ckpt-{2 * config.frames_per_step:013d}.pt", _logs(tmp_path, "phase1")

    # Phase 2: torchrun, resumed from that checkpoint, the last 2 updates.
    port = _free_ports(RANKS + 1)
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={RANKS}",
            "-m",
            "impala.experiment",
            *_flags(config, port),
        ],
        cwd=cli.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(cli.ROOT)},
        start_new_session=True,
    )
    sockets = _send(port, unrolls[2 * BATCH :], logdir)
    try:
        out, _ = run.communicate(timeout=300)
    finally:
        for s in sockets:
            s.close()
        cli.kill_session(run.pid)
    assert run.returncode == 0, out[-4000:]
    assert "Resumed from" in out
    final = checkpoint.load(checkpoint.latest(logdir))
    assert final["frames"] == UPDATES * config.frames_per_step
    assert final["param_version"] == UPDATES

    expected, wrong = reference[0].state_dict(), averaged[0].state_dict()
    far = 0.0
    for name, value in final["model"].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        far = max(far, float((value - wrong[name]).abs().max()))
    assert far > 1e-4, "averaged gradients would have passed: the test cannot tell a sum from a mean"
    # The optimizer's state too: the ranks' RMSProp saw the whole batch's gradients.
    ms = [s["ms"] for s in final["optimizer"]["state"].values()]
    ms_expected = [s["ms"] for s in reference[1].state_dict()["state"].values()]
    for got, want in zip(ms, ms_expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # Rank 0's rows count the frames of both ranks, and the actors of both.
    rows = read_jsonl(logdir / "metrics.jsonl")
    assert rows[-1]["frames"] == UPDATES * config.frames_per_step
    assert rows[-1]["connected_actors"] == BATCH, rows[-1]


def test_a_killed_rank_stops_the_run_with_a_checkpoint(tmp_path):
    logdir = tmp_path / "run"
    config = Config(**{**FLAGS, "total_environment_frames": 10**9, "rank_timeout_s": 10.0}, logdir=str(logdir))
    agent, _ = _agent(config)
    spec = unroll.unroll_spec(T, OBS, np.float32, A, state_sizes(agent))
    port, master = _free_ports(RANKS + 1), _free_ports(1)
    ranks = _start_ranks(_flags(config, port), master, tmp_path, "kill")
    sockets = _send(port, _unrolls(spec, BATCH, np.random.default_rng(1)), logdir)
    try:
        _wait_rows(logdir, config.frames_per_step, ranks)
        ranks[1].kill()
        status = ranks[0].wait(timeout=120)
    finally:
        for s in sockets:
            s.close()
        _finish(ranks, timeout=10)
    log = (tmp_path / "kill-rank0.log").read_text()
    assert status == 1, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("impala: error:")]
    assert len(errors) == 1 and "another rank is lost" in errors[0], log[-3000:]
    assert "Traceback" not in log
    saved = checkpoint.load(checkpoint.latest(logdir))
    assert saved["frames"] == config.frames_per_step


def test_ranks_stop_together_when_the_return_goal_is_reached(tmp_path):
    """--stop_at_return with 2 ranks: rank 0's progress log (both ranks' episodes) decides,
    the ranks stop at the same agreement, long before the frame budget, and exit 0 with
    rank 0's checkpoint at the frames of the row that reached the goal."""
    logdir = tmp_path / "run"
    config = Config(**{**FLAGS, "total_environment_frames": 10**9, "stop_at_return": "4.5"}, logdir=str(logdir))
    agent, _ = _agent(config)
    spec = unroll.unroll_spec(T, OBS, np.float32, A, state_sizes(agent))
    unrolls = _unrolls(spec, 8 * BATCH, np.random.default_rng(2))
    for arrays in unrolls:  # T episodes of return 5 per unroll: 160 in all, 100 by update 5
        arrays["done"][:] = True
        arrays["episode_return"][:] = 5.0
        arrays["episode_step"][:] = 1
    port, master = _free_ports(RANKS + 1), _free_ports(1)
    ranks = _start_ranks(_flags(config, port, stop_at_return="4.5"), master, tmp_path, "goal")
    sockets = _send(port, unrolls, logdir)
    try:
        assert _finish(ranks, timeout=120) == [0, 0], _logs(tmp_path, "goal")
    finally:
        for s in sockets:
            s.close()
    log = (tmp_path / "goal-rank0.log").read_text()
    assert "at least --stop_at_return=4.5: stopping" in log, log[-3000:]
    rows = read_jsonl(logdir / "metrics.jsonl")
    assert sum(r["episodes"] for r in rows) >= 100 and rows[-1]["mean_episode_return"] == 5.0
    saved = checkpoint.load(checkpoint.latest(logdir))
    assert 0 < saved["frames"] == rows[-1]["frames"] <= 8 * config.frames_per_step


def _agreement_rank(rank: int, master_port: int, out: str) -> None:
    """One rank of test_ranks_decide_together (a spawned process)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(RANKS),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
    )
    config = Config(**{**FLAGS, "use_lstm": False})
    ranks = distributed.Ranks.from_environment(config)
    ranks.start(torch.device("cpu"))
    torch.manual_seed(0)
    agent = make_agent(config, OBS, A)
    optimizer = RMSPropTF(agent.parameters(), lr=config.learning_rate)
    spec = unroll.unroll_spec(T, OBS, np.float32, A)
    results = {}
    for step, poison in (("clean", False), ("poisoned", rank == 1)):
        batch = _combined(_unrolls(spec, BATCH, np.random.default_rng([rank, len(results)])), 0)
        if poison:  # one rank's batch has a NaN reward: its loss is NaN, the others' are not
            batch["reward"][1, 0] = float("nan")
        stats = learn_step(agent, optimizer, batch, config, all_reduce=ranks.all_reduce)
        results[step] = (stats["skipped"], stats["total_loss"], [p.detach().clone() for p in agent.parameters()])
    results["agree"] = [
        ranks.agree(have_batch=rank == 0, stop=False, log=False),
        ranks.agree(have_batch=True, stop=rank == 1, log=rank == 0),
    ]
    ranks.close()
    torch.save(results, out.format(rank))


def test_ranks_decide_together(tmp_path):
    """Real processes and gloo: after a clean update the ranks' parameters are identical;
    a non-finite loss on one rank skips the update on all (parameters untouched); a rank
    without a batch holds all back, a stop or a log on one rank is everyone's. Three runs,
    each rank exiting right after its last collective: before close() waited for gloo's
    workers to drop that collective's tensors, about one run in seven on an idle machine
    ended with a rank killed by SIGABRT at exit."""
    for run in range(3):
        out = str(tmp_path / f"run{run}-rank{{}}.pt")
        torch.multiprocessing.spawn(_agreement_rank, args=(_free_ports(1), out), nprocs=RANKS)
        results = [torch.load(out.format(r), weights_only=False) for r in range(RANKS)]
        for r in results:
            assert r["clean"][0] == 0.0 and r["poisoned"][0] == 1.0
            assert np.isnan(r["poisoned"][1])  # the summed loss: NaN on the rank whose own loss was finite too
            for before, after in zip(r["clean"][2], r["poisoned"][2], strict=True):
                assert torch.equal(before, after)
            assert r["agree"] == [
                distributed.Agreement(train=False, stop=False, log=False),
                distributed.Agreement(train=True, stop=True, log=True),
            ]
        assert results[0]["clean"][1] == results[1]["clean"][1]  # the whole batch's loss on both
        for a, b in zip(results[0]["clean"][2], results[1]["clean"][2], strict=True):
            assert torch.equal(a, b)


def test_rank_settings_that_cannot_work_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        Config(batch_size=3, learner_ranks=2)
    # --learner_ranks=2 without torchrun: one line, status 2.
    result = cli.run(
        "--job_name=learner",
        "--learner_ranks=2",
        f"--logdir={tmp_path}",
        "--learner_address=tcp://127.0.0.1:7000",
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout.strip().splitlines()[-1].startswith("impala: error: --learner_ranks=2 but this learner")


def test_actor_tasks_are_spread_over_the_ranks_by_the_address_rule():
    base = "tcp://10.0.0.5:5000"
    assert address.learner_addresses(base) == ("tcp://10.0.0.5:5000", "tcp://10.0.0.5:5001")
    got = [address.learner_addresses(base, task, 3) for task in range(6)]
    assert [u for u, _ in got] == ["tcp://10.0.0.5:5000", "tcp://10.0.0.5:5002", "tcp://10.0.0.5:5003"] * 2
    assert {p for _, p in got} == {"tcp://10.0.0.5:5001"}  # parameters always from rank 0
