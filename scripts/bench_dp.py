"""Samples/s of N data-parallel learner ranks against 1 rank, on one machine in one run.

Samples/s are agent steps trained per second.

    nice -n 19 python scripts/bench_dp.py --flagfile=configs/pong.cfg [--ranks 1,2] \
        [--rounds 2] [--duration 40] [--warmup 15] [impala flags]

For each round and each rank count (interleaved, so load from other processes hits
both alike) it starts the learner ranks as real processes with the environment
torchrun gives them (gloo on the CPU, one torch thread each), feeds them fixed
unrolls of the level's shape from this process (one feeder thread per actor task,
tasks spread over the ranks by the address rule, as fast as the learners take them:
the sends block on back-pressure), and reads rank 0's metrics.jsonl: samples/s is
the frames trained between the first row after --warmup seconds (counted from the
first update) and the last row --duration seconds later, divided by
--num_action_repeats and by the time between those rows. No environment runs, so
this is the learner's own rate. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from absl import flags

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from impala import address, security, unroll, wire  # noqa: E402
from impala import config as config_lib  # noqa: E402
from impala.learner import env_spec  # noqa: E402
from impala.metrics import read_jsonl  # noqa: E402
from impala.nets import make_agent  # noqa: E402

TASKS_PER_RANK = 2  # feeder tasks per rank: one can send while the other is blocked


def _free_ports(count: int) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        held = []
        try:
            for p in range(port, port + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free ports")


def _unroll_arrays(config: config_lib.Config) -> dict:
    """One unroll of --num_envs_per_actor envs with random contents."""
    spec_env = env_spec(config)
    agent = make_agent(config, spec_env.observation_shape, spec_env.num_actions, spec_env.instruction_length)
    sizes = tuple(s.shape[1] for s in agent.initial_state(1))
    spec = unroll.unroll_spec(
        config.unroll_length,
        spec_env.observation_shape,
        spec_env.observation_dtype,
        spec_env.num_actions,
        sizes,
        instruction_length=spec_env.instruction_length,
    )
    rng = np.random.default_rng(0)
    arrays = unroll.new_unroll(spec, config.num_envs_per_actor)
    observation = arrays["observation"]
    if observation.dtype == np.uint8:
        observation[:] = rng.integers(0, 256, size=observation.shape, dtype=np.uint8)
    else:
        observation[:] = rng.normal(size=observation.shape)
    arrays["action"][:] = rng.integers(0, spec_env.num_actions, size=arrays["action"].shape)
    arrays["policy_logits"][:] = rng.normal(size=arrays["policy_logits"].shape)
    arrays["reward"][:] = rng.normal(size=arrays["reward"].shape)
    return arrays


def _feed(unroll_address: str, task: int, arrays: dict, level: str, keys_dir: str, stop: threading.Event) -> None:
    """Sends the same unroll as actor `task` until `stop`, as fast as the learner takes it."""
    frames = wire.encode("unroll", arrays, task=task, meta={"level": level})
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 2)
    s.setsockopt(zmq.SNDTIMEO, 200)
    security.connect_securely(s, keys_dir)  # the automatic keys of loopback jobs
    s.connect(unroll_address)
    while not stop.is_set():
        try:
            s.send_multipart(frames, copy=False)
        except zmq.Again:
            continue
    s.close(linger=0)


def measure(
    ranks: int,
    impala_flags: list[str],
    config: config_lib.Config,
    arrays: dict,
    warmup: float,
    duration: float,
    workdir: Path,
) -> float:
    """Samples/s of `ranks` learner ranks."""
    logdir = workdir / f"ranks{ranks}-{time.monotonic_ns()}"
    port, master = _free_ports(ranks + 1), _free_ports(1)
    learner_address = f"tcp://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "impala.experiment",
        *impala_flags,
        "--job_name=learner",
        f"--learner_ranks={ranks}",
        f"--learner_address={learner_address}",
        f"--logdir={logdir}",
        "--log_interval_s=2",
        "--checkpoint_interval_s=100000",
        "--learner_threads=1",
    ]
    processes = []
    for rank in range(ranks):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        if ranks > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(ranks),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(master),
            )
        with open(workdir / f"ranks{ranks}-rank{rank}.log", "w") as log:  # the child keeps its own copy
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    stop = threading.Event()
    feeders = [
        threading.Thread(
            target=_feed,
            daemon=True,
            args=(
                address.learner_addresses(learner_address, task, ranks)[0],
                task,
                arrays,
                config.level_name,
                security.local_keys(logdir),
                stop,
            ),
        )
        for task in range(ranks * TASKS_PER_RANK)
    ]
    for t in feeders:
        t.start()
    metrics = logdir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not metrics.exists() and time.monotonic() < deadline:  # the first update
            time.sleep(0.5)
        time.sleep(warmup)
        start = time.time()
        time.sleep(duration)
        rows = [r for r in read_jsonl(metrics) if r["wall_time"] >= start] if metrics.exists() else []
    finally:
        stop.set()
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for t in feeders:
            t.join(timeout=5)
    if len(rows) < 2:
        log = (workdir / f"ranks{ranks}-rank0.log").read_text()[-3000:]
        raise SystemExit(f"{ranks} rank(s): too few metrics rows; rank 0's log ends:\n{log}")
    return (
        (rows[-1]["frames"] - rows[0]["frames"])
        / config.num_action_repeats
        / (rows[-1]["wall_time"] - rows[0]["wall_time"])
    )


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # so that measure() stops its learner ranks


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2", help="Rank counts to compare, comma separated.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds of all rank counts.")
    parser.add_argument("--duration", type=float, default=40.0, help="Seconds measured per rank count and round.")
    parser.add_argument("--warmup", type=float, default=15.0, help="Seconds before measuring.")
    args, impala_flags = parser.parse_known_args()
    config_lib.define_flags()
    flags.FLAGS(["bench_dp", *impala_flags])
    config = config_lib.from_flags(flags.FLAGS)
    arrays = _unroll_arrays(config)
    counts = [int(n) for n in args.ranks.split(",")]
    results: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="bench_dp-") as workdir:
        for round_number in range(args.rounds):
            for n in counts:
                rate = measure(n, impala_flags, config, arrays, args.warmup, args.duration, Path(workdir))
                results[n].append(rate)
                print(f"round {round_number + 1}: {n} rank(s): {rate:,.0f} samples/s", flush=True)
    base = np.mean(results[counts[0]])
    print(f"\n{config.level_name}, batch {config.batch_size} x unroll {config.unroll_length}, {os.cpu_count()} CPUs:")
    for n in counts:
        mean = np.mean(results[n])
        print(
            f"  {n} rank(s): {mean:,.0f} samples/s (rounds: {', '.join(f'{r:,.0f}' for r in results[n])}); "
            f"{mean / base:.2f}x {counts[0]} rank(s)"
        )


if __name__ == "__main__":
    main()
