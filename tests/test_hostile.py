"""Issue 18, the learner's side: a real `--job_name=learner` on CartPole with one
real actor beside it, and a hostile peer (this test, holding the run's keys, as a
buggy or malicious insider could) that sends what the issue's findings 1-6 sent.
After each attack the learner must keep training, keep its parameters finite, keep
serving the honest actor and keep its metrics sane and bounded. A stranger without
the keys gets nothing at all.

One learner serves every test of this module (starting one takes most of a test's
time on a loaded machine); each test checks the run is healthy after its own attack.
"""

from __future__ import annotations

import math
import os
import stat
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from impala import learner, security, unroll, wire
from impala.config import Config
from tests.test_distributed import BIG_BUDGET, CARTPOLE, Jobs, _free_port_pair, _rows, _wait

MAX_ACTORS = 64
# configs/cartpole.cfg, as CARTPOLE sets it: unrolls of 20 steps, 2 actions, 4 floats, no LSTM
# (wider layers than the config's, so that parameter replies are 4 MB).
SPEC = unroll.unroll_spec(20, (4,), np.float32, 2)


class Run:
    """The learner under attack, its honest actor, and ways to reach them."""

    def __init__(self, jobs: Jobs, logdir: Path, port: int):
        self.jobs, self.logdir = jobs, logdir
        self.unroll_address, self.params_address = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
        address = f"--learner_address={self.unroll_address}"
        self.learner = jobs.start(
            "learner",
            *CARTPOLE,
            "--job_name=learner",
            address,
            f"--logdir={logdir}",
            BIG_BUDGET,
            f"--max_actors={MAX_ACTORS}",
            "--mlp_sizes=1024,1024",
        )
        self.actor = jobs.start(
            "actor", *CARTPOLE, "--job_name=actor", "--task=0", address, f"--logdir={logdir}", "--mlp_sizes=1024,1024"
        )
        self.context = zmq.Context.instance()
        self.sockets: list[zmq.Socket] = []

    def peer(self, address: str, keys: bool = True, **options: int) -> zmq.Socket:
        """A DEALER connected to `address`, with the run's automatic keys unless `keys` is False."""
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            socket.setsockopt(getattr(zmq, name), value)
        if keys:
            security.connect_securely(socket, str(self.logdir / "keys"))
        socket.connect(address)
        self.sockets.append(socket)
        return socket

    def params(self, socket: zmq.Socket | None = None) -> wire.Message:
        """The learner's current parameters, asked for as a new actor would."""
        socket = socket or self.peer(self.params_address)
        wire.send(socket, "get_params", meta={"version": -1, "run": None})
        assert socket.poll(30_000), "no parameters from the learner"
        return wire.recv(socket, allowed_kinds=("params",))

    def healthy_after(self, what: str, frames: int = 20_000) -> dict:
        """Waits until the learner trained `frames` more with the honest actor
        reporting; checks both are alive and the parameters are finite."""
        start = _rows(self.logdir)[-1]["frames"] if _rows(self.logdir) else 0
        row = _wait(
            lambda: next(
                (
                    r
                    for r in reversed(_rows(self.logdir))
                    if r["frames"] > start + frames and r.get("actor_unrolls_per_s/0", 0) > 0
                ),
                None,
            ),
            f"training with the honest actor after {what}",
            alive=[self.learner, self.actor],
            jobs=self.jobs,
        )
        parameters = self.params().arrays
        assert all(np.isfinite(a).all() for a in parameters.values()), f"non-finite parameters after {what}"
        return row

    def bad_messages(self) -> int:
        rows = _rows(self.logdir)
        return rows[-1]["bad_messages"] if rows else 0

    def counted(self, at_least: int, what: str) -> None:
        _wait(
            lambda: self.bad_messages() >= at_least,
            f"{what} to be counted in bad_messages",
            alive=[self.learner],
            jobs=self.jobs,
        )

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.learner.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)
        self.jobs.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hostile")
    r = Run(Jobs(tmp_path), tmp_path / "run", _free_port_pair())
    try:
        _wait(
            lambda: [x for x in _rows(r.logdir) if x.get("actor_unrolls_per_s/0", 0) > 0],
            "training",
            alive=[r.learner, r.actor],
            jobs=r.jobs,
            timeout=180,
        )
        yield r
    finally:
        r.close()


