"""Throughput benchmark: the environment alone against the whole local training run.

    python scripts/bench.py [--duration 30] [--warmup 10] --flagfile=configs/cartpole.cfg [impala flags]

Measures, in one run:
  1. the environment alone: agent steps/s of one environment with random actions
     and the level's preprocessing, on one core;
  2. the full local training run (learner + actors over ZeroMQ, all cores) for
     --warmup + --duration seconds, counting only the frames after the warm-up
     (from the learner's metrics.jsonl).
The ratio of (2) to (1) x cores shows how much of the machine the system's
overhead (inference, wire, learning) takes. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from impala import config as config_lib  # noqa: E402
from impala import envs  # noqa: E402
from impala.metrics import read_jsonl  # noqa: E402


def environment_steps_per_second(config: config_lib.Config, seconds: float) -> float:
    env = envs.make(config.level_name, seed=config.seed, num_action_repeats=config.num_action_repeats,
                    **envs.options(config))
    rng = np.random.default_rng(config.seed)
    env.initial()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for action in rng.integers(0, env.num_actions, size=100):
            env.step(int(action))
        steps += 100
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def training_steps_per_second(impala_flags: list[str], config: config_lib.Config, warmup: float,
                              duration: float) -> tuple[float, dict]:
    """Runs local training in a subprocess; returns agent steps/s after the warm-up."""
    with tempfile.TemporaryDirectory(prefix="impala-bench-") as logdir:
        command = [sys.executable, "-m", "impala.experiment", *impala_flags, f"--logdir={logdir}",
                   "--total_environment_frames=1000000000000", "--log_interval_s=1",
                   "--checkpoint_interval_s=1e9"]
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        metrics = Path(logdir) / "metrics.jsonl"
        try:
            # The clock starts at the first update, so process start-up is not counted.
            deadline = time.monotonic() + 300
            while not (metrics.exists() and any(r["frames"] > 0 for r in read_jsonl(metrics))):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"training did not start: {process.stderr.read()[-2000:]}")
                time.sleep(0.2)
            time.sleep(warmup + duration)
        finally:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        rows = [r for r in read_jsonl(metrics) if r["frames"] > 0]
        start_time = rows[0]["wall_time"] + warmup
        window = [r for r in rows if r["wall_time"] >= start_time]
        if len(window) < 2:
            raise SystemExit("too few metrics rows after the warm-up; raise --duration")
        first, last = window[0], window[-1]
        frames = last["frames"] - first["frames"]
        seconds = last["wall_time"] - first["wall_time"]
        return frames / seconds / config.num_action_repeats, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured after the warm-up")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of training not counted")
    parser.add_argument("--env_seconds", type=float, default=10.0, help="seconds of the env-alone measurement")
    args, impala_flags = parser.parse_known_args()
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values([sys.argv[0], *impala_flags])
    config = config_lib.from_flags(flag_values)

    import torch

    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    env_sps = environment_steps_per_second(config, args.env_seconds)
    train_sps, last = training_steps_per_second(impala_flags, config, args.warmup, args.duration)
    print(f"level {config.level_name}, {config.num_actors} actors x {config.num_envs_per_actor} envs, "
          f"batch {config.batch_size} x unroll {config.unroll_length}, {cores} cores")
    print(f"{'environment alone (1 core, random actions)':48s} {env_sps:12,.0f} agent steps/s")
    print(f"{'environment alone x cores (upper bound)':48s} {env_sps * cores:12,.0f} agent steps/s")
    print(f"{'full local training run':48s} {train_sps:12,.0f} agent steps/s "
          f"({train_sps * config.num_action_repeats:,.0f} frames/s)")
    print(f"{'ratio to environment alone x cores':48s} {train_sps / (env_sps * cores):12.1%}")
    print(f"{'policy lag at the end (updates)':48s} {last.get('policy_lag') or 0:12.1f}")


if __name__ == "__main__":
    main()
