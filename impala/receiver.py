"""Receiving unrolls: decode, validate, book what each actor sends, assemble batches.

Three parts, each built and tested alone (none needs a socket):
  - `BatchAssembler` gathers unrolls of any number of envs into batches of exactly
    `batch_size` envs;
  - `ActorBook` keeps what the learner knows of its actors: unroll counts, policy
    lags, finished episodes, actions taken, bad messages, and liveness. Liveness is
    decided here, where unrolls arrive: an actor is back when an unroll comes from it
    after silence or over a new connection (a restarted process), and gone after
    ACTOR_SILENT_S without one;
  - `UnrollReceiver` handles one message of the unroll socket with them and puts
    finished batches, as tensors, into a bounded queue (back-pressure: a full queue
    stops reads, and the actors' sends then block). Before anything is booked it
    checks what a peer chose (`Limits`, `check_values`): the task number, the number
    of envs, the level, every value the update or the metrics read, the parameter
    version. A bad unroll is dropped whole (UnrollError), never split or repaired.

Threads: the 'unrolls' server thread calls `UnrollReceiver.handle` and alone owns
the assembler; `ActorBook` is written by that thread and read by the training
thread (`take_report`, `bad_message`), always under the book's own lock; the batch
queue is the only other thing the two threads share.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from absl import logging

from impala import unroll, wire
from impala.metrics import Stopwatch

ACTOR_SILENT_S = 30.0  # an actor not heard from this long is reported gone
# Parts of an actor's time it reports with its unrolls (meta 'seconds'); others are ignored.
ACTOR_TIMES = ("env", "inference", "act", "send", "params")
MAX_LEVEL_NAME = 200  # level names are configured ones; longer strings are not even compared
# Bounds on values an actor sends (docs/protocol.md, "What a receiver checks"). No
# supported environment comes near them, and far inside float32's range they keep
# sums and squares of a batch finite: per-step rewards (Atari's largest are in the
# thousands), behaviour logits and core states (an LSTM cell grows by at most 1 a step).
MAX_ABS_VALUE = 1e6
# Episode returns: Atari scores reach the millions (float32 still counts them to the unit
# below 1.6e7); beyond 1e9 a return is not a game's.
MAX_ABS_RETURN = 1e9


class BatchBuffers:
    """Reused memory for batches: sets of tensors of one batch's shapes, pinned when
    the learner copies to a GPU (so that copies can be non_blocking). A set goes out
    with a batch (`take`, the 'unrolls' thread) and comes back through `give_back`
    (the training thread) once its batch has been used. When none is free a new set
    is made, so a consumer that never gives sets back only loses the reuse; at most
    `keep` free sets are kept."""

    def __init__(self, spec: Mapping, batch_size: int, pin_memory: bool = False, keep: int = 4):
        self.shapes = {
            name: ((shape[0], batch_size, *shape[1:]) if time_major else (batch_size, *shape), dtype)
            for name, (dtype, shape, time_major) in spec.items()
        }
        self.pin_memory, self.keep = pin_memory, keep
        self._free: queue.Queue = queue.Queue(maxsize=keep)
        self.made = 0  # sets allocated so far

    def take(self) -> dict[str, torch.Tensor]:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            self.made += 1
            return {
                name: torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=self.pin_memory)
                for name, (shape, dtype) in self.shapes.items()
            }

    def give_back(self, tensors: dict[str, torch.Tensor]) -> None:
        """Returns a set taken earlier; its batch must not be used afterwards."""
        try:
            self._free.put_nowait(tensors)
        except queue.Full:
            pass


def _torch_dtype(dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


class Batch(dict):
    """An assembled batch: its arrays by name (numpy views of `tensors`), and the
    tensors that hold them (from BatchBuffers, pinned when asked)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__((name, t.numpy()) for name, t in tensors.items())
        self.tensors = tensors


