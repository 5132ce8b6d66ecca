"""Throughput benchmark: how close the whole local run comes to what this machine
can do, and how fast the actor side is on its own.

    python scripts/bench.py --flagfile=configs/pong.cfg [--measure all|training|actor|learner] \
        [--duration 60] [--warmup 20] [impala flags]

--measure=training (and all) measures, in one run:
  1. the parts, each on one core with one torch thread:
       environment: agent steps/s of one environment, random actions, the level's
         preprocessing;
       inference: samples/s of the network's forward pass and action sampling at
         the batch size the actors use (--num_envs_per_actor for lock-step actors,
         the actor host's maximum batch with --env_workers_per_actor);
       learner: samples/s of learn_step (forward, V-trace, backward, clipping,
         RMSProp) on a --batch_size x --unroll_length batch;
       replay (with --replay_proportion > 0): samples/s of drawing a --batch_size
         batch from a full replay buffer of --replay_buffer_size columns.
     Every agent step is acted once and learned 1 + p times, p =
     --replay_proportion (p replayed batches per fresh one, each drawn from the
     buffer), so the machine's limit is
     cores / (1/environment + 1/inference + (1 + p)/learner + p/replay) agent steps/s.
  2. the real local training run (python -m impala.experiment with these flags,
     all cores) for --warmup + --duration seconds; agent steps/s after the
     warm-up (from metrics.jsonl), the ratio to the limit, and where the time
     went: the run's 'time/...' metrics (seconds per second, summed over the
     learner's threads and the actors), as cores busy and microseconds per agent
     step. They are wall-clock time inside each part, not CPU time: a thread
     waiting for a core (or the GIL) inside a part counts, so with more runnable
     threads than cores the parts can sum to more than the cores.
--measure=actor (and all): the actor side (impala/actor_host.py), in
  --actor_rounds rounds of five --actor_seconds measurements each: the actor's
  environments stepping random actions in --env_workers_per_actor processes with
  no inference (the raw rate, measured before and after the host and averaged);
  one actor host (the same environments and processes, batched inference, no
  learner); the same host with batches of one row (unbatched inference); and, for
  comparison, as many lock-step actor processes sharing the same environments.
  Rounds interleave them, so load from other processes hits all of them. Then
  where the host's CPU went in the last round (from /proc): env workers, the
  actor's threads (inference among them), idle cores, per agent step.
--measure=learner: the learner step alone (as in 1. above, on one core with one
  torch thread, on --device) in each --learner_dtypes number format (float32 and
  bfloat16 by default), in --learner_rounds rounds of --part_seconds each that
  alternate the formats; samples/s per round, the medians and each format's ratio
  to the first's (the ratio of the medians, and the median of the rounds' ratios).
Absolute numbers drift between machines and runs; the ratios within one run are
what this measures. A benchmark, not a test.
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
from impala.memory import reuse_freed_memory  # noqa: E402
from impala.metrics import read_jsonl  # noqa: E402


def progress(message: str) -> None:
    """A progress line on stderr (the results go to stdout): the measurements take minutes."""
    print(f"bench.py: {message}", file=sys.stderr, flush=True)


def _make_env(config: config_lib.Config, seed: int) -> envs.Environment:
    return envs.make(config.level_name, seed=seed, num_action_repeats=config.num_action_repeats, **envs.options(config))


def environment_steps_per_second(config: config_lib.Config, seconds: float) -> float:
    """One environment, random actions; agent steps/s."""
    env = _make_env(config, config.seed)
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


def _timed(step, seconds: float, warmup_calls: int = 2) -> float:
    """Seconds per call of step(), over at least `seconds` after a few calls' warm-up."""
    for _ in range(warmup_calls):
        step()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        step()
        calls += 1
    return (time.perf_counter() - start) / calls


def actor_batch_size(config: config_lib.Config) -> int:
    """Rows per forward pass in the actors: all envs of a lock-step actor, or the
    actor host's maximum batch."""
    if config.env_workers_per_actor:
        return config.inference_maximum_batch_size or config.num_envs_per_actor
    return config.num_envs_per_actor