def _unroll(num_envs: int = 1, **changes) -> dict[str, np.ndarray]:
    """A valid CartPole unroll (all zeros: action 0, logits 0, nothing done) with changes."""
    arrays = unroll.new_unroll(SPEC, num_envs)
    for name, value in changes.items():
        arrays[name][...] = value
    return arrays


def _send_unroll(socket: zmq.Socket, arrays, task: int = 1, param_version: int = 0, **meta) -> None:
    meta = {"level": "CartPole-v1", "run": None, **meta}
    socket.send_multipart(wire.encode("unroll", arrays, task=task, param_version=param_version, meta=meta))


# -- who can connect ----------------------------------------------------------------


def test_a_stranger_without_the_keys_gets_nothing(run):
    """On loopback the learner job made keys in its logdir (0700); a process without
    them reaches the port but gets no parameters, and its unrolls are not counted."""
    keys = run.logdir / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    stranger = run.peer(run.params_address, keys=False)
    wire.send(stranger, "get_params", meta={"version": -1, "run": None})
    sender = run.peer(run.unroll_address, keys=False)
    for task in range(40, 44):
        _send_unroll(sender, _unroll(), task=task)
    run.healthy_after("a stranger's attempts")
    assert not stranger.poll(0), "a stranger without keys was sent parameters"
    assert "Actor 40 connected" not in run.jobs.log(run.learner)


def test_a_one_machine_learner_listens_only_in_a_private_directory(tmp_path):
    """No --job_name: the learner binds ipc:// sockets in a fresh 0700 directory
    (no TCP port for other users to reach), removed when it closes."""
    config = Config(level_name="CartPole-v1", network="mlp", use_lstm=False, mlp_sizes="8", logdir=str(tmp_path))
    server = learner.Learner(config)
    try:
        assert server.unroll_address.startswith("ipc://") and server.params_address.startswith("ipc://")
        folder = Path(server.unroll_address[len("ipc://") :]).parent
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    finally:
        server.close(save=False)
    assert not folder.exists()


# -- finding 1: values that poison or kill -----------------------------------------


def test_nan_logits_and_out_of_range_actions_are_dropped(run):
    before = run.bad_messages()
    socket = run.peer(run.unroll_address)
    _send_unroll(socket, _unroll(policy_logits=float("nan")))
    _send_unroll(socket, _unroll(action=99))
    run.counted(before + 2, "a NaN-logits and an action-99 unroll")
    run.healthy_after("NaN logits and action 99")
    assert run.actor.poll() is None


# -- finding 2: a shape that overflows, on both ports --------------------------------


def _overflowing_shape(kind: str) -> bytes:
    header = msgpack.packb(
        {
            "proto": "impala",
            "v": wire.PROTOCOL_VERSION,
            "kind": kind,
            "task": 1,
            "param_version": 0,
            "meta": {"version": -1, "run": None} if kind == "get_params" else {},
            "arrays": [["reward", "float32", [0, 2**63]]],
        }
    )
    return len(header).to_bytes(4, "little") + header


def test_an_overflowing_shape_is_counted_on_both_ports(run):
    before = run.bad_messages()
    run.peer(run.unroll_address).send(_overflowing_shape("unroll"))
    params_peer = run.peer(run.params_address)
    params_peer.send(_overflowing_shape("get_params"))
    run.counted(before + 2, "the [0, 2**63] shapes")
    assert run.params(params_peer).kind == "params"  # the parameter thread still answers
    run.healthy_after("[0, 2**63] shapes")


# -- finding 3: many frames in one message -------------------------------------------


def test_messages_of_many_frames_are_dropped_and_counted(run):
    before = run.bad_messages()
    socket = run.peer(run.unroll_address)
    socket.send_multipart([b"\0" * 2**20] * 6)
    socket.send_multipart([b""] * 200_000)
    run.counted(before + 2, "a 6-frame and a 200,000-frame message")
    run.healthy_after("many-frame messages")


# -- finding 4: one very wide unroll -----------------------------------------------


