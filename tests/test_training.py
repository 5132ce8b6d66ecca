"""End to end: the real program, real actor processes, real ZeroMQ sockets."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from impala import checkpoint
from impala.metrics import EpisodeWindow, read_jsonl
from tests import cli

RANDOM_CARTPOLE_RETURN = 22  # mean episode return of a uniform random policy
CARTPOLE = ["--flagfile=configs/cartpole.cfg", "--log_interval_s=1"]
# The learning tests' budget: at 200k frames one full-suite run was still climbing (returns 10.7,
# 10.0, 20.4, 60.4 against 4x random, 88); most runs are at 120-250 there.
LEARN_FRAMES = 400000


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    logdir = tmp_path_factory.mktemp("cartpole")
    result = cli.run(*CARTPOLE, f"--logdir={logdir}", f"--total_environment_frames={LEARN_FRAMES}")
    return logdir, result


def test_cartpole_learns_well_above_random(trained):
    logdir, result = trained
    assert result.returncode == 0, result.stdout[-3000:]
    rows = read_jsonl(logdir / "metrics.jsonl")
    for key in (
        "frames",
        "sps",
        "mean_episode_return",
        "total_loss",
        "pg_loss",
        "baseline_loss",
        "entropy_loss",
        "policy_lag",
    ):
        assert key in rows[-1], key
    frames = [r["frames"] for r in rows]
    assert frames == sorted(frames) and frames[-1] >= LEARN_FRAMES
    returns = [r["mean_episode_return"] for r in rows if r["mean_episode_return"] is not None]
    assert returns[0] < 3 * RANDOM_CARTPOLE_RETURN, returns  # it starts near random...
    assert max(returns[-3:]) > 4 * RANDOM_CARTPOLE_RETURN, returns  # ...and learns
    assert checkpoint.latest(logdir) is not None
    assert any((logdir / "tensorboard").iterdir())
    assert "steps/s" in result.stdout and "return" in result.stdout
    assert "frames/s" in result.stdout and "agent steps/s" in result.stdout  # both rates, each named


def test_cartpole_learns_with_a_bfloat16_learner(tmp_path):
    """--learner_dtype=bfloat16 (issue 13): the forward pass in bfloat16, V-trace and
    the update in float32; the same run still learns, and publishes as it goes."""
    result = cli.run(
        *CARTPOLE, f"--logdir={tmp_path}", f"--total_environment_frames={LEARN_FRAMES}", "--learner_dtype=bfloat16"
    )
    assert result.returncode == 0, result.stdout[-3000:]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    returns = [r["mean_episode_return"] for r in rows if r["mean_episode_return"] is not None]
    assert max(returns[-3:]) > 4 * RANDOM_CARTPOLE_RETURN, returns
    assert sum(r.get("skipped_updates") or 0 for r in rows) == 0
    assert any(r.get("policy_lag") is not None for r in rows)  # unrolls from this run's published parameters


def test_rows_hold_vtrace_diagnostics_and_episodes_in_frames(trained):
    """Issue 16's V-trace diagnostics in every row with updates, issue 17's episode
    lengths in frames, and in TensorBoard every episode and the actions taken."""
    logdir, _ = trained
    rows = [r for r in read_jsonl(logdir / "metrics.jsonl") if "total_loss" in r]
    assert rows
    for r in rows:
        assert 0 < r["vtrace/mean_rho"] < 10, r
        for key in ("vtrace/rho_clipped", "vtrace/pg_rho_clipped"):
            assert 0 <= r[key] <= 1, (key, r)
        assert r["vtrace/mean_abs_vs_minus_value"] >= 0
        assert r["skipped_updates"] == 0
    assert any(0 < r["vtrace/rho_clipped"] < 1 for r in rows)
    with_episodes = [r for r in rows if r["episodes"]]
    assert with_episodes
    for r in with_episodes:  # cartpole.cfg has --num_action_repeats=1: a frame per agent step
        assert r["mean_episode_frames"] == pytest.approx(r["mean_episode_length"]) and r["mean_episode_frames"] >= 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert "CartPole-v1/episode_return" in tags["scalars"] and "CartPole-v1/episode_frames" in tags["scalars"]
    episodes = events.Scalars("CartPole-v1/episode_return")
    assert len(episodes) == sum(r["episodes"] for r in read_jsonl(logdir / "metrics.jsonl"))
    assert "actions" in tags["histograms"]
    histogram = events.Histograms("actions")[-1].histogram_value
    assert histogram.num > 0 and histogram.min >= 0 and histogram.max <= 1  # CartPole's two actions


def test_metrics_say_where_the_time_goes(trained):
    """Each row has the seconds per second the learner's threads and the actors
    spent per part (scripts/bench.py prints them); busy parts are there, and no
    single-threaded part can be busy for more than the wall time."""
    rows = [r for r in read_jsonl(trained[0] / "metrics.jsonl") if r["frames"] > 0][1:]
    assert rows
    for part in (
        "learner_step",
        "learner_wait",
        "learner_receive",
        "learner_publish",
        "actor_env",
        "actor_inference",
        "actor_send",
    ):
        assert any((r.get(f"time/{part}") or 0) > 0 for r in rows), part
    for r in rows:
        for part in ("learner_step", "learner_wait", "learner_publish", "learner_receive"):
            assert 0 <= (r.get(f"time/{part}") or 0) <= 1.05, (part, r)
        # The training thread either waits for a batch, learns or publishes.
        assert r.get("time/learner_wait", 0) + r.get("time/learner_step", 0) <= 1.05
    learning = sum(r.get("time/learner_step", 0) for r in rows)
    assert learning > 0.1 * len(rows)  # CartPole's learner is busy a good part of the time


def test_run_resumes_from_its_checkpoint(trained, tmp_path):
    logdir = tmp_path / "resume"
    shutil.copytree(trained[0], logdir)
    before = checkpoint.load(checkpoint.latest(logdir))["frames"]
    result = cli.run(*CARTPOLE, f"--logdir={logdir}", f"--total_environment_frames={before + 20000}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Resumed from" in result.stdout
    after = checkpoint.load(checkpoint.latest(logdir))
    assert before + 20000 <= after["frames"] < before + 40000  # continued, not restarted
    assert after["param_version"] > 0
    frames = [r["frames"] for r in read_jsonl(logdir / "metrics.jsonl")]
    assert frames == sorted(frames)


def test_a_run_stops_at_its_return_goal_with_a_checkpoint_there(tmp_path):
    """--stop_at_return: training ends at the row where the mean of the last 100
    episodes (as scripts/run_summary.py counts them) first reaches the goal, far
    before the frame budget, and the last checkpoint is at that row's frames. The same
    command again resumes there, finds the goal reached (its rows say so) and stops
    without training."""
    goal = 3 * RANDOM_CARTPOLE_RETURN
    command = (*CARTPOLE, f"--logdir={tmp_path}", "--total_environment_frames=5000000", f"--stop_at_return={goal}")
    result = cli.run(*command)
    assert result.returncode == 0, result.stdout[-3000:]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    window, first = EpisodeWindow(100), None  # the rows' running mean, as run_summary.py counts it
    for i, row in enumerate(rows):
        if row["episodes"] and row["mean_episode_return"] is not None:
            window.add(row["mean_episode_return"], row["episodes"])
        if first is None and window.full and window.mean >= goal:
            first = i
    assert first == len(rows) - 1 and rows[-1]["frames"] < 5000000, (first, len(rows))
    saved = checkpoint.load(checkpoint.latest(tmp_path))
    assert saved["frames"] == rows[-1]["frames"]
    assert f"at least --stop_at_return={goal}: stopping" in result.stdout

    again = cli.run(*command)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Resumed from" in again.stdout and "stopping" in again.stdout
    assert checkpoint.load(checkpoint.latest(tmp_path))["frames"] == saved["frames"]
    assert read_jsonl(tmp_path / "metrics.jsonl") == rows


def test_checkpoint_of_another_network_is_refused_and_kept(trained, tmp_path):
    logdir = tmp_path / "other"
    shutil.copytree(trained[0], logdir)
    path = checkpoint.latest(logdir)
    content = path.read_bytes()
    result = subprocess.run(
        cli.command(*CARTPOLE, f"--logdir={logdir}", "--mlp_sizes=32"),
        cwd=cli.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "different network" in result.stderr and "mlp_sizes" in result.stderr
    assert checkpoint.list_checkpoints(logdir) == [path] and path.read_bytes() == content


def _wait_for_metrics(
    logdir: Path,
    process: subprocess.Popen,
    rows: int = 1,
    timeout: float = 120,
    until: Callable[[list[dict]], bool] = lambda _: True,
) -> None:
    """Waits until at least `rows` metrics rows with frames are written and `until`
    holds for those rows (oldest first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        path = logdir / "metrics.jsonl"
        written = [r for r in read_jsonl(path) if r["frames"] > 0] if path.exists() else []
        if len(written) >= rows and until(written):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {rows} metrics rows as awaited within {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_checkpoints_and_leaves_no_process(tmp_path, signum):
    # Started with SIGINT ignored, as a shell starts background jobs: Ctrl-C must still work.
    process = cli.start(
        *CARTPOLE,
        f"--logdir={tmp_path}",
        "--total_environment_frames=100000000",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        _wait_for_metrics(tmp_path, process)
        os.kill(process.pid, signum)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out[-3000:]
        assert cli.wait_session_gone(process.pid) == []
        saved = checkpoint.load(checkpoint.latest(tmp_path))
        assert saved["frames"] > 0
    finally:
        cli.kill_session(process.pid)


def test_a_stop_signal_whose_exception_is_lost_still_stops_an_actor():
    """SIGTERM's KeyboardInterrupt can be raised where Python drops it (a ZeroMQ frame's
    __dealloc__, "Exception ignored in ...": seen once in the compose run, where the
    actor then waited for its gone learner until killed). The handler also sets
    experiment.STOP_REQUESTED, which main passes to run_actor as its stop: a real actor
    with no learner to wait for returns instead of waiting on."""
    from impala import experiment
    from impala.actor import run_actor
    from impala.config import Config

    experiment.STOP_REQUESTED.clear()
    try:
        try:
            experiment._interrupt(signal.SIGTERM, None)
        except KeyboardInterrupt:
            pass  # what "Exception ignored in ..." amounts to
        assert experiment.STOP_REQUESTED.is_set()
        config = Config(level_name="CartPole-v1", network="mlp", use_lstm=False, num_envs_per_actor=1)
        nowhere = "tcp://127.0.0.1:9"  # no learner: run_actor would wait for one
        actor = threading.Thread(
            target=run_actor, args=(config, 0, nowhere, nowhere), kwargs=dict(stop=experiment.STOP_REQUESTED)
        )
        actor.start()
        actor.join(timeout=60)
        assert not actor.is_alive()
    finally:
        experiment.STOP_REQUESTED.clear()
    source = Path(experiment.__file__).read_text()
    assert "run_actor(config, config.task, unroll_address, params_address, stop=STOP_REQUESTED)" in source


def _actor_pids(sid: int) -> list[int]:
    pids = []
    for pid in cli.session_pids(sid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def _wait_for_output(lines: queue.Queue, wanted: list[str], timeout: float = 120) -> None:
    """Reads the program's output lines from `lines` until each of `wanted` has been
    seen, in order."""
    deadline, seen = time.monotonic() + timeout, []
    for text in wanted:
        while not seen or text not in seen[-1]:
            try:
                seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no {text!r} in the output:\n" + "".join(seen)[-3000:]) from None


def test_a_killed_actor_is_replaced_and_training_goes_on(tmp_path):
    # No frame budget to race: on a loaded machine a restart can take longer than a short
    # run has left. The run goes on until the learner has seen the actor back and trained
    # past that point, then stops on SIGTERM.
    process = cli.start(*CARTPOLE, "--num_actors=2", f"--logdir={tmp_path}", "--total_environment_frames=100000000")
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    try:
        # Both actors must have been heard from: one the learner never saw comes back as
        # "connected", not "back".
        _wait_for_metrics(tmp_path, process, until=lambda rows: rows[-1]["connected_actors"] >= 2)
        actors = _actor_pids(process.pid)
        assert len(actors) == 2
        os.kill(actors[0], signal.SIGKILL)
        _wait_for_output(lines, ["restarting it", "is back"])  # the learner saw it return
        rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["frames"] > 0]
        _wait_for_metrics(tmp_path, process, rows=len(rows) + 2)
        assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["frames"] > rows[-1]["frames"]
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert cli.wait_session_gone(process.pid) == []
    finally:
        cli.kill_session(process.pid)


def test_launcher_killed_takes_its_actors_with_it(tmp_path):
    process = cli.start(*CARTPOLE, f"--logdir={tmp_path}", "--total_environment_frames=100000000")
    try:
        _wait_for_metrics(tmp_path, process)
        actors = _actor_pids(process.pid)
        assert actors
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in actors):
            assert time.monotonic() < deadline, "actors outlived a SIGKILLed launcher"
            time.sleep(0.1)
    finally:
        cli.kill_session(process.pid)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--bogus_flag=1"], "bogus_flag"),
        (["--level_name=CartPole-v9"], "CartPole-v1"),
        (["--level_name=ALE/Pongg-v5"], "ALE/Pong-v5"),
        (["--level_name=Pendulum-v1"], "Discrete"),
        (["--batch_size=0"], "batch_size"),
        (["--reward_clipping=sometimes"], "reward_clipping"),
        (["--learning_rate=nan"], "--learning_rate must be a finite number"),
        (["--decay=1.5"], "--decay"),
        (["--vtrace_lambda=1.5"], "--vtrace_lambda must be in [0.0, 1.0], got 1.5"),
        (["--stop_at_return=twenty"], "--stop_at_return must be a number or empty, got 'twenty'"),
        (["--stop_at_return=inf"], "--stop_at_return must be a number"),
        # 16 envs: batches of at most 16 rows unless a maximum is given.
        (
            ["--num_envs_per_actor=16", "--env_workers_per_actor=2", "--inference_minimum_batch_size=17"],
            "inference_minimum_batch_size",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(flags, expected, tmp_path):
    result = subprocess.run(
        cli.command(f"--logdir={tmp_path}", *flags), cwd=cli.ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert expected in result.stderr


def test_a_network_that_does_not_fit_the_level_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        cli.command(f"--logdir={tmp_path}", "--level_name=ALE/Pong-v5", "--network=mlp"),
        cwd=cli.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    # ale-py prints its banner before (issue 19); the error itself is the one last line.
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("impala: error: --network=mlp does not fit ALE/Pong-v5: the mlp torso needs vector observations")
    ), result.stderr


def test_bad_logdirs_are_one_line_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    for logdir in (a_file, a_file / "below"):
        result = subprocess.run(
            cli.command(f"--logdir={logdir}"), cwd=cli.ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "--logdir" in result.stderr
    assert a_file.read_text() == "not a directory"


def test_a_failing_learner_thread_ends_the_run_with_one_line_and_a_checkpoint(tmp_path):
    """The real program, its actor processes and sockets, with a failure injected
    into the learner's unroll socket (the actors are spawned fresh, unpatched). A
    failure outside one message's handling ends the run (one that handles a message
    only drops it: test_learner.py)."""
    inject = (
        "import sys, zmq; from impala import wire\n"
        "real = wire.recv_routed\n"
        "def broken(socket, **kwargs):\n"
        "    if kwargs.get('allowed_kinds') == ('unroll',):\n"
        "        raise zmq.ZMQError(zmq.ENOTSOCK, 'injected failure')\n"
        "    return real(socket, **kwargs)\n"
        "wire.recv_routed = broken\n"
        "from impala import experiment; sys.argv[0] = 'impala'; experiment.run_main()"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", inject, *CARTPOLE, f"--logdir={tmp_path}", "--total_environment_frames=100000000"],
        cwd=cli.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 1, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("impala: error: the learner's unrolls thread failed: ZMQError: injected"), last
        assert "Traceback" not in err
        assert checkpoint.latest(tmp_path) is not None
        assert cli.wait_session_gone(process.pid) == []
    finally:
        cli.kill_session(process.pid)