def _agent_and_spec(config: config_lib.Config, acting: bool = False):
    from impala import learner
    from impala.nets import make_agent

    spec = learner.env_spec(config)
    agent = make_agent(config, spec.observation_shape, spec.num_actions, spec.instruction_length, acting)
    return agent, spec


def _random_inputs(spec, agent, T: int, B: int, rng: np.random.Generator) -> dict:
    """Random [T, B, ...] steps with the level's shapes, one per field of
    impala/step.py, and core states (compute does not depend on the values)."""
    import torch

    from impala import step

    batch = {}
    for name, field in step.fields(spec).items():
        shape = (T, B, *field.shape)
        if field.dtype == np.bool_:
            value = rng.random(shape) < 0.01
        elif name == "action":
            value = rng.integers(0, spec.num_actions, shape)
        elif np.issubdtype(field.dtype, np.integer):  # pixels, word ids, step counts
            value = rng.integers(0, 256 if field.dtype == np.uint8 else 1000, shape)
        else:
            value = rng.standard_normal(shape)
        batch[name] = torch.from_numpy(np.asarray(value, field.dtype))
    for k, s in enumerate(agent.initial_state(B)):
        batch[f"core_state_{k}"] = s
    return batch


def inference_samples_per_second(config: config_lib.Config, batch_size: int, seconds: float) -> float:
    """The actors' forward pass and action sampling on `batch_size` rows; samples/s."""
    import torch

    from impala.nets import sample_actions
    from impala.policy import call_agent

    agent, spec = _agent_and_spec(config, acting=True)
    inputs = _random_inputs(spec, agent, 1, batch_size, np.random.default_rng(config.seed))
    state = agent.initial_state(batch_size)

    @torch.no_grad()
    def step() -> None:
        output, _ = call_agent(agent, inputs, state)
        sample_actions(output.policy_logits[0]).numpy()

    return batch_size / _timed(step, seconds)


def learner_samples_per_second(config: config_lib.Config, seconds: float) -> float:
    """learn_step on a --batch_size x --unroll_length batch on --device, in
    --learner_dtype; samples (agent steps)/s."""
    from impala.learner import _device, learn_step
    from impala.optim import make_optimizer

    device = _device(config.device)
    agent, spec = _agent_and_spec(config)
    agent = agent.to(device)
    optimizer = make_optimizer(
        config.optimizer,
        agent.parameters(),
        lr=config.learning_rate,
        decay=config.decay,
        momentum=config.momentum,
        epsilon=config.epsilon,
    )
    batch = _random_inputs(spec, agent, config.unroll_length + 1, config.batch_size, np.random.default_rng(config.seed))
    batch = {name: t.to(device) for name, t in batch.items()}  # learn_step waits for the device at its end
    return (
        config.batch_size * config.unroll_length / _timed(lambda: learn_step(agent, optimizer, batch, config), seconds)
    )


def replay_samples_per_second(config: config_lib.Config, seconds: float) -> float:
    """ReplayBuffer.sample (impala/replay.py) of a --batch_size batch from a full
    buffer of --replay_buffer_size columns on --device; samples (agent steps)/s."""
    import torch

    from impala import replay, unroll
    from impala.learner import _device, state_sizes

    device = _device(config.device)
    agent, spec = _agent_and_spec(config)
    buffer = replay.ReplayBuffer(
        unroll.spec_of(config.unroll_length, spec, state_sizes(agent)), config.replay_buffer_size
    )
    batch = _random_inputs(spec, agent, config.unroll_length + 1, config.batch_size, np.random.default_rng(config.seed))
    batch = {name: t.to(device) for name, t in batch.items()}
    while len(buffer) < buffer.capacity:
        buffer.add(batch)
    generator = replay.generator(config.seed, 0)

    def sample() -> None:
        buffer.sample(config.batch_size, generator)
        if device.type == "cuda":  # the copies are asynchronous there
            torch.cuda.synchronize(device)

    return config.batch_size * config.unroll_length / _timed(sample, seconds)


