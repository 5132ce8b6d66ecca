"""How many actors one learner takes: a load generator on the real wire.

    python scripts/load.py --flagfile=configs/pong.cfg --num_envs_per_actor=1 \\
        --processes 8 --sockets 6 [--measure both] [--seconds 20] [--warmup 10] [impala flags]

C = --processes x --sockets connections (DEALER sockets, each its own actor task)
send valid, distinct unrolls of the level's shape (impala.unroll.spec_of of the
real environment's spaces and the agent's core state: --level_name,
--num_envs_per_actor, --unroll_length) to a real `Learner` (impala/learner.py: its
sockets, its 'unrolls' thread, UnrollReceiver, batch assembler and queue), with the
real wire and, given --keys_dir, CurveZMQ. Each sender keeps every socket as full
as ZeroMQ lets it (the learner's back-pressure decides the rate). Two measurements:
  receive: the learner's receive path alone: training is replaced by draining its
    batch queue (and checking each batch), so unrolls/s and agent steps/s here are
    what the receiving thread can deliver;
  learner: the real Learner.run training on what it receives (on --device, CPU
    here): the agent steps/s it consumes.
The ratio receive / learner says how many such learners one receive path could feed.

Contents: rewards in {-1, 0, 1}, episodes that end (done) with consistent running
returns and lengths, behaviour logits finite (N(0, 0.5)) with actions sampled from
them, LSTM states in range, step 0 repeating the previous unroll's last step.
Observations cycle through a few precomputed windows of random pixels (making them
fresh would make the senders, not the learner, the limit); everything else is fresh
per unroll, so no two unrolls are equal.

Checks (exit status 1 if one fails): each unroll carries (connection, sequence) and
one CRC-32 per environment column in its meta ('load'); the receiving side (a hook
on UnrollReceiver.receive) sees each connection's sequence exactly once and in
order, and every batch taken from the queue (for training or draining) holds
exactly the next columns received, in order, with matching checksums (every
--check_every'th batch is checksummed, all are counted). At the end every unroll
each sender sent has been received once, and what was received and not taken is
less than one batch (the assembler's leftover). No bad messages. The learner
process's RSS (sampled from /proc) stays under what its queues allow: base + C x
(read-ahead + 1) x message + (max_queued_batches + 3) x batch + --rss_allowance_mb,
where read-ahead is the unroll socket's RCVHWM (learner.unroll_rcvhwm: 4 unrolls of
1-env Pong, 1 of 16-env).
The whole (learner and senders) is stopped if it passes --max_rss_mb.

The learner runs in this process (so its RSS is this process's), the senders in
--processes child processes. A benchmark, not a test; numbers drift with the load of
the machine, which the report prints.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from absl import flags, logging

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Light imports only: the sender processes import this module, and need no torch.
from impala import config as config_lib  # noqa: E402 (after the sys.path line above)
from impala import security, step, unroll, wire  # noqa: E402

OBS_WINDOWS = 4  # precomputed observation windows per sender process
MEAN_EPISODE_STEPS = 400  # agent steps; episodes end at random with this mean
META_KEY = "load"
# Every connection must have sent an unroll within STARTUP_S + STARTUP_S_PER_CONNECTION x C
# (a failure deadline, not a measurement): the learner takes each connection's first
# unroll in turn, a few hundred a second on a loaded 2-core machine.
STARTUP_S = 60.0
STARTUP_S_PER_CONNECTION = 0.1


class UsageError(ValueError):
    """A setting that cannot work; one line for the user (exit status 2)."""


# --- checksums: one function, used by the senders and by the receiving side -----------


def column_crc(arrays: Mapping[str, Any], spec: Mapping, column: int, observation_crc: int | None = None) -> int:
    """CRC-32 of environment `column` of an unroll or batch (numpy arrays, [T+1, n, ...]
    time-major, [n, ...] otherwise): the observation's steps in order, then the other
    arrays in `spec` order. `observation_crc` (already known) skips the observation."""
    crc = observation_crc
    if crc is None:
        crc = 0
        observation = arrays["observation"]
        for t in range(observation.shape[0]):
            crc = zlib.crc32(np.ascontiguousarray(observation[t, column]), crc)
    for name, (_, _, time_major) in spec.items():
        if name != "observation":
            crc = zlib.crc32(np.ascontiguousarray(arrays[name][:, column] if time_major else arrays[name][column]), crc)
    return crc


# --- the senders ------------------------------------------------------------------------


class Observations:
    """OBS_WINDOWS observation arrays [T+1, n, ...] of random values that chain: window
    k's step 0 is window k-1's step T (cyclically), as consecutive unrolls' do; and
    each column's CRC-32, precomputed."""

    def __init__(self, spec: Mapping, num_envs: int, rng: np.random.Generator):
        dtype, shape, _ = spec["observation"]
        steps = shape[0]
        frames_shape = (OBS_WINDOWS * (steps - 1), num_envs, *shape[1:])
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            frames = rng.integers(max(info.min, 0), min(info.max, 255), frames_shape, dtype=dtype, endpoint=True)
        else:
            frames = rng.standard_normal(frames_shape).astype(dtype)
        count = frames.shape[0]
        self.windows = [
            np.ascontiguousarray(frames[[(k * (steps - 1) + t) % count for t in range(steps)]])
            for k in range(OBS_WINDOWS)
        ]
        self.crcs = [[column_crc({"observation": w}, {}, e) for e in range(num_envs)] for w in self.windows]


