"""compose.yaml runs as written: its keys service, learner and three actors as processes
on this machine (scripts/compose_run.py maps only paths, the host name and the port); the
learner trains with all three, and every job ends with status 0 on SIGTERM."""

from __future__ import annotations

import sys

import yaml

from tests import scripts
from tests.cli import ROOT

compose_run = scripts.load("compose_run")


def test_only_paths_host_and_port_are_mapped(tmp_path):
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    cmds = compose_run.commands(compose, 3, tmp_path, 40000)
    assert set(cmds) == {"keys", "learner", "actor-0", "actor-1", "actor-2"}
    for name in ("learner", "actor-0", "actor-1", "actor-2"):
        original = compose["services"][name]["command"]
        assert cmds[name][:3] == [sys.executable, "-m", "impala.experiment"]
        mapped = cmds[name][3:]
        assert len(mapped) == len(original)
        for before, after in zip(original, mapped):
            undone = (
                after.replace(str(tmp_path), "").replace("127.0.0.1:40000", "learner:5555").replace(":40000", ":5555")
            )
            assert undone == before, (before, after)
    assert f"--keys_dir={tmp_path}/keys" in cmds["actor-1"]
    assert f"--logdir={tmp_path}/logs/run" in cmds["learner"]
    assert "--learner_address=tcp://127.0.0.1:40000" in cmds["actor-2"]


def test_learner_and_three_actors_from_compose_train_and_exit_cleanly(tmp_path):
    report = compose_run.run(3, tmp_path, after_all_s=12.0, timeout_s=600.0)
    assert report["connected_actors"] == 3
    assert report["param_version"] > 0  # the learner took batches from them
    assert report["exit_statuses"] == {"learner": 0, "actor-0": 0, "actor-1": 0, "actor-2": 0}
    for log in tmp_path.glob("*.log"):
        assert "Assertion failed" not in log.read_text(), log.name
    assert list((tmp_path / "logs" / "run" / "checkpoints").glob("*.pt"))