def machine_limit(cores: int, env: float, inference: float, learner: float, replay: float, proportion: float) -> float:
    """Agent steps/s the machine's cores allow, from the one-core rates of the parts
    (see the module docstring): each step is acted once and learned 1 + proportion
    times, and `proportion` of it is sampled from the replay buffer."""
    seconds = 1 / env + 1 / inference + (1 + proportion) / learner
    if proportion > 0:
        seconds += proportion / replay
    return cores / seconds


def learner_dtypes(config: config_lib.Config, dtypes: list[str], seconds: float, rounds: int) -> None:
    """Measures and prints learn_step's samples/s in each of `dtypes`, alternating
    (see the module docstring)."""
    import torch

    from impala.learner import _device

    progress(f"learner step in {', '.join(dtypes)}: {rounds} rounds of {seconds:g} s each")
    print(
        f"learner step: {config.level_name}, {config.network} network{' + LSTM' if config.use_lstm else ''}, "
        f"batch {config.batch_size} x unroll {config.unroll_length}, device {_device(config.device)}, "
        f"{torch.get_num_threads()} torch thread(s), {time.strftime('%Y-%m-%d')}; samples/s"
    )
    print(f"{'round':>5s} " + " ".join(f"{d:>12s}" for d in dtypes))
    rates: dict[str, list[float]] = {d: [] for d in dtypes}
    for r in range(1, rounds + 1):
        for d in dtypes:
            progress(f"round {r}/{rounds}: {d}")
            rates[d].append(learner_samples_per_second(config.replace(learner_dtype=d), seconds))
        print(f"{r:5d} " + " ".join(f"{rates[d][-1]:12,.0f}" for d in dtypes), flush=True)
    medians = {d: float(np.median(v)) for d, v in rates.items()}
    print(f"{'median':>5s} " + " ".join(f"{medians[d]:12,.0f}" for d in dtypes))
    print(
        f"{'ratio':>5s} " + " ".join(f"{medians[d] / medians[dtypes[0]]:11.2f}x" for d in dtypes) + "  (of the medians)"
    )
    paired = {d: float(np.median(np.array(rates[d]) / np.array(rates[dtypes[0]]))) for d in dtypes}
    print(
        f"{'ratio':>5s} "
        + " ".join(f"{paired[d]:11.2f}x" for d in dtypes)
        + "  (median of each round's ratio: load that drifts hits both formats of a round)"
    )


def training_run(
    impala_flags: list[str], config: config_lib.Config, warmup: float, duration: float
) -> tuple[float, dict[str, float], dict]:
    """Runs local training in a subprocess on all cores. Returns agent steps/s
    after the warm-up, the mean of each 'time/...' metric over the same window
    (seconds per second), and the last metrics row."""
    with tempfile.TemporaryDirectory(prefix="impala-bench-") as logdir:
        command = [
            sys.executable,
            "-m",
            "impala.experiment",
            *impala_flags,
            f"--logdir={logdir}",
            "--total_environment_frames=1000000000000",
            "--log_interval_s=1",
            "--checkpoint_interval_s=1e9",
        ]
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        metrics = Path(logdir) / "metrics.jsonl"
        try:
            # The clock starts at the first update, so process start-up is not counted.
            progress("training run: starting (waiting for its first update)")
            deadline = time.monotonic() + 300
            while not (metrics.exists() and any(r["frames"] > 0 for r in read_jsonl(metrics))):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"training did not start: {process.stderr.read()[-2000:]}")
                time.sleep(0.2)
            begin = time.monotonic()
            while (elapsed := time.monotonic() - begin) < warmup + duration:
                part = "warm-up" if elapsed < warmup else "measuring"
                progress(f"training run: {elapsed:3.0f} s of {warmup:g} s warm-up + {duration:g} s ({part})")
                time.sleep(min(10.0, warmup + duration - elapsed))
            progress("training run: stopping it")
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
        # Row i's time/... values cover the interval ending at row i: rows 1.. of the window.
        parts = sorted({k for r in window for k in r if k.startswith("time/")})
        busy = {k[len("time/") :]: float(np.mean([r.get(k) or 0.0 for r in window[1:]])) for k in parts}
        return frames / seconds / config.num_action_repeats, busy, last