class BatchAssembler:
    """Gathers unrolls of any number of envs into batches of exactly `batch_size`
    envs, time-major [T+1, B, ...] (states [B, ...]). Leftover envs wait for the
    next batch, so nothing received is dropped. Each batch is written once, straight
    into a set of `buffers` (by default a pool of its own, unpinned)."""

    def __init__(self, spec: Mapping, batch_size: int, buffers: BatchBuffers | None = None):
        self.spec = spec
        self.batch_size = batch_size
        self.buffers = buffers or BatchBuffers(spec, batch_size)
        self._pending: list[unroll.Unroll] = []
        self._pending_envs = 0

    def add(self, arrays: unroll.Unroll) -> list[Batch]:
        """Adds a validated unroll; returns the batches that are now complete."""
        self._pending.append(arrays)
        self._pending_envs += arrays["reward"].shape[1]
        batches = []
        while self._pending_envs >= self.batch_size:
            batches.append(self._take(self.batch_size))
        return batches

    def _take(self, count: int) -> Batch:
        parts, taken = [], 0
        while taken < count:
            arrays = self._pending[0]
            n = arrays["reward"].shape[1]
            use = min(n, count - taken)
            if use == n:
                parts.append(self._pending.pop(0))
            else:
                parts.append(self._slice(arrays, 0, use))
                self._pending[0] = self._slice(arrays, use, n)
            taken += use
        self._pending_envs -= count
        batch = Batch(self.buffers.take())
        for name, (_, _, time_major) in self.spec.items():
            np.concatenate([p[name] for p in parts], axis=1 if time_major else 0, out=batch[name])
        return batch

    def _slice(self, arrays: unroll.Unroll, start: int, stop: int) -> unroll.Unroll:
        return {
            name: (arrays[name][:, start:stop] if time_major else arrays[name][start:stop])
            for name, (_, _, time_major) in self.spec.items()
        }


class Episode(NamedTuple):
    level: str
    episode_return: float
    frames: int  # environment frames (agent steps x --num_action_repeats), as the original logs them


@dataclass
class ActorStats:
    peer: bytes  # the connection its unrolls come over; a new one means a new process
    unrolls: int = 0
    envs: int = 0
    last_seen: float = 0.0
    unrolls_reported: int = 0  # unrolls at the previous report, for rates
    silent: bool = False


@dataclass
class Report:
    """What arrived since the previous report (ActorBook.take_report)."""

    elapsed: float  # seconds since the previous report
    unroll_rates: dict[int, float]  # live actor -> unrolls/s
    lags: list[int]  # policy lag of each unroll, in parameter versions
    episodes: list[Episode]
    action_counts: np.ndarray  # [num_actions] actions taken in the unrolls
    bad_messages: int  # since the start


@dataclass
class ActorBook:
    """What the learner knows of its actors; thread-safe (see the module docstring)."""

    num_actions: int
    num_action_repeats: int
    clock: Callable[[], float] = time.monotonic
    _actors: dict[int, ActorStats] = field(default_factory=dict)
    _lags: list[int] = field(default_factory=list)
    _episodes: list[Episode] = field(default_factory=list)
    _bad_messages: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._actions = np.zeros(self.num_actions, np.int64)
        self._last_report = self._started = self.clock()

    def record(self, task: int, peer: bytes, level: str, arrays: unroll.Unroll, lag: int | None) -> None:
        """Books a validated unroll of actor `task` that came over connection `peer`;
        `lag` is None when its parameter version is from an earlier learner."""
        done = arrays["done"][1:]  # step 0 repeats the previous unroll's last step
        episodes = [
            Episode(level, float(r), int(n) * self.num_action_repeats)
            for r, n in zip(arrays["episode_return"][1:][done], arrays["episode_step"][1:][done])
        ]
        actions = np.bincount(arrays["action"][1:].ravel(), minlength=self.num_actions)
        with self._lock:
            actor = self._actors.get(task)
            if actor is None:
                logging.info("Actor %d connected (level %s).", task, level)
                actor = self._actors[task] = ActorStats(peer)
            elif actor.silent or actor.peer != peer:
                logging.info(
                    "Actor %d is back (level %s%s).",
                    task,
                    level,
                    "" if actor.peer == peer else "; a new connection, so probably a restarted actor",
                )
                actor.silent, actor.peer = False, peer
            actor.unrolls += 1
            actor.envs += arrays["reward"].shape[1]
            actor.last_seen = self.clock()
            if lag is not None:
                self._lags.append(lag)
            self._episodes.extend(episodes)
            self._actions += actions

    def bad_message(self) -> int:
        """Counts a dropped message; returns the count so far."""
        with self._lock:
            self._bad_messages += 1
            return self._bad_messages

    def seconds_since(self, task: int) -> float:
        """Seconds since actor `task`'s previous unroll (since the book began for a new one)."""
        with self._lock:
            actor = self._actors.get(task)
            return self.clock() - (actor.last_seen if actor is not None else self._started)

    def known(self, task: int) -> bool:
        with self._lock:
            return task in self._actors

    def take_report(self) -> Report:
        """What arrived since the previous report; actors silent for ACTOR_SILENT_S are
        marked gone (and said so) and left out of the rates."""
        with self._lock:
            now = self.clock()
            elapsed = max(now - self._last_report, 1e-9)
            rates = {}
            for task, actor in sorted(self._actors.items()):
                if actor.silent:
                    continue
                if now - actor.last_seen > ACTOR_SILENT_S:
                    actor.silent = True
                    logging.warning("Actor %d silent for %.0fs; counted as gone.", task, now - actor.last_seen)
                    continue
                rates[task] = (actor.unrolls - actor.unrolls_reported) / elapsed
                actor.unrolls_reported = actor.unrolls
            report = Report(elapsed, rates, self._lags, self._episodes, self._actions, self._bad_messages)
            self._lags, self._episodes = [], []
            self._actions = np.zeros(self.num_actions, np.int64)
            self._last_report = now
        return report