class UnrollMaker:
    """One connection's stream of unrolls: plausible, consecutive (step 0 repeats the
    previous unroll's step T), each different from every other."""

    def __init__(
        self,
        spec: Mapping,
        num_envs: int,
        num_actions: int,
        connection: int,
        observations: Observations,
        rng: np.random.Generator,
    ):
        self.spec, self.num_envs, self.num_actions, self.connection = spec, num_envs, num_actions, connection
        self.observations, self.rng = observations, rng
        self.fresh = {name: layout for name, layout in spec.items() if name != "observation"}
        self.sequence = 0
        self.previous = unroll.new_unroll(spec, num_envs)
        self.window = connection % OBS_WINDOWS
        self.previous["observation"] = observations.windows[self.window - 1]
        self.previous["policy_logits"][-1] = self._logits((num_envs,))
        self.episode_return = np.zeros(num_envs, np.float32)
        self.episode_step = np.zeros(num_envs, np.int32)

    def _logits(self, shape: tuple[int, ...]) -> np.ndarray:
        return (0.5 * self.rng.standard_normal((*shape, self.num_actions))).astype(np.float32)

    def next(self) -> tuple[unroll.Unroll, dict]:
        """(arrays, meta entry) of the next unroll."""
        rng, n = self.rng, self.num_envs
        out = unroll.next_unroll(self.fresh, self.previous)  # the observations come from the windows
        steps = out["reward"].shape[0]
        out["observation"] = self.observations.windows[self.window]
        logits = self._logits((steps - 1, n))
        out["policy_logits"][1:] = logits
        out["action"][1:] = np.argmax(logits + rng.gumbel(size=logits.shape), axis=-1)  # sampled from them
        u = rng.random((steps - 1, n))
        out["reward"][1:] = np.where(u < 0.02, -1.0, np.where(u > 0.98, 1.0, 0.0))
        out["done"][1:] = rng.random((steps - 1, n)) < 1.0 / MEAN_EPISODE_STEPS
        for t in range(1, steps):  # running totals; at done the finished episode's, then reset
            self.episode_return += out["reward"][t]
            self.episode_step += 1
            out["episode_return"][t] = self.episode_return
            out["episode_step"][t] = self.episode_step
            self.episode_return[out["done"][t]] = 0.0
            self.episode_step[out["done"][t]] = 0
        for name, (_, shape, _time_major) in self.spec.items():
            if name.startswith("core_state_"):  # LSTM h in (-1, 1), c of moderate size
                values = rng.standard_normal((n, *shape)).astype(np.float32)
                out[name] = np.tanh(values) if name.endswith("_0") else 0.5 * values
        crcs = [column_crc(out, self.spec, e, self.observations.crcs[self.window][e]) for e in range(n)]
        meta = {"c": self.connection, "s": self.sequence, "crc": crcs}
        self.previous, self.sequence = out, self.sequence + 1
        self.window = (self.window + 1) % OBS_WINDOWS
        return out, meta