TIME_PARTS = {  # metrics 'time/<part>' -> what the table calls it
    "actor_env": "actors: environments",
    "actor_inference": "actors: inference",
    "actor_act": "actors: acting (env workers + batched inference)",
    "actor_send": "actors: encode + send unrolls (waits when queues are full)",
    "actor_params": "actors: fetch + load parameters",
    "learner_receive": "learner: receive + decode + validate unrolls",
    "learner_assemble": "learner: assemble batches",
    "learner_queue_full": "learner: batch queue full (receiver waits)",
    "learner_wait": "learner: waiting for a batch",
    "learner_step": "learner: learn_step",
    "learner_publish": "learner: snapshot parameters (encoded on its own thread)",
}


def throughput(config: config_lib.Config, impala_flags: list[str], args: argparse.Namespace) -> None:
    """Measures and prints the limit and the training run (see the module docstring)."""
    cores = os.cpu_count() or 1
    batch = actor_batch_size(config)
    p = config.replay_proportion
    progress(f"1/5 environment alone, {args.part_seconds:g} s")
    env = environment_steps_per_second(config, args.part_seconds)
    progress(f"2/5 inference at batch {batch}, {args.part_seconds:g} s")
    inference = inference_samples_per_second(config, batch, args.part_seconds)
    progress(f"3/5 learner step, {args.part_seconds:g} s")
    learner = learner_samples_per_second(config, args.part_seconds)
    replayed = 0.0
    if p > 0:
        progress(f"4/5 replay sampling, {args.part_seconds:g} s")
        replayed = replay_samples_per_second(config, args.part_seconds)
    progress(f"5/5 the training run, {args.warmup:g} s warm-up + {args.duration:g} s")
    limit = machine_limit(cores, env, inference, learner, replayed, p)
    steps, busy, last = training_run(impala_flags, config, args.warmup, args.duration)
    actors = f"{config.num_actors} actors x {config.num_envs_per_actor} envs" + (
        f" in {config.env_workers_per_actor} env workers each" if config.env_workers_per_actor else " (lock-step)"
    )
    print(
        f"{config.level_name}, {config.network} network{' + LSTM' if config.use_lstm else ''}, {actors}, "
        f"batch {config.batch_size} x unroll {config.unroll_length}, {cores} cores, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(f"{'part (one core, one torch thread)':58s} {'per second':>12s} {'us/agent step':>14s}")
    for name, rate in (
        ("environment alone (agent steps)", env),
        (f"inference at batch {batch} (samples)", inference),
        (f"learner step, {config.batch_size} x {config.unroll_length} (samples)", learner),
        *([(f"replay sampling, {config.replay_buffer_size} columns (samples)", replayed)] if p > 0 else []),
    ):
        print(f"  {name:56s} {rate:12,.0f} {1e6 / rate:14.0f}")
    summed = f"env + inference + {1 + p:g} x learner + {p:g} x replay" if p > 0 else "sum of the three"
    print(f"{f'limit: {cores} cores / ({summed})':58s} {limit:12,.0f} agent steps/s")
    print(
        f"{f'training run ({args.duration:g} s after {args.warmup:g} s warm-up)':58s} {steps:12,.0f} agent steps/s "
        f"({steps * config.num_action_repeats:,.0f} frames/s)"
    )
    print(f"{'ratio to the limit':58s} {steps / limit:12.1%}")
    print(f"{'policy lag at the end (updates)':58s} {last.get('policy_lag') or 0:12.1f}")
    print(f"{'where the time went in the run':58s} {'cores busy':>12s} {'us/agent step':>14s}")
    for part, name in TIME_PARTS.items():
        if part in busy:
            print(f"  {name:56s} {busy[part]:12.2f} {busy[part] / steps * 1e6:14.0f}")
    work = sum(v for k, v in busy.items() if k not in ("learner_wait", "learner_queue_full", "actor_send", "actor_act"))
    print(f"  {'(work above, excluding waits)':56s} {work:12.2f}")
    print(
        "'cores busy' is wall-clock seconds inside each part per second, summed over the learner's\n"
        "threads and the actor processes (impala.metrics.Stopwatch), not CPU time: a thread that\n"
        f"waits for one of the {cores} cores, or for Python's GIL, inside a part still counts, so with\n"
        f"more runnable threads than cores the sum can exceed {cores}."
    )


def _random_stepper(config: config_lib.Config, seeds: list[int], seconds: float, start, results) -> None:
    """A raw-rate process: steps its environments round-robin with random actions."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    environments = [_make_env(config, seed) for seed in seeds]
    rng = np.random.default_rng(seeds[0])
    for env in environments:
        env.initial()
    results.put(None)  # ready
    start.wait()
    steps, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        for env in environments:
            env.step(int(rng.integers(env.num_actions)))
        steps += len(environments)
    results.put(steps / (time.perf_counter() - begin))
    for env in environments:
        env.close()


def _lock_step_actor(config: config_lib.Config, seeds: list[int], seconds: float, start, results) -> None:
    """A lock-step actor process (impala/actor.py `LockStep`) on these environments."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from impala import unroll
    from impala.actor import LockStep
    from impala.nets import make_agent

    torch.set_num_threads(1)
    stepper = LockStep([_make_env(config, seed) for seed in seeds])
    agent = make_agent(config, stepper.spec.observation_shape, stepper.spec.num_actions, acting=True)
    spec = unroll.spec_of(config.unroll_length, stepper.spec, [s.shape[1] for s in agent.initial_state(1)])
    buffer = unroll.new_unroll(spec, stepper.num_envs)
    stepper.initial(buffer)
    state = stepper.act(agent, buffer, agent.initial_state(stepper.num_envs), config.unroll_length)
    buffer = unroll.next_unroll(spec, buffer)
    results.put(None)  # ready
    start.wait()
    steps, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        state = stepper.act(agent, buffer, state, config.unroll_length)
        buffer = unroll.next_unroll(spec, buffer)
        steps += config.unroll_length * stepper.num_envs
    results.put(steps / (time.perf_counter() - begin))
    stepper.close()


def _in_processes(config: config_lib.Config, seconds: float, target) -> float:
    """Runs target(config, seeds, ...) on the actor's environments, split over
    --env_workers_per_actor processes as the actor host splits them, all starting
    together; their summed agent steps/s."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    seeds = np.array_split(np.arange(config.num_envs_per_actor) + config.seed, config.env_workers_per_actor)
    start, results = context.Event(), context.Queue()
    processes = [
        context.Process(target=target, daemon=True, args=(config, group.tolist(), seconds, start, results))
        for group in seeds
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            _result(results, processes, 300)  # every process has its environments: start together
        start.set()
        return sum(_result(results, processes, seconds + 300) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def _result(results, processes: list, timeout: float):
    """The next item on `results`; raises at once (not after `timeout`) when one of
    `processes` has died without sending it (its traceback is on stderr)."""
    import queue

    deadline = time.monotonic() + timeout
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a benchmark process exited with code {dead[0].exitcode} (see its traceback above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no result from the benchmark processes in {timeout:.0f} s")


def raw_environment_steps_per_second(config: config_lib.Config, seconds: float) -> float:
    """The actor's environments in --env_workers_per_actor processes, stepping random
    actions with no inference; agent steps/s."""
    return _in_processes(config, seconds, _random_stepper)


def lock_step_steps_per_second(config: config_lib.Config, seconds: float) -> float:
    """The same environments in as many lock-step actor processes (each its own
    batched inference, no env workers, no learner); agent steps/s."""
    return _in_processes(config, seconds, _lock_step_actor)


def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process (or one of its threads), from /proc."""
    path = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_cores_seconds() -> float:
    """Idle + iowait CPU seconds of the whole machine so far, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


def actor_host_steps_per_second(config: config_lib.Config, seconds: float) -> tuple[float, float, dict]:
    """One actor host acting with the config's network as run_actor does, minus the
    learner: (agent steps/s, mean rows per batched forward pass, where the CPU went
    in microseconds per agent step: env workers, the actor's threads, inference, idle)."""
    import torch

    from impala import unroll
    from impala.actor_host import ActorHost
    from impala.nets import make_agent

    torch.manual_seed(config.seed)
    n, steps_per_unroll = config.num_envs_per_actor, config.unroll_length
    with ActorHost.from_config(config, config.level_name, config.seed) as host:
        agent = make_agent(config, host.observation_shape, host.num_actions, acting=True)
        spec = unroll.unroll_spec(
            steps_per_unroll,
            host.observation_shape,
            host.observation_dtype,
            host.num_actions,
            [s.shape[1] for s in agent.initial_state(1)],
        )
        buffer = unroll.new_unroll(spec, n)
        host.initial(buffer)
        state = agent.initial_state(n)
        for _ in range(2):  # warm-up: first batches, page faults of fresh buffers
            state = host.act(agent, buffer, state, steps_per_unroll)
            buffer = unroll.next_unroll(spec, buffer)
        host.batches = host.rows = 0
        host.stopwatch.take()
        threads = os.listdir(f"/proc/{os.getpid()}/task")

        def cpu() -> list[float]:
            return (
                [sum(_cpu_seconds(pid) for pid in host.worker_pids)]
                + [_cpu_seconds(os.getpid(), int(t)) for t in threads]
                + [_idle_cores_seconds()]
            )

        before = cpu()
        steps, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < seconds:
            state = host.act(agent, buffer, state, steps_per_unroll)
            buffer = unroll.next_unroll(spec, buffer)
            steps += steps_per_unroll * n
        elapsed = time.perf_counter() - begin
        used = [(b - a) / steps * 1e6 for a, b in zip(before, cpu())]
        where = {
            "env workers": used[0],
            "actor threads": sum(used[1:-1]),
            "of which inference": host.stopwatch.take().get("inference", 0.0) / steps * 1e6,
            "idle cores": used[-1],
        }
        return steps / elapsed, host.rows / max(host.batches, 1), where


def actor_side(config: config_lib.Config, seconds: float, rounds: int) -> None:
    """Measures and prints the actor-side table (see the module docstring)."""
    if config.env_workers_per_actor == 0:
        config = config.replace(env_workers_per_actor=min(os.cpu_count() or 1, config.num_envs_per_actor))
    maximum = actor_batch_size(config)
    unbatched = config.replace(inference_minimum_batch_size=1, inference_maximum_batch_size=1)
    print(
        f"actor side: {config.level_name}, {config.network} network, {config.num_envs_per_actor} envs in "
        f"{config.env_workers_per_actor} env workers, unroll {config.unroll_length}, batches of "
        f"{config.inference_minimum_batch_size}..{maximum} rows, timeout {config.inference_timeout_ms:g} ms, "
        f"{os.cpu_count()} cores; agent steps/s"
    )
    print(
        f"{'round':>5s} {'raw envs':>10s} {'host':>10s} {'ratio':>7s} {'rows/batch':>10s} "
        f"{'host, batch 1':>13s} {'speed-up':>8s} {'lock-step':>10s} {'ratio':>7s}"
    )
    ratios, speedups, lock_ratios = [], [], []
    for r in range(1, rounds + 1):
        progress(f"actor side, round {r}/{rounds}: 1/5 raw environments, {seconds:g} s")
        raw_before = raw_environment_steps_per_second(config, seconds)
        progress(f"actor side, round {r}/{rounds}: 2/5 actor host, {seconds:g} s")
        batched, rows, where = actor_host_steps_per_second(config, seconds)
        progress(f"actor side, round {r}/{rounds}: 3/5 raw environments again, {seconds:g} s")
        raw = (raw_before + raw_environment_steps_per_second(config, seconds)) / 2
        progress(f"actor side, round {r}/{rounds}: 4/5 actor host with batches of 1, {seconds:g} s")
        single, _, _ = actor_host_steps_per_second(unbatched, seconds)
        progress(f"actor side, round {r}/{rounds}: 5/5 lock-step actors, {seconds:g} s")
        lock_step = lock_step_steps_per_second(config, seconds)
        ratios.append(batched / raw)
        speedups.append(batched / single)
        lock_ratios.append(lock_step / raw)
        print(
            f"{r:5d} {raw:10,.0f} {batched:10,.0f} {batched / raw:7.1%} {rows:10.1f} {single:13,.0f} "
            f"{batched / single:7.2f}x {lock_step:10,.0f} {lock_step / raw:7.1%}",
            flush=True,
        )
    print(
        f"{'median':>5s} {'':10s} {'':10s} {float(np.median(ratios)):7.1%} {'':10s} {'':13s} "
        f"{float(np.median(speedups)):7.2f}x {'':10s} {float(np.median(lock_ratios)):7.1%}"
    )
    print(
        "where the CPU went in the host, last round (us per agent step; wall time of the "
        f"{os.cpu_count()} cores: {(os.cpu_count() or 1) / batched * 1e6:,.0f}): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in where.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other argument is a flag of python -m impala.experiment (e.g. "
        "--flagfile=configs/pong.cfg); the measured run uses them. Progress goes to stderr, results "
        "to stdout. The module docstring (scripts/bench.py) says what each number is.",
    )
    parser.add_argument(
        "--measure",
        choices=("all", "training", "actor", "learner"),
        default="training",
        help="training (default): the one-core parts, the limit and the training run; "
        "actor: the actor side; all: both; learner: the learner step in each of "
        "--learner_dtypes",
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of training measured after the warm-up (default 60)"
    )
    parser.add_argument(
        "--warmup", type=float, default=20.0, help="seconds of training at the start that are not counted (default 20)"
    )
    parser.add_argument(
        "--part_seconds",
        type=float,
        default=10.0,
        help="seconds of each one-core measurement: environment, inference, learner (default 10)",
    )
    parser.add_argument(
        "--actor_seconds", type=float, default=10.0, help="seconds of each actor-side measurement (default 10)"
    )
    parser.add_argument("--actor_rounds", type=int, default=2, help="rounds of actor-side measurements (default 2)")
    parser.add_argument(
        "--learner_dtypes",
        default="float32,bfloat16",
        help="--measure=learner: the --learner_dtype values compared, comma separated; ratios "
        "are to the first (default float32,bfloat16)",
    )
    parser.add_argument(
        "--learner_rounds",
        type=int,
        default=5,
        help="--measure=learner: rounds, each measuring every format once (default 5)",
    )
    args, impala_flags = parser.parse_known_args()
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    try:
        flag_values([sys.argv[0], *impala_flags])
        config = config_lib.from_flags(flag_values)
        dtypes = [d.strip() for d in args.learner_dtypes.split(",") if d.strip()]
        for d in dtypes:
            config.replace(learner_dtype=d)  # a ConfigError for a format that does not exist
        if not dtypes or args.learner_rounds < 1:
            raise config_lib.ConfigError("--learner_dtypes needs a format and --learner_rounds at least 1")
    except (flags.Error, config_lib.ConfigError) as e:
        print(f"bench.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)

    import torch

    torch.set_num_threads(1)
    reuse_freed_memory()  # as the actors and the learner do
    if args.measure in ("all", "training"):
        throughput(config, impala_flags, args)
    if args.measure == "all":
        print()
    if args.measure in ("all", "actor"):
        actor_side(config, args.actor_seconds, args.actor_rounds)
    if args.measure == "learner":
        learner_dtypes(config, dtypes, args.part_seconds, args.learner_rounds)


if __name__ == "__main__":
    main()