@dataclass(frozen=True)
class Limits:
    """What the learner accepts from actors, from its configuration."""

    num_actions: int
    levels: tuple[str, ...]  # the configured levels; an unroll names one of them
    max_envs: int  # environments in one unroll
    max_actors: int  # task numbers are 0 .. max_actors - 1
    vocabulary: int = 0  # instruction word ids are in [0, vocabulary) (0: no instructions)


def _short(value: object) -> str:
    text = repr(value)  # a peer chose it: one line, escaped, short
    return text if len(text) <= 60 else text[:57] + "..."


def _within(name: str, array: np.ndarray, bound: float) -> None:
    """Finite and in [-bound, bound]; min/max carry a NaN through, so it fails too."""
    if array.size and not (-bound <= float(array.min()) and float(array.max()) <= bound):
        raise unroll.UnrollError(f"unroll '{name}' has values outside [-{bound:g}, {bound:g}] or not finite")


def check_values(arrays: unroll.Unroll, limits: Limits) -> None:
    """Refuses an unroll (UnrollError) whose values the update or the metrics could
    not take: actions out of range (they would fail the update), non-finite or huge
    rewards, logits, core states or episode returns (they would poison the
    parameters or the reported returns), negative episode steps, `done` bytes other
    than 0 and 1, word ids outside the vocabulary. Layout is checked before
    (unroll.validate)."""
    actions = arrays["action"]
    if actions.size and not (0 <= int(actions.min()) and int(actions.max()) < limits.num_actions):
        raise unroll.UnrollError(f"unroll actions outside [0, {limits.num_actions})")
    for name, array in arrays.items():
        if name in ("reward", "policy_logits") or name.startswith("core_state_"):
            _within(name, array, MAX_ABS_VALUE)
        elif name == "observation" and array.dtype.kind == "f":
            _within(name, array, float(np.finfo(array.dtype).max))
    _within("episode_return", arrays["episode_return"], MAX_ABS_RETURN)
    steps = arrays["episode_step"]
    if steps.size and int(steps.min()) < 0:
        raise unroll.UnrollError("unroll 'episode_step' has negative values")
    if arrays["done"].size and int(arrays["done"].view(np.uint8).max()) > 1:  # numpy views any byte as bool
        raise unroll.UnrollError("unroll 'done' has bytes other than 0 and 1")
    words = arrays.get("instruction")
    if words is not None and words.size and not (0 <= int(words.min()) and int(words.max()) < limits.vocabulary):
        raise unroll.UnrollError(f"unroll instruction word ids outside [0, {limits.vocabulary})")


def level_of(meta: Mapping, levels: tuple[str, ...]) -> str:
    """The level an unroll says it played; one of `levels` (the first when it says
    none), else UnrollError: its name goes into logs and metric keys."""
    level = meta.get("level", levels[0])
    if not (isinstance(level, str) and len(level) <= MAX_LEVEL_NAME and level.isprintable() and level in levels):
        raise unroll.UnrollError(f"unroll level {_short(level)} is not a configured level")
    return level


