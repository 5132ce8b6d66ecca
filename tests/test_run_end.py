"""A multi-host run ends (issue 19, item 1), and a refused actor says why it waits
(item 3): real learner and actor processes over TCP on loopback.

A learner that reaches --total_environment_frames answers every parameter request
'finished' for a grace period, and its actors exit 0; a learner that is killed sends
nothing, so its actors keep waiting for it and carry on with the learner started
again."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from impala import checkpoint
from tests import cli
from tests.test_distributed import (
    BIG_BUDGET,
    CARTPOLE,
    Jobs,
    _frames_after,
    _free_port_pair,
    _make_keys,
    _wait,
)

SMALL_BUDGET = "--total_environment_frames=20000"


@pytest.fixture
def jobs(tmp_path):
    j = Jobs(tmp_path)
    yield j
    j.close()


def _wait_exit(process: subprocess.Popen, what: str) -> int:
    _wait(lambda: process.poll() is not None, what, timeout=180)
    return process.returncode


def test_a_learner_that_finishes_ends_its_actors(jobs, tmp_path):
    port = _free_port_pair()
    address = f"--learner_address=tcp://127.0.0.1:{port}"
    logdir = f"--logdir={tmp_path / 'run'}"  # loopback jobs share the keys made there (docs/protocol.md)
    # One actor waits for the learner from before it starts, one joins it running.
    early = jobs.start("actor0", *CARTPOLE, "--job_name=actor", "--task=0", address, logdir)
    learner = jobs.start("learner", *CARTPOLE, "--job_name=learner", address, logdir, SMALL_BUDGET)
    late = jobs.start("actor1", *CARTPOLE, "--job_name=actor", "--task=1", address, logdir)
    assert _wait_exit(learner, "the learner to finish") == 0, jobs.log(learner)[-3000:]
    assert "Run finished" in jobs.log(learner)
    for actor in (early, late):
        status = _wait_exit(actor, "the actors to exit")
        assert status == 0, jobs.log(actor)[-3000:]
        assert "the run is finished" in jobs.log(actor)


def test_actors_outlive_a_killed_learner_and_end_with_the_one_started_again(jobs, tmp_path):
    port = _free_port_pair()
    address = f"--learner_address=tcp://127.0.0.1:{port}"
    logdir = tmp_path / "run"
    learner = jobs.start(
        "learner",
        *CARTPOLE,
        "--job_name=learner",
        address,
        f"--logdir={logdir}",
        BIG_BUDGET,
        "--checkpoint_interval_s=1",
    )
    actors = [
        jobs.start(f"actor{t}", *CARTPOLE, "--job_name=actor", f"--task={t}", address, f"--logdir={logdir}")
        for t in (0, 1)
    ]
    _wait(lambda: _frames_after(logdir, 0, actors=2), "two actors training", alive=[learner, *actors], jobs=jobs)
    _wait(lambda: checkpoint.latest(logdir), "a checkpoint")
    learner.kill()  # no 'finished': the learner merely died
    learner.wait()
    saved = checkpoint.load(checkpoint.latest(logdir))["frames"]
    # Nothing told them the run is over: they wait (unroll sends and parameter requests
    # unanswered) through several of their request intervals.
    _wait(
        lambda: all("has taken no unroll" in jobs.log(a) for a in actors),
        "the actors to notice",
        alive=actors,
        jobs=jobs,
    )
    again = jobs.start(
        "learner-again",
        *CARTPOLE,
        "--job_name=learner",
        address,
        f"--logdir={logdir}",
        f"--total_environment_frames={saved + 20000}",
    )
    assert _wait_exit(again, "the learner started again to finish") == 0, jobs.log(again)[-3000:]
    assert "Resumed from" in jobs.log(again)
    for actor in actors:
        assert _wait_exit(actor, "the actors to exit") == 0, jobs.log(actor)[-3000:]
        log = jobs.log(actor)
        assert "learner restarted" in log and "the run is finished" in log


def test_a_refused_actor_says_its_key_was_probably_refused(jobs, tmp_path):
    keys = _make_keys(tmp_path / "keys")
    other = _make_keys(tmp_path / "other")  # a pair of another learner: not authorized by this one
    (other / "learner.key").write_bytes((keys / "learner.key").read_bytes())  # but it knows this learner
    port = _free_port_pair()
    address = f"--learner_address=tcp://127.0.0.1:{port}"
    learner = jobs.start(
        "learner",
        *CARTPOLE,
        "--job_name=learner",
        address,
        f"--logdir={tmp_path / 'run'}",
        BIG_BUDGET,
        f"--keys_dir={keys}",
    )
    refused = jobs.start("refused", *CARTPOLE, "--job_name=actor", "--task=1", address, f"--keys_dir={other}")
    _wait(
        lambda: "refused this actor's CurveZMQ key" in jobs.log(refused),
        "the refused actor to say why",
        alive=[learner, refused],
        jobs=jobs,
    )
    assert "Refused a connection" in jobs.log(learner)
    # An actor with an authorized key is not told that.
    good = jobs.start("actor", *CARTPOLE, "--job_name=actor", "--task=0", address, f"--keys_dir={keys}")
    _wait(
        lambda: _frames_after(tmp_path / "run", 0),
        "the keyed actor to train",
        alive=[learner, good, refused],
        jobs=jobs,
    )
    assert "refused" not in jobs.log(good)


def _shell_launch() -> tuple[str, str]:
    """The learner and actor commands of docs/distributed.md, section 2 ("Plain shell")."""
    text = (cli.ROOT / "docs" / "distributed.md").read_text()
    section = text.split("## 2. Plain shell", 1)[1].split("\n## ", 1)[0]
    learner, actors = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return learner, actors


def test_the_documented_shell_launch_ends_by_itself(tmp_path):
    """docs/distributed.md's shell launch on one machine: keys made as its section 1
    says, the learner and the actor loop as written, except for what one machine and a
    test need (CartPole with a small budget instead of Pong, 2 actors instead of 16, a
    free port, this host for the learner's name). Both end by themselves."""
    learner, actors = _shell_launch()
    port = _free_port_pair()
    changes = [
        ("configs/pong.cfg", f"configs/cartpole.cfg {SMALL_BUDGET} --num_envs_per_actor=4"),
        ("/data/impala/pong", str(tmp_path / "run")),
        ("5555", str(port)),
        ("learner-host.example.org", "127.0.0.1"),
        ("seq 0 15", "seq 0 1"),
    ]
    for old, new in changes:
        assert old in learner + actors, f"docs/distributed.md no longer has {old!r}; update this test"
        learner, actors = learner.replace(old, new), actors.replace(old, new)
    (tmp_path / "configs").symlink_to(cli.ROOT / "configs")
    script = "\n".join(
        [
            "set -e",
            f'python() {{ "{cli.command()[0]}" "$@"; }}',  # this interpreter
            "python -m impala.security --keys_dir=keys",
            "(",
            learner.strip(),
            ") > learner.log 2>&1 &",
            "learner=$!",
            "(",
            actors.strip(),
            ") > actors.log 2>&1",
            'wait "$learner"',
        ]
    )
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(cli.ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        cli.kill_session(process.pid)
    logs = {name: (tmp_path / name).read_text() for name in ("learner.log", "actors.log")}
    assert process.returncode == 0, (out, {k: v[-2000:] for k, v in logs.items()})
    assert "Run finished" in logs["learner.log"]
    assert logs["actors.log"].count("the run is finished") == 2
    assert not cli.session_pids(process.pid)