def _sender(
    address: str,
    connections: list[int],
    spec: dict,
    num_envs: int,
    num_actions: int,
    level: str,
    keys_dir: str,
    seed: int,
    max_unrolls: int,
    inject: str,
    sndhwm: int,
    stop: Any,
    results: Any,
) -> None:
    """One sender process: a DEALER socket per connection, each sent to as fast as it
    takes messages, until `stop` is set or each sent `max_unrolls` (0: no limit). Puts
    {connection: unrolls sent} on `results`. An unroll is made only when its socket has
    room, so a connection holds at most `sndhwm` + 1 (the one being written) here."""
    rng = np.random.default_rng(seed)
    context = zmq.Context()
    context.max_sockets = len(connections) + 16
    observations = Observations(spec, num_envs, rng)
    makers, sockets = [], []
    for c in connections:
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.SNDHWM, sndhwm)  # the actors' (impala/actor.py)
        if keys_dir:
            security.connect_securely(s, keys_dir)
        s.connect(address)
        sockets.append(s)
        makers.append(UnrollMaker(spec, num_envs, num_actions, c, observations, rng))
    sent = dict.fromkeys(connections, 0)
    poller = zmq.Poller()
    for s in sockets:
        poller.register(s, zmq.POLLOUT)

    def message(i: int) -> list:
        arrays, meta = makers[i].next()
        frames = wire.encode(
            "unroll", arrays, task=connections[i], param_version=0, meta={"level": level, META_KEY: meta}
        )
        if inject and connections[i] == 0 and meta["s"] == 1:  # deliberate faults, for the tests
            if inject == "duplicate":  # sent here and again by the caller
                sockets[i].send_multipart(frames, copy=False)
            elif inject == "drop":
                sent[connections[i]] += 1
                return message(i)
            elif inject == "corrupt":  # an in-range change the checksum must notice
                arrays["action"][1, 0] = (arrays["action"][1, 0] + 1) % num_actions
                frames = wire.encode(
                    "unroll", arrays, task=connections[i], param_version=0, meta={"level": level, META_KEY: meta}
                )
        return frames

    while not stop.is_set():
        progressed = False
        for i, s in enumerate(sockets):
            if max_unrolls and sent[connections[i]] >= max_unrolls:
                continue
            if not s.get(zmq.EVENTS) & zmq.POLLOUT:
                continue
            # POLLOUT: a DEALER with one peer takes the message, so this send does not block.
            s.send_multipart(message(i), copy=False)
            progressed = True
            sent[connections[i]] += 1
        if max_unrolls and all(v >= max_unrolls for v in sent.values()):
            break
        if not progressed:
            poller.poll(100)
    results.put(sent)
    for s in sockets:  # deliver what was sent before the counts are compared
        s.close(linger=60_000)
    context.term()


# --- the receiving side: what arrived, what was taken, and their checks ----------------


