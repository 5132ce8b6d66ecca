"""scripts/load.py: its senders' unrolls reach a real learner over real sockets, each
counted once, checksummed, in bounded memory; and its checks fail when an unroll is
duplicated, dropped or changed on the way."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from impala import security, unroll, wire
from tests import cli, scripts

SCRIPT = scripts.path("load")
# Small and fast: CartPole's layout, 3 envs per unroll in batches of 4 (so unrolls are
# split across batches), a few connections in two processes.
SMALL = [
    "--level_name=CartPole-v1",
    "--num_envs_per_actor=3",
    "--unroll_length=5",
    "--batch_size=4",
    "--mlp_sizes=16",
    "--lstm_size=8",
    "--processes",
    "2",
    "--sockets",
    "4",
    "--unrolls",
    "25",
    "--warmup",
    "0",
]


def _load(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cli.ROOT, capture_output=True, text=True, check=False, timeout=300
    )


def test_every_unroll_reaches_the_receive_path_and_the_training_learner_once():
    result = _load(*SMALL, "--measure", "both")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # Both measurements: 8 connections x 25 unrolls, all received, all batches checksummed.
    assert out.count("200 unrolls sent, 200 received") == 2, out
    assert out.count("checks: every unroll counted once") == 2
    assert "FAILED" not in out and "frames trained" in out


@pytest.mark.parametrize(
    "fault, problem",
    [
        ("duplicate", "connection 0: unroll 1 received twice"),
        ("drop", "connection 0: unroll 2 received after 0: 1 missing"),
        ("corrupt", "(connection 0, unroll 1, env 0): checksum"),
    ],
)
def test_the_checks_catch_a_duplicated_dropped_or_changed_unroll(fault, problem):
    result = _load(*SMALL, "--processes", "1", "--sockets", "2", "--measure", "receive", "--inject", fault)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout and problem in result.stdout, result.stdout


def test_a_changed_unroll_is_caught_in_the_batches_the_learner_trains_on():
    result = _load(*SMALL, "--processes", "1", "--sockets", "2", "--measure", "learner", "--inject", "corrupt")
    assert result.returncode == 1 and "(connection 0, unroll 1, env 0): checksum" in result.stdout, result.stdout


def test_curve_keys_and_the_memory_bound(tmp_path):
    security.generate(tmp_path / "keys")
    result = _load(*SMALL, "--processes", "1", "--measure", "receive", f"--keys_dir={tmp_path / 'keys'}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CurveZMQ" in result.stdout and "100 unrolls sent, 100 received" in result.stdout
    # The memory check is live: with no room beyond the learner's start, it fails.
    result = _load(*SMALL, "--processes", "1", "--measure", "receive", "--rss_allowance_mb=-1000")
    assert result.returncode == 1 and "over its bound" in result.stdout, result.stdout


def test_a_bad_option_is_one_line():
    result = _load("--processes", "0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--processes" in result.stderr


def test_the_ledger_notices_an_unroll_lost_at_the_end_and_batches_out_of_order():
    load = scripts.load("load")
    spec = unroll.unroll_spec(3, (4,), np.float32, 2, (8, 8))
    observations = load.Observations(spec, 2, np.random.default_rng(0))
    maker = load.UnrollMaker(spec, 2, 2, 7, observations, np.random.default_rng(1))
    ledger = load.Ledger(spec, check_every=1)
    messages = []
    for _ in range(3):
        arrays, meta = maker.next()
        messages.append(wire.decode(wire.encode("unroll", arrays, task=7, meta={load.META_KEY: meta})))
        unroll.validate(messages[-1].arrays, spec)
    for m in messages[:2]:
        ledger.received(m)
    # Batches of 2 columns taken in the wrong order: the first batch holds unroll 1's columns.
    ledger.taken({name: torch.from_numpy(np.array(a)) for name, a in messages[1].arrays.items()})
    ledger.taken({name: torch.from_numpy(np.array(a)) for name, a in messages[0].arrays.items()})
    problems = ledger.finish({7: 3}, batch_size=2)
    assert sum("checksum" in p for p in problems) == 4, problems
    assert "connection 7: sent 3 unrolls, received 2" in problems
    # In order, nothing is wrong; and consecutive unrolls overlap by one step.
    ledger = load.Ledger(spec, check_every=1)
    for m in messages:
        ledger.received(m)
        ledger.taken({name: torch.from_numpy(np.array(a)) for name, a in m.arrays.items()})
    assert ledger.finish({7: 3}, batch_size=2) == []
    for name in ("observation", "reward", "done", "episode_return", "action", "policy_logits"):
        np.testing.assert_array_equal(messages[1].arrays[name][0], messages[0].arrays[name][-1])


def _held_unrolls(logdir: str, connections: int, out) -> None:
    """In a fresh process (its RSS counts only what this learner holds, not memory that
    earlier tests freed and the process kept): a learner whose batch queue is full, fed
    by `connections` sender sockets of 16-env Pong unrolls; puts (unrolls held, its
    read-ahead) on `out` once its RSS stops growing."""
    import multiprocessing

    sys.path.insert(0, str(SCRIPT.parent))  # the sender process imports the script as `load`
    import load

    from impala import learner as learner_lib
    from impala.actor import UNROLL_SNDHWM

    _, config = load.parse(
        [
            f"--flagfile={cli.ROOT / 'configs' / 'pong.cfg'}",
            "--batch_size=16",
            "--max_queued_batches=1",
            "--job_name=learner",
            f"--logdir={logdir}",
        ]
    )
    env = learner_lib.env_spec(config)
    server = learner_lib.Learner(config, env)
    spec = server.unroll_spec
    message_mb = learner_lib.unroll_bytes(spec, config.num_envs_per_actor) / 2**20
    context = multiprocessing.get_context("spawn")
    stop, results = context.Event(), context.Queue()
    sender = context.Process(
        target=load._sender,
        args=(server.unroll_address, list(range(connections)), spec, config.num_envs_per_actor, env.num_actions)
        + (config.level_name, "", 0, 0, "", UNROLL_SNDHWM, stop, results),
        daemon=True,
    )
    base = load.rss_mb()
    sender.start()
    try:
        # Nothing takes batches: the unrolls thread queues one (a batch is one unroll
        # here) and blocks with the next; then only the sockets hold unrolls. Wait until
        # the first unroll has arrived (a spawned sender on a loaded machine can take
        # longer than the 5 s below to start), then until the RSS stops growing (the
        # senders have more than the learner takes).
        samples: list[float] = []
        while len(samples) < 10 or samples[-1] < message_mb or samples[-1] - samples[-10] > 0.5 * message_mb:
            samples.append(load.rss_mb() - base)
            assert len(samples) < 600 and sender.is_alive(), samples[-20:]
            time.sleep(0.5)
        out.put((samples[-1] / message_mb, server.unroll_rcvhwm))
    finally:
        sender.kill()
        sender.join()
        server.close(save=False)


def test_a_learner_that_stops_reading_holds_two_queued_unrolls_per_connection(tmp_path):
    """The read-ahead bound (learner.unroll_rcvhwm): with its batch queue full and
    nothing training, the learner holds, per connection, at most two queued 16-env Pong
    unrolls (9 MB; learner.MIN_UNROLL_RCVHWM) beyond the one ZeroMQ's I/O thread is
    reading, however many the senders have ready. Measured as the learner process's RSS
    while 4 connections keep unrolls coming; a read-ahead of 4 held 21, not 11."""
    import multiprocessing
    import queue

    connections = 4
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    measure = context.Process(target=_held_unrolls, args=(str(tmp_path), connections, out))
    measure.start()
    try:
        held, rcvhwm = out.get(timeout=400)
    except queue.Empty:
        pytest.fail(f"no measurement (the measuring process exited with {measure.exitcode})")
    finally:
        measure.join(timeout=60)
        if measure.is_alive():
            measure.kill()
    # 2 batches (queued, and the one waiting), the unroll assembled into the second (its
    # memory stays with the process for reuse: impala/memory.py), per connection
    # read-ahead + 1 unrolls (11 in all, as measured); one unroll more for everything else.
    assert rcvhwm == 2
    bound = 3 + connections * (rcvhwm + 1) + 1
    assert 2 + connections <= held <= bound, f"the learner holds {held:.1f} unrolls"


def test_the_read_ahead_is_chosen_from_the_unroll_size():
    from impala import learner as learner_lib

    pong = unroll.unroll_spec(20, (84, 84, 4), np.uint8, 6)
    assert learner_lib.unroll_bytes(pong, 3) == sum(a.nbytes for a in unroll.new_unroll(pong, 3).values())
    # Pong: 1 env (0.6 MB) reads 4 ahead, 4 envs (2.4 MB) 1, 16 envs (9 MB) 1; CartPole's tiny unrolls 4.
    assert [learner_lib.unroll_rcvhwm(learner_lib.unroll_bytes(pong, n)) for n in (1, 2, 4, 16)] == [4, 3, 2, 2]
    assert learner_lib.unroll_rcvhwm(learner_lib.unroll_bytes(unroll.unroll_spec(20, (4,), np.float32, 2), 32)) == 4