class UnrollReceiver:
    """Handles the unroll socket's messages (in the 'unrolls' thread) and hands
    batches to the training thread through a bounded queue."""

    def __init__(
        self,
        spec: Mapping,
        batch_size: int,
        num_actions: int,
        book: ActorBook,
        watch: Stopwatch,
        default_level: str,
        run_id: str,
        param_version: Callable[[], int],
        max_queued_batches: int,
        pin_memory: bool = False,
        limits: Limits | None = None,
    ):
        self.spec, self.num_actions, self.book, self.watch = spec, num_actions, book, watch
        self.default_level, self.run_id, self.param_version = default_level, run_id, param_version
        self.limits = limits or Limits(num_actions, (default_level,), max_envs=batch_size, max_actors=1024)
        # Free sets: one per queue slot, one being assembled, the training thread's
        # current batch and the one it copies ahead to the device.
        self.buffers = BatchBuffers(spec, batch_size, pin_memory=pin_memory, keep=max_queued_batches + 3)
        self.assembler = BatchAssembler(spec, batch_size, self.buffers)
        self.batches: queue.Queue = queue.Queue(maxsize=max_queued_batches)
        self.stop = threading.Event()

    def handle(self, identity: bytes, message: wire.Message) -> None:
        """Handles one decoded message of the unroll socket; UnrollError (or any
        other exception) for a bad one, which the server thread counts and drops."""
        with self.watch("learner_receive"):
            self.receive(identity, message)

    def receive(self, identity: bytes, message: wire.Message) -> None:
        """Validates and books a decoded unroll, and queues the batches it completes.
        Every check comes before anything is booked, so a bad unroll leaves no trace
        but the bad-message count."""
        limits = self.limits
        if message.task >= limits.max_actors:
            raise unroll.UnrollError(f"task {message.task} is not below --max_actors={limits.max_actors}")
        num_envs = unroll.validate(message.arrays, self.spec)
        if num_envs > limits.max_envs:
            raise unroll.UnrollError(
                f"unroll of {num_envs} environments; at most {limits.max_envs} are accepted (--max_envs_per_unroll)"
            )
        level = level_of(message.meta, limits.levels)
        check_values(message.arrays, limits)
        lag = None  # versions of an earlier learner (another run id) do not compare with ours
        if message.meta.get("run") == self.run_id:
            lag = self.param_version() - message.param_version
            if lag < 0:
                raise unroll.UnrollError(
                    f"unroll acted with parameter version {message.param_version}, newer "
                    f"than the learner's {lag + message.param_version}"
                )
        seconds = self._actor_seconds(message.task, message.meta.get("seconds"))
        self.book.record(message.task, identity, level, message.arrays, lag)
        for part, value in seconds.items():
            self.watch.add(f"actor_{part}", value)
        with self.watch("learner_assemble"):
            batches = self.assembler.add(dict(message.arrays))
        for batch in batches:
            self._put(batch)

    def _actor_seconds(self, task: int, seconds: object) -> dict[str, float]:
        """The known parts of an actor's time report that are plausible: numbers
        from 0 to the wall time since its previous unroll (plus ACTOR_SILENT_S for
        unrolls that waited in queues). Others are ignored: they only feed metrics."""
        if not isinstance(seconds, dict):
            return {}
        bound = self.book.seconds_since(task) + ACTOR_SILENT_S
        out = {}
        for part in ACTOR_TIMES:
            value = seconds.get(part)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= bound:
                out[part] = float(value)
        return out

    def _put(self, batch: Batch) -> None:
        with self.watch("learner_queue_full"):
            while not self.stop.is_set():
                try:
                    self.batches.put(batch.tensors, timeout=0.1)
                    return
                except queue.Full:
                    continue

    def next_batch(self, timeout: float) -> dict[str, torch.Tensor] | None:
        """The next batch on the CPU (training thread), or None after `timeout` seconds.
        Give it back (`release`) once it has been used, so that its memory is reused."""
        try:
            return self.batches.get(timeout=timeout)
        except queue.Empty:
            return None

    def release(self, batch: dict[str, torch.Tensor]) -> None:
        """Takes back a batch of `next_batch` whose contents are no longer needed."""
        self.buffers.give_back(batch)