class Ledger:
    """The receiving side's account of every unroll. `received` runs in the learner's
    'unrolls' thread (a hook on UnrollReceiver.receive), `taken` in the thread that takes
    batches (training or draining); both under one lock. Problems are collected, not
    raised: the run goes on and the report lists them."""

    def __init__(self, spec: Mapping, check_every: int):
        self.spec, self.check_every = spec, check_every
        self.next_sequence: dict[int, int] = {}
        self.columns: collections.deque = collections.deque()  # (connection, sequence, env, crc), FIFO
        self.unrolls = self.envs = self.taken_columns = self.taken_batches = self.checked_columns = 0
        self.problems: list[str] = []
        self.problem_count = 0
        self._lock = threading.Lock()

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < 10:
            self.problems.append(text)

    def received(self, message: wire.Message) -> int:
        """Books an unroll about to be validated and assembled; returns its columns."""
        entry = message.meta.get(META_KEY)
        with self._lock:
            if not isinstance(entry, dict):
                self.problem(f"an unroll from task {message.task} without its '{META_KEY}' entry")
                return 0
            connection, sequence, crcs = entry["c"], entry["s"], entry["crc"]
            expected = self.next_sequence.get(connection, 0)
            if sequence != expected:
                what = "twice" if sequence < expected else f"after {expected - 1}: {sequence - expected} missing"
                self.problem(f"connection {connection}: unroll {sequence} received {what}")
            self.next_sequence[connection] = max(expected, sequence + 1)
            self.columns.extend((connection, sequence, e, crc) for e, crc in enumerate(crcs))
            self.unrolls += 1
            self.envs += len(crcs)
            return len(crcs)

    def refused(self, columns: int) -> None:
        """Undoes `received` for an unroll the receiver refused (it is counted as a bad message)."""
        with self._lock:
            for _ in range(columns):
                self.columns.pop()
            self.unrolls -= 1
            self.envs -= columns

    def taken(self, batch: Mapping[str, Any]) -> None:
        """Checks a batch taken from the queue: the next columns received, in order."""
        arrays = {name: t.numpy() for name, t in batch.items()}
        size = arrays["reward"].shape[1]
        with self._lock:
            if len(self.columns) < size:
                self.problem(f"a batch of {size} columns when only {len(self.columns)} were received and not taken")
                return
            expected = [self.columns.popleft() for _ in range(size)]
            self.taken_columns += size
            self.taken_batches += 1
            check = self.taken_batches % self.check_every == 0
        if check:  # outside the lock: the receiving thread goes on meanwhile
            for b, (connection, sequence, e, crc) in enumerate(expected):
                got = column_crc(arrays, self.spec, b)
                if got != crc:
                    with self._lock:
                        self.problem(
                            f"batch column {b} (connection {connection}, unroll {sequence}, env {e}): "
                            f"checksum {got:08x}, sent {crc:08x}"
                        )
            with self._lock:
                self.checked_columns += size

    def sequences(self) -> int:
        """The unrolls of all connections up to the latest received of each."""
        with self._lock:
            return sum(self.next_sequence.values())

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.unrolls, self.envs

    def finish(self, sent: Mapping[int, int], batch_size: int) -> list[str]:
        """Final checks against what the senders say they sent."""
        with self._lock:
            for connection, count in sorted(sent.items()):
                got = self.next_sequence.get(connection, 0)
                if got != count:
                    self.problem(f"connection {connection}: sent {count} unrolls, received {got}")
            if len(self.columns) >= batch_size:
                self.problem(f"{len(self.columns)} columns received and never taken (a batch is {batch_size})")
            return list(self.problems)


def hook(receiver: Any, ledger: Ledger, train: bool) -> None:
    """Puts the ledger on the receiver's path: each received unroll is booked before the
    receiver validates and assembles it; each batch is checked as it leaves the queue."""
    receive, next_batch = receiver.receive, receiver.next_batch

    def booked_receive(identity: bytes, message: wire.Message) -> None:
        columns = ledger.received(message)
        try:
            receive(identity, message)
        except (wire.WireError, unroll.UnrollError):
            ledger.refused(columns)
            raise

    def checked_next_batch(timeout: float) -> Any:
        batch = next_batch(timeout)
        if batch is not None:
            ledger.taken(batch)
        return batch

    receiver.receive = booked_receive
    receiver.checked_next_batch = checked_next_batch
    if train:  # the training loop's batches are checked too
        receiver.next_batch = checked_next_batch


# --- memory --------------------------------------------------------------------------


def rss_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, IndexError, ValueError):  # the process is gone
        return 0.0


class MemoryWatch(threading.Thread):
    """Samples this process's RSS and the senders' every 0.2 s; sets `over` (and stops
    the run through `stop`) when their sum passes `limit_mb`."""

    def __init__(self, pids: list[int], limit_mb: float, stop: Any):
        super().__init__(name="memory", daemon=True)
        self.pids, self.limit_mb, self.stop = pids, limit_mb, stop
        self.peak = self.peak_total = 0.0
        self.over = ""
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            mine = rss_mb()
            total = mine + sum(rss_mb(p) for p in self.pids)
            self.peak, self.peak_total = max(self.peak, mine), max(self.peak_total, total)
            if total > self.limit_mb and not self.over:
                self.over = f"learner + senders RSS {total:,.0f} MB > --max_rss_mb={self.limit_mb:,.0f}; stopped"
                self.stop.set()


