"""scripts/load.py: its senders' unrolls reach a real learner over real sockets, each
counted once, checksummed, in bounded memory; and its checks fail when an unroll is
duplicated, dropped or changed on the way."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from impala import security, unroll, wire
from tests import cli

SCRIPT = cli.ROOT / "scripts" / "load.py"
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


def _module():
    spec = importlib.util.spec_from_file_location("impala_load_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    load = _module()
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