def test_a_very_wide_unroll_is_dropped_whole(run):
    """20,000 envs all done with return 499.5 (no CartPole return): dropped, not
    split into batches; the honest actor is served and no forged episode is reported."""
    before = run.bad_messages()
    start = _rows(run.logdir)[-1]["frames"]
    _send_unroll(run.peer(run.unroll_address), _unroll(20_000, done=True, episode_return=499.5, episode_step=500))
    run.counted(before + 1, "a 20,000-env unroll")
    row = run.healthy_after("a very wide unroll")
    after = [r for r in _rows(run.logdir) if start < r["frames"] <= row["frames"]]
    assert sum(r["episodes"] for r in after) < 20_000
    assert "20000 environments" in run.jobs.log(run.learner)


# -- finding 5: parameter requests ---------------------------------------------------


def test_peers_that_ask_for_parameters_and_never_read_stay_bounded(run):
    """Two peers each ask 500 times over several seconds and never read. New
    versions (4 MB each: --mlp_sizes=1024,1024) keep being published meanwhile, so
    every queued reply would hold a snapshot of its own; the learner queues at most
    a couple of replies for each peer, so its memory stays bounded."""
    rss = run.rss_mb()
    peers = [run.peer(run.params_address, RCVBUF=4096, RCVHWM=1) for _ in range(2)]
    for _ in range(500):
        for peer in peers:
            wire.send(peer, "get_params", meta={"version": -1, "run": None})
        time.sleep(0.03)
    run.healthy_after("never-reading parameter peers")
    grown = run.rss_mb() - rss
    assert grown < 150, f"the learner's memory grew by {grown:.0f} MB"


def test_a_peer_asking_back_to_back_gets_few_full_replies(run):
    """One peer asks as fast as it can read: it gets full parameters at most once per
    --params_min_interval_s (0.05 s) and 'params_unchanged' otherwise; training goes on."""
    peer = run.peer(run.params_address)
    kinds = []
    start = time.monotonic()
    for _ in range(400):
        wire.send(peer, "get_params", meta={"version": -1, "run": None})
        assert peer.poll(30_000)
        kinds.append(wire.recv(peer).kind)
    elapsed = time.monotonic() - start
    assert kinds.count("params") <= elapsed / 0.05 + 1, (kinds.count("params"), elapsed)
    assert "params_unchanged" in kinds
    run.healthy_after("a back-to-back parameter peer")


# -- finding 6: forged metrics and logs ---------------------------------------------


def test_forged_values_do_not_reach_the_metrics_or_the_log(run):
    run_id = run.params().meta["run"]
    before = run.bad_messages()
    start = _rows(run.logdir)[-1]["frames"]
    socket = run.peer(run.unroll_address, SNDHWM=100_000)
    forged = [
        dict(param_version=2**64 - 1, run=run_id),  # a version the learner never had
        dict(level="CartPole-v1\nI1128 00:00:00 learner.py:1] frames 1 | FAKE progress line"),
        dict(episode_return=float("nan"), done=True),
        dict(episode_step=-5, done=True),
        dict(episode_return=-1e12, done=True),
    ]
    for changes in forged:
        arrays = _unroll(**{k: v for k, v in changes.items() if k in SPEC})
        _send_unroll(socket, arrays, **{k: v for k, v in changes.items() if k not in SPEC})
    for task in range(100, 5100):  # 5,000 task numbers, beyond --max_actors
        _send_unroll(socket, _unroll(), task=task)
    run.counted(before + len(forged) + 5000, "the forged unrolls")
    # A valid unroll whose time report is implausible: kept, its seconds ignored.
    _send_unroll(socket, _unroll(), task=1, seconds={"env": 999999.0})
    row = run.healthy_after("forged values")
    rows = [r for r in _rows(run.logdir) if r["frames"] > start and r["frames"] <= row["frames"]]
    for r in rows:
        assert r["policy_lag"] is None or 0 <= r["policy_lag"] < 1e6
        assert r["connected_actors"] <= MAX_ACTORS
        assert len(r) < 120, f"{len(r)} metric keys in a row"
        assert r.get("time/actor_env", 0) < 1000
        for key in ("mean_episode_return", "mean_episode_length"):
            assert r[key] is None or (math.isfinite(r[key]) and r[key] >= 0)
    log = run.jobs.log(run.learner)
    assert not any(line.startswith("I1128 00:00:00") for line in log.splitlines())
    assert "Actor 4999 connected" not in log
