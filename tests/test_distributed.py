"""Multi-host jobs as real processes over TCP on loopback (and, where the machine
allows, over a veth link between network namespaces): faults, hostile traffic,
and who may connect."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

from impala import checkpoint, security, wire
from impala.metrics import read_jsonl
from tests import cli

CARTPOLE = ["--flagfile=configs/cartpole.cfg", "--log_interval_s=0.5", "--num_envs_per_actor=4"]
BIG_BUDGET = "--total_environment_frames=1000000000"


def _free_port_pair() -> int:
    """A port p such that p and p + 1 are free on loopback right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65534:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


class Jobs:
    """Starts learner and actor jobs in their own sessions; kills them all at the end."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}

    def start(self, name: str, *flags: str, env: dict | None = None, prefix: list[str] = ()) -> subprocess.Popen:
        log = self.tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.log"
        handle = open(log, "w")
        process = subprocess.Popen(
            [*prefix, *cli.command(*flags)],
            cwd=cli.ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.processes.append(process)
        self.logs[process.pid] = log
        return process

    def log(self, process: subprocess.Popen) -> str:
        return self.logs[process.pid].read_text()

    def close(self) -> None:
        for process in self.processes:
            cli.kill_session(process.pid)
            process.wait()


@pytest.fixture
def jobs(tmp_path):
    j = Jobs(tmp_path)
    yield j
    j.close()


def _rows(logdir: Path) -> list[dict]:
    path = logdir / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


def _wait(predicate, what: str, timeout: float = 120.0, alive: list[subprocess.Popen] = (), jobs=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in alive:
            if process.poll() is not None:
                raise AssertionError(f"{what}: a job exited early:\n{jobs.log(process)[-3000:] if jobs else ''}")
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _frames_after(logdir: Path, frames: int, actors: int = 1):
    rows = [r for r in _rows(logdir) if r["frames"] > frames and r.get("connected_actors", 0) >= actors]
    return rows[-1] if rows else None


def test_learner_and_actors_survive_kills_and_restarts(jobs, tmp_path):
    port = _free_port_pair()
    address = f"--learner_address=tcp://127.0.0.1:{port}"
    logdir = tmp_path / "run"
    learner_flags = [
        *CARTPOLE,
        "--job_name=learner",
        address,
        f"--logdir={logdir}",
        BIG_BUDGET,
        "--checkpoint_interval_s=1",
    ]
    # An actor started before its learner waits and retries.
    # On loopback both jobs take the automatic keys of their --logdir (docs/protocol.md).
    actor0 = jobs.start("actor0", *CARTPOLE, "--job_name=actor", "--task=0", address, f"--logdir={logdir}")
    time.sleep(3)
    learner = jobs.start("learner", *learner_flags)
    actor1 = jobs.start("actor1", *CARTPOLE, "--job_name=actor", "--task=1", address, f"--logdir={logdir}")
    _wait(lambda: _frames_after(logdir, 0, actors=2), "two actors training", alive=[learner, actor0, actor1], jobs=jobs)
    assert "waiting for the learner" in jobs.log(actor0)

    # SIGKILL an actor (mid-unroll, whatever it was doing): the learner carries on.
    actor0.kill()
    actor0.wait()
    frames = _rows(logdir)[-1]["frames"]
    _wait(lambda: _frames_after(logdir, frames + 20000), "training without actor 0", alive=[learner, actor1], jobs=jobs)
    assert _rows(logdir)[-1]["actor_unrolls_per_s/0"] == 0
    # The same task rejoins.
    frames = _rows(logdir)[-1]["frames"]
    actor0 = jobs.start("actor0-again", *CARTPOLE, "--job_name=actor", "--task=0", address, f"--logdir={logdir}")
    _wait(
        lambda: [r for r in _rows(logdir) if r["frames"] > frames and r.get("actor_unrolls_per_s/0", 0) > 0],
        "actor 0 to rejoin",
        alive=[learner, actor0, actor1],
        jobs=jobs,
    )

    # SIGKILL the learner; start it again on the same logdir while the actors run on.
    _wait(lambda: checkpoint.latest(logdir), "a checkpoint")
    learner.kill()
    learner.wait()
    saved = checkpoint.load(checkpoint.latest(logdir))["frames"]
    time.sleep(2)
    learner = jobs.start("learner-again", *learner_flags)
    # The killed learner's rows past its checkpoint can already be past saved + 20000:
    # the new one drops them when it resumes, so wait for that first.
    _wait(lambda: "Resumed from" in jobs.log(learner), "the new learner to resume", alive=[learner], jobs=jobs)
    row = _wait(
        lambda: _frames_after(logdir, saved + 20000, actors=2),
        "actors to reconnect to the new learner",
        alive=[learner, actor0, actor1],
        jobs=jobs,
    )
    log = jobs.log(learner)
    assert "Resumed from" in log
    assert actor1.poll() is None and actor0.poll() is None  # never restarted
    _wait(lambda: "learner restarted" in jobs.log(actor1), "actor 1 to take the new learner's parameters", timeout=30)
    frames = [r["frames"] for r in _rows(logdir)]
    assert frames == sorted(frames), "metrics frames must stay monotonic across a learner restart"
    assert row["policy_lag"] is None or row["policy_lag"] >= 0


def _hostile_messages(good: list) -> list[list[bytes]]:
    [frame] = good  # docs/protocol.md: header length, msgpack header, arrays from the next multiple of 8
    size = int.from_bytes(frame[:4], "little")
    header = msgpack.unpackb(frame[4 : 4 + size])
    arrays = frame[4 + size + -(4 + size) % 8 :]

    def with_header(**changes) -> list[bytes]:
        raw = msgpack.packb({**header, **changes})
        start = len(raw).to_bytes(4, "little") + raw
        return [start + bytes(-len(start) % 8) + arrays]

    return [
        [os.urandom(64)],
        [b"\x93\x01"],  # truncated msgpack
        with_header(v=999),  # a future protocol version
        with_header(proto="other"),  # a foreign protocol
        with_header(arrays=[[n, "object", s] for n, _, s in header["arrays"]]),
        with_header(arrays=[[n, d, [s[0] + 1, *s[1:]]] for n, d, s in header["arrays"]]),  # shapes that do not match
        wire.encode("unroll", {"reward": np.zeros((21, 1), np.float32)}),  # a valid message, wrong layout
        wire.encode("get_params", {}),  # a foreign kind on the unroll socket
    ]


def test_hostile_traffic_is_dropped_and_counted(jobs, tmp_path):
    port = _free_port_pair()
    address = f"tcp://127.0.0.1:{port}"
    logdir = tmp_path / "run"
    learner = jobs.start(
        "learner",
        *CARTPOLE,
        "--job_name=learner",
        f"--learner_address={address}",
        f"--logdir={logdir}",
        BIG_BUDGET,
        "--max_message_mb=1",
    )
    actor = jobs.start(
        "actor", *CARTPOLE, "--job_name=actor", "--task=0", f"--learner_address={address}", f"--logdir={logdir}"
    )
    _wait(lambda: _frames_after(logdir, 0), "training", alive=[learner, actor], jobs=jobs)

    context = zmq.Context.instance()
    peer = context.socket(zmq.DEALER)
    security.connect_securely(peer, str(logdir / "keys"))  # a peer with the run's keys that sends garbage
    peer.setsockopt(zmq.LINGER, 0)
    peer.setsockopt(zmq.SNDHWM, 100000)
    peer.connect(address)
    good = wire.encode("unroll", {"reward": np.zeros((21, 1), np.float32)})
    good = [bytes(f) for f in good]
    hostile = _hostile_messages(good)
    for frames in hostile:
        peer.send_multipart(frames)
    for _ in range(3000):  # a flood of garbage from one peer
        peer.send_multipart([os.urandom(32)])
    oversized = context.socket(zmq.DEALER)  # over --max_message_mb: ZeroMQ cuts this peer off
    oversized.setsockopt(zmq.LINGER, 0)
    security.connect_securely(oversized, str(logdir / "keys"))
    oversized.connect(address)
    oversized.send_multipart([good[0] + b"\x00" * (2 * 2**20)])
    try:
        expected = len(hostile) + 3000
        row = _wait(
            lambda: next((r for r in reversed(_rows(logdir)) if r["bad_messages"] >= expected), None),
            "the bad messages to be counted",
            alive=[learner, actor],
            jobs=jobs,
        )
        assert row["bad_messages"] == expected
        # ...and the learner keeps serving the honest actor.
        _wait(
            lambda: _frames_after(logdir, row["frames"] + 20000),
            "training after the attack",
            alive=[learner, actor],
            jobs=jobs,
        )
        assert "Dropped a bad message" in jobs.log(learner)
    finally:
        peer.close()
        oversized.close()


def _make_keys(path: Path) -> Path:
    result = subprocess.run(
        cli.command()[:2] + ["impala.security", f"--keys_dir={path}"],
        cwd=cli.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return path


def test_only_actors_with_the_right_key_get_in(jobs, tmp_path):
    keys = _make_keys(tmp_path / "keys")
    intruder = tmp_path / "intruder"
    intruder.mkdir()
    shutil.copy(keys / "learner.key", intruder / "learner.key")  # knows the learner's public key...
    zmq.auth.create_certificates(str(intruder), "actor")  # ...but has a key of its own
    port = _free_port_pair()
    address = f"--learner_address=tcp://127.0.0.1:{port}"
    logdir = tmp_path / "run"
    learner = jobs.start(
        "learner", *CARTPOLE, "--job_name=learner", address, f"--logdir={logdir}", BIG_BUDGET, f"--keys_dir={keys}"
    )
    bad = jobs.start("intruder", *CARTPOLE, "--job_name=actor", "--task=1", address, f"--keys_dir={intruder}")
    _wait(lambda: "Refused a connection" in jobs.log(learner), "the refusal to be logged", alive=[learner], jobs=jobs)
    good = jobs.start("actor", *CARTPOLE, "--job_name=actor", "--task=0", address, f"--keys_dir={keys}")
    row = _wait(lambda: _frames_after(logdir, 0), "the keyed actor to train", alive=[learner, good], jobs=jobs)
    assert row["connected_actors"] == 1 and row["refused_connections"] >= 1
    assert "Actor 1 connected" not in jobs.log(learner)
    assert bad.poll() is None  # the refused actor waits and retries; it does not crash


def test_binding_beyond_loopback_needs_keys_or_insecure(jobs, tmp_path):
    port = _free_port_pair()
    flags = [*CARTPOLE, "--job_name=learner", f"--learner_address=tcp://0.0.0.0:{port}", f"--logdir={tmp_path / 'run'}"]
    result = subprocess.run(cli.command(*flags), cwd=cli.ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--keys_dir" in result.stderr and "--insecure" in result.stderr
    learner = jobs.start("insecure", *flags, "--insecure", BIG_BUDGET)
    _wait(lambda: "WITHOUT authentication" in jobs.log(learner), "the --insecure warning", alive=[learner], jobs=jobs)


def _netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"impala-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


@pytest.mark.skipif(not _netns_available(), reason="needs root and 'ip netns' (network namespaces)")
def test_actor_in_another_network_namespace_reaches_the_learner_over_veth(jobs, tmp_path):
    """The actor is a separate host: its own network namespace, reaching the
    learner over a veth link (addresses private to this test's namespaces)."""
    suffix = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"impala-{suffix}", f"vi{suffix}", f"vo{suffix}"
    host_ip, ns_ip = "10.231.77.1", "10.231.77.2"

    def ip(*args, ns_name=None):
        command = ["ip", *(["netns", "exec", ns_name, "ip"] if ns_name else []), *args]
        subprocess.run(command, check=True, capture_output=True)

    keys = _make_keys(tmp_path / "keys")
    try:
        ip("netns", "add", ns)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{ns_ip}/30", "dev", ns_if, ns_name=ns)
        ip("link", "set", ns_if, "up", ns_name=ns)
        ip("link", "set", "lo", "up", ns_name=ns)
        port = _free_port_pair()
        address = f"--learner_address=tcp://{host_ip}:{port}"
        logdir = tmp_path / "run"
        learner = jobs.start(
            "learner", *CARTPOLE, "--job_name=learner", address, f"--logdir={logdir}", BIG_BUDGET, f"--keys_dir={keys}"
        )
        actor = jobs.start(
            "actor",
            *CARTPOLE,
            "--job_name=actor",
            "--task=0",
            address,
            f"--keys_dir={keys}",
            prefix=["ip", "netns", "exec", ns],
        )
        _wait(lambda: _frames_after(logdir, 0), "the namespaced actor to train", alive=[learner, actor], jobs=jobs)
    finally:
        jobs.close()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