def receive_cpu_s() -> float:
    """CPU seconds so far of the receive path's threads, from /proc: the learner's
    'unrolls' thread and ZeroMQ's I/O threads (which name themselves 'ZMQbg/IO/n')."""
    unrolls = {t.native_id for t in threading.enumerate() if t.name == "unrolls"}
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if int(task.name) in unrolls or name.startswith("ZMQbg/IO"):
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise UsageError(f"{needed} file descriptors needed, the hard limit (ulimit -Hn) is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# --- one measurement ------------------------------------------------------------------


def measure(config: config_lib.Config, args: argparse.Namespace, env: Any, train: bool) -> dict:
    """Starts a Learner and the senders; returns what was measured (see the docstring).
    The measured window starts --warmup seconds after every connection's first unroll."""
    from impala import learner as learner_lib
    from impala.actor import UNROLL_SNDHWM

    learner = learner_lib.Learner(config, env)
    spec = learner.unroll_spec
    ledger = Ledger(spec, args.check_every)
    hook(learner.receiver, ledger, train)
    if train:  # the training loop takes its batches through the feed
        learner.feed.source = learner.receiver.next_batch
    base = rss_mb()
    context = multiprocessing.get_context("spawn")
    stop, results = context.Event(), context.Queue()
    connections = args.processes * args.sockets
    senders = [
        context.Process(
            target=_sender,
            daemon=True,
            args=(
                learner.unroll_address,
                list(range(p * args.sockets, (p + 1) * args.sockets)),
                spec,
                config.num_envs_per_actor,
                env.num_actions,
                config.level_name,
                config.keys_dir,
                config.seed + p,
                args.unrolls,
                args.inject,
                UNROLL_SNDHWM,
                stop,
                results,
            ),
        )
        for p in range(args.processes)
    ]
    for s in senders:
        s.start()
    watch = MemoryWatch([s.pid for s in senders], args.max_rss_mb, stop)
    watch.start()
    # name -> (time, unrolls, envs, frames trained, receive CPU seconds)
    marks: dict[str, tuple[float, int, int, int, float]] = {}
    start = time.monotonic()
    startup_s = STARTUP_S + STARTUP_S_PER_CONNECTION * connections

    def mark(name: str) -> None:
        marks[name] = (time.monotonic(), *ledger.counts(), learner.frames, receive_cpu_s())

    def tick() -> None:  # at least once a second, and after every batch when training
        if "connected" not in marks:
            if len(ledger.next_sequence) == connections:
                mark("connected")
            elif time.monotonic() - start > startup_s:
                ledger.problem(
                    f"only {len(ledger.next_sequence)} of {connections} connections sent an unroll in {startup_s:.0f} s"
                )
                stop.set()
        now = time.monotonic() - marks["connected"][0] if "connected" in marks else -1.0
        if "warm" not in marks and now >= args.warmup:
            mark("warm")
        if "end" not in marks and (now >= args.warmup + args.seconds or stop.is_set()):
            mark("end")
        if "end" in marks or (args.unrolls and all_sent()):
            raise _Finished

    sent: dict[int, int] = {}

    def all_sent() -> bool:
        while len(sent) < connections and not results.empty():
            sent.update(results.get())
        return len(sent) == connections and ledger.sequences() >= sum(sent.values())

    try:
        try:
            if train:
                learner.run(tick)
            else:
                while True:
                    learner.check_threads()
                    learner.receiver.checked_next_batch(timeout=0.1)
                    tick()
        except _Finished:
            pass
        stop.set()
        if "end" not in marks:
            mark("end")
        # The rest of what was sent: received and taken, so that every unroll is accounted for.
        deadline = time.monotonic() + 60
        while not all_sent() and time.monotonic() < deadline and not watch.over:
            learner.check_threads()
            learner.receiver.checked_next_batch(timeout=0.1)
        learner.check_threads()
        while not watch.over and learner.receiver.checked_next_batch(timeout=0.5) is not None:
            pass
    finally:
        stop.set()
        for s in senders:
            if watch.over:  # no more draining: their queued unrolls would never leave
                s.kill()
            s.join(timeout=90)
            if s.is_alive():
                s.kill()
        while len(sent) < connections and not results.empty():
            sent.update(results.get())
        watch.done.set()
        watch.join()
        bad = learner.book.take_report().bad_messages
        learner.close(save=False)

    problems = []
    if len(sent) < connections:
        problems.append(f"{connections - len(sent)} sender connections reported nothing")
    if bad:
        problems.append(f"the learner dropped {bad} bad messages")
    message_mb = learner_lib.unroll_bytes(spec, config.num_envs_per_actor) / 2**20
    batch_mb = learner_lib.unroll_bytes(spec, config.batch_size) / 2**20
    bound = (
        base
        + connections * (learner.unroll_rcvhwm + 1) * message_mb
        + (config.max_queued_batches + 3) * batch_mb
        + args.rss_allowance_mb
    )
    if watch.over:
        problems.append(watch.over)
    if "warm" not in marks and not args.unrolls:
        problems.append("the measured window never started (every connection sending, then --warmup)")
    if watch.peak > bound:
        problems.append(f"learner RSS peaked at {watch.peak:,.0f} MB, over its bound of {bound:,.0f} MB")
    problems = ledger.finish(sent, config.batch_size) + problems
    count = ledger.problem_count + len(problems) - min(ledger.problem_count, 10)
    (t0, u0, e0, f0, c0), (t1, u1, e1, f1, c1) = marks.get("warm", marks["end"]), marks["end"]
    elapsed = max(t1 - t0, 1e-9)
    return {
        "startup_s": marks["connected"][0] - start if "connected" in marks else None,
        "cpu_per_unroll": (c1 - c0) / max(u1 - u0, 1),
        "elapsed": elapsed,
        "unrolls_per_s": (u1 - u0) / elapsed,
        "steps_per_s": (e1 - e0) * config.unroll_length / elapsed,
        "trained_steps_per_s": (f1 - f0) / config.num_action_repeats / elapsed,
        "unrolls": ledger.unrolls,
        "sent": sum(sent.values()),
        "taken_columns": ledger.taken_columns,
        "checked_columns": ledger.checked_columns,
        "trained_frames": learner.frames,
        "base_mb": base,
        "peak_mb": watch.peak,
        "peak_total_mb": watch.peak_total,
        "bound_mb": bound,
        "message_mb": message_mb,
        "read_ahead": learner.unroll_rcvhwm,
        "problems": problems,
        "problem_count": count,
    }


class _Finished(Exception):
    """Raised from Learner.run's tick when the measurement is over."""


# --- the command ------------------------------------------------------------------------


def parse(argv: list[str]) -> tuple[argparse.Namespace, config_lib.Config]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other argument is a flag of python -m impala.experiment (e.g. --flagfile=configs/pong.cfg, "
        "--num_envs_per_actor, --unroll_length, --keys_dir); the learner and the unrolls' shape follow "
        "them. The module docstring (scripts/load.py) says what each number and check is.",
    )
    parser.add_argument("--processes", type=int, default=2, help="sender processes (default 2)")
    parser.add_argument(
        "--sockets",
        type=int,
        default=4,
        help="connections (DEALER sockets, one actor task each) per sender process (default 4)",
    )
    parser.add_argument(
        "--measure",
        choices=("receive", "learner", "both"),
        default="both",
        help="receive: the receive path with training replaced by draining; learner: the real "
        "learner training; both (default): one after the other, and their ratio",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds measured after the warm-up (default 20)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds at the start that are not counted: processes start, queues fill (default 10)",
    )
    parser.add_argument(
        "--unrolls",
        type=int,
        default=0,
        help="unrolls each connection sends, then it stops (0, the default: send until the end)",
    )
    parser.add_argument(
        "--check_every",
        type=int,
        default=1,
        help="checksum the columns of every Nth batch taken (default 1: all); all are counted",
    )
    parser.add_argument(
        "--max_rss_mb",
        type=float,
        default=8192.0,
        help="stop (and fail) when the learner's and the senders' RSS together pass this "
        "(default 8192): the machine is shared",
    )
    parser.add_argument(
        "--rss_allowance_mb",
        type=float,
        default=1024.0,
        help="learner RSS allowed beyond its queues' bound: allocator slack and training "
        "activations (default 1024; Pong's shallow network at batch 32 takes about 500)",
    )
    parser.add_argument(
        "--logdir",
        default="",
        help="the learner's logdir (metrics.jsonl); default: a fresh temporary folder, removed after",
    )
    parser.add_argument(
        "--inject",
        choices=("", "duplicate", "drop", "corrupt"),
        default="",
        help="for the tests: connection 0 sends its unroll 1 twice, skips it, or changes an action "
        "after its checksum; the checks must then fail",
    )
    args, impala_flags = parser.parse_known_args(argv)
    for name in ("processes", "sockets", "check_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seconds <= 0 or args.warmup < 0 or args.unrolls < 0:
        raise UsageError("--seconds must be positive, --warmup and --unrolls not negative")
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    try:
        flag_values([sys.argv[0], *impala_flags])
        config = config_lib.from_flags(flag_values)
    except flags.Error as e:
        raise UsageError(str(e).splitlines()[0])
    return args, config


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores, nice {os.nice(0)}"


def report(name: str, result: dict) -> None:
    print(
        f"{name}: {result['unrolls_per_s']:,.0f} unrolls/s, {result['steps_per_s']:,.0f} agent steps/s received"
        + (f"; {result['trained_steps_per_s']:,.0f} agent steps/s trained on" if name == "learner" else "")
        + f" ({result['elapsed']:.1f} s measured"
        + (
            f"; every connection had sent an unroll {result['startup_s']:.1f} s after the start)"
            if result["startup_s"] is not None
            else ")"
        )
    )
    if name == "receive" and result["cpu_per_unroll"] > 0:
        per_core = 1 / result["cpu_per_unroll"]
        print(
            f"  receive path CPU (the 'unrolls' thread and ZeroMQ's I/O thread): "
            f"{result['cpu_per_unroll'] * 1e6:,.0f} us per unroll, so one core of them takes {per_core:,.0f} "
            f"unrolls/s, {per_core * result['steps_per_s'] / max(result['unrolls_per_s'], 1e-9):,.0f} agent steps/s"
        )
    print(
        f"  {result['sent']:,} unrolls sent, {result['unrolls']:,} received; {result['taken_columns']:,} env "
        f"columns taken from the queue, {result['checked_columns']:,} checksummed"
        + (f"; {result['trained_frames']:,} frames trained" if name == "learner" else "")
    )
    print(
        f"  learner RSS {result['base_mb']:,.0f} MB at the start, peak {result['peak_mb']:,.0f} MB (bound "
        f"{result['bound_mb']:,.0f} MB; unrolls of {result['message_mb']:.2f} MB, read-ahead "
        f"{result['read_ahead']} per connection); with the senders, peak {result['peak_total_mb']:,.0f} MB"
    )
    if result["problem_count"]:
        print(f"  FAILED: {result['problem_count']} problem(s):")
        for problem in result["problems"]:
            print(f"    {problem}")
    else:
        print("  checks: every unroll counted once, batches in order with matching checksums, memory bounded: ok")


def main(argv: list[str]) -> int:
    logging.set_verbosity(logging.WARNING)  # not a line per connecting actor
    from impala.learner import LearnerFailure, env_spec

    try:
        args, config = parse(argv)
        connections = args.processes * args.sockets
        raise_fd_limit(2 * connections + 512)
        env = env_spec(config)
    except (UsageError, config_lib.ConfigError) as e:
        print(f"load.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="impala-load-") as scratch:
        config = config.replace(
            logdir=args.logdir or scratch,
            # A learner job on loopback TCP, as actors on other hosts reach it (a one-machine
            # run's ipc sockets lost unrolls of senders that closed: see docs/results.md).
            job_name="learner",
            total_environment_frames=2**62,
            checkpoint_interval_s=1e9,
            log_interval_s=max(config.log_interval_s, 5.0),
        )
        spec = unroll.spec_of(
            config.unroll_length,
            step.EnvSpec(env.observation_shape, env.observation_dtype, env.num_actions, env.instruction_length),
        )
        steps = spec["reward"][1][0]
        print(
            f"load.py: {config.level_name}, unrolls of {config.num_envs_per_actor} env(s) x {steps} steps; "
            f"{connections} connections ({args.processes} processes x {args.sockets} sockets), "
            f"{'CurveZMQ' if config.keys_dir else 'plain TCP'}; learner batch {config.batch_size}, "
            f"device {config.device}, {config.learner_threads} torch thread(s); {load_average()}",
            flush=True,
        )
        results = {}
        try:
            for name in ("receive", "learner"):
                if args.measure in (name, "both"):
                    results[name] = measure(config, args, env, train=name == "learner")
                    report(name, results[name])
        except (LearnerFailure, config_lib.ConfigError) as e:
            print(f"load.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
    if len(results) == 2 and results["learner"]["trained_steps_per_s"] > 0:
        ratio = results["receive"]["steps_per_s"] / results["learner"]["trained_steps_per_s"]
        print(f"ratio: the receive path delivers {ratio:.1f}x what the learner consumes")
    print(f"after: {load_average()}")
    return 1 if any(r["problem_count"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
