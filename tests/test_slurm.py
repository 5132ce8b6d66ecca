"""scripts/impala.sbatch: valid shell, and every impala command it launches parses as
impala flags. The script really runs, under bash, with stand-ins for SLURM's srun and
scontrol and for the interpreter, which record the commands instead of training."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from absl import flags

from impala import config as config_lib
from tests.cli import ROOT

SCRIPT = ROOT / "scripts" / "impala.sbatch"

# srun --het-group=G CMD...: runs CMD once per task of component G, as SLURM would (in turn
# here); a SIGTERM is noted and then forwarded to the tasks, here only as a note: all are recorded.
SRUN = """#!/bin/bash
trap 'echo "$group" >> "$FAKE_LOG.sigterm"' TERM
group=0
while [[ $1 == --* ]]; do case $1 in --het-group=*) group=${1#*=};; esac; shift; done
n=$(eval echo "\\$FAKE_NTASKS_$group")
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_HET_GROUP=$group "$@"; done
"""
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu-node[07-08]" ] && printf 'gpu-node07\\ngpu-node08\\n'
"""
PYTHON = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"group": os.environ.get("SLURM_HET_GROUP"), "argv": sys.argv[1:]}) + "\\n")
"""


def _component_tasks() -> list[int]:
    """ntasks of each component, from the script's #SBATCH lines."""
    components = SCRIPT.read_text().split("#SBATCH hetjob")
    return [int(re.search(r"#SBATCH .*--ntasks=(\d+)", c).group(1)) for c in components]


def test_shell_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _launch(tmp_path, extra_env: dict) -> list[dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL, "fake-python": PYTHON}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "learner.key_secret").write_text("made before\n")  # so the script makes none
    log = tmp_path / "launched.jsonl"
    learner_tasks, actor_tasks = _component_tasks()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_NTASKS_0": str(learner_tasks),
        "FAKE_NTASKS_1": str(actor_tasks),
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_NODELIST_HET_GROUP_0": "gpu-node[07-08]",
        "SLURM_JOB_NAME": "impala",
        "IMPALA_PYTHON": str(bin_dir / "fake-python"),
        "IMPALA_KEYS_DIR": str(keys),
        "HOME": str(tmp_path),
        **extra_env,
    }
    subprocess.run(["bash", str(SCRIPT)], env=env, check=True, timeout=300)
    return [json.loads(line) for line in log.read_text().splitlines()]


TORCHRUN = ["-m", "torch.distributed.run", "--standalone"]


def _config(argv: list[str]) -> config_lib.Config:
    if argv[:3] == TORCHRUN:  # the data-parallel learner: torchrun starts the ranks
        argv = argv[4:]
    assert argv[:2] == ["-m", "impala.experiment"], argv
    values = flags.FlagValues()
    config_lib.define_flags(values)
    values(["impala", *argv[2:]])
    return config_lib.from_flags(values)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            "IMPALA_FLAGS": "--batch_size=16 --unroll_length=50",
            "IMPALA_FLAGFILE": "configs/cartpole.cfg",
            "IMPALA_PORT": "6000",
        },
        {"IMPALA_LEARNER_RANKS": "4"},
    ],
)
def test_every_launched_command_parses_and_agrees(tmp_path, extra):
    launched = _launch(tmp_path, extra)
    learners = [_config(c["argv"]) for c in launched if c["group"] == "0"]
    actors = [_config(c["argv"]) for c in launched if c["group"] == "1"]
    assert len(launched) == len(learners) + len(actors)
    (learner,) = learners
    learner_tasks, actor_tasks = _component_tasks()
    assert learner_tasks == 1 and learner.job_name == "learner"
    port = int(extra.get("IMPALA_PORT", 5555))
    assert learner.learner_address == f"tcp://0.0.0.0:{port}"
    assert learner.logdir == f"{tmp_path}/impala-runs/impala"
    assert sorted(a.task for a in actors) == list(range(actor_tasks))
    for actor in actors:
        assert actor.job_name == "actor" and actor.learner_address == f"tcp://gpu-node07:{port}"
        assert actor.keys_dir == learner.keys_dir == str(tmp_path / "keys")
        assert actor.level_name == learner.level_name and actor.batch_size == learner.batch_size
    # The learner ended first (the stand-in returns at once): the script stopped the actors.
    assert (tmp_path / "launched.jsonl.sigterm").read_text().split() == ["1"]
    ranks = int(extra.get("IMPALA_LEARNER_RANKS", 1))
    (learner_argv,) = [c["argv"] for c in launched if c["group"] == "0"]
    assert (learner_argv[:4] == [*TORCHRUN, f"--nproc_per_node={ranks}"]) == (ranks > 1)
    assert learner.learner_ranks == ranks and all(a.learner_ranks == ranks for a in actors)
    if "IMPALA_FLAGS" in extra:
        assert learner.batch_size == 16 and learner.unroll_length == 50 and learner.level_name == "CartPole-v1"
