"""The actor host: an actor's environments in worker processes, their policy
calls batched dynamically into one forward pass.

  env workers (impala/env_worker.py)               the actor process
  ┌──────────────────────────┐                     ┌─────────────────────────────────────┐
  │ k envs each: steps env j │                     │ batcher thread: one forward pass    │
  │ with action[j] from its  │ ◀── slot numbers ── │ per batch; each row's action and    │
  │ shared slot, writes the  │                     │ logits go into the unroll and to    │
  │ output back to slot j    │                     │ its worker (action[j], slot no.)    │
  └──────────────────────────┘ ── slot numbers ──▶ │ main thread (act): copies env i's   │
                                                   │ output into unroll column i and     │
                                                   │ submits its next row to the batcher │
                                                   └─────────────────────────────────────┘

Every environment advances on its own: as soon as its output arrives its next
action is requested, so while the network works on some environments' rows
the workers step the others (with batches of half the environments, the
default, one half is inferred while the other is stepped). When all the
remaining envs of a worker are waiting in the batcher's queue, that worker
idles until they fire and none of its rows can join them, so the host flushes
the batcher instead of waiting for a full batch or the timeout. `act()` fills
steps 1..T of one unroll for all n environments and returns when every column
is complete; the unroll layout, the overlap, the core state and the behaviour
logits are exactly those of the lock-step actor (impala/actor.py `_act`), so
run_actor ships it unchanged.

An observation is copied three times on its way: by the worker into shared
memory, from there into the unroll (which the wire sends), and into the
stacked batch that the network reads. Nothing is pickled or sent through a
pipe but slot numbers.
"""

from __future__ import annotations

import ctypes
import functools
import math
import multiprocessing
import os
import select
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from impala import envs, unroll
from impala.config import Config
from impala.dynamic_batching import Batcher
from impala.env_worker import EnvWorker, EnvWorkerError
from impala.metrics import Stopwatch
from impala.nets import Agent, CoreState, sample_actions

_STEP_FIELDS = ("observation", "reward", "done", "episode_return", "episode_step")


def _reuse_freed_memory() -> None:
    """Keeps freed memory in this process instead of returning it to the kernel.

    Without this, glibc serves each large tensor of a forward pass (1.8 MB for
    the uint8 -> float32 conversion of 16 Atari observations) with fresh mmap'd
    pages and unmaps them afterwards; the page faults on those fresh pages cost
    more than the convolutions on the machine we measured (docs/dynamic_batching.md)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: mmap only above 32 MiB
        libc.mallopt(-1, 128 * 2**20)  # M_TRIM_THRESHOLD: keep up to 128 MiB of free heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class ActorHost:
    """n = len(seeds) environments in `num_workers` processes, with dynamically
    batched inference (see the module docstring and docs/dynamic_batching.md).

    Environment i is made by `make_env(seed=seeds[i])`; workers hold contiguous
    groups of them (as np.array_split cuts). `maximum_batch_size` 0 means half of
    the environments, so that one half is stepped while the other is inferred.
    Run it with one torch thread (run_actor does): the workers need the other cores."""

    def __init__(self, make_env: Callable[..., envs.Environment], seeds: Sequence[int], num_workers: int,
                 minimum_batch_size: int = 1, maximum_batch_size: int = 0, timeout_ms: float = 10.0):
        if not 1 <= num_workers <= len(seeds):
            raise ValueError(f"need 1 <= num_workers ({num_workers}) <= environments ({len(seeds)})")
        self.num_envs = len(seeds)
        context = multiprocessing.get_context("spawn")
        self._workers: list[EnvWorker] = []
        self._where: list[tuple[EnvWorker, int]] = []  # env i -> (its worker, its slot there)
        self._first_env: dict[EnvWorker, int] = {}
        self._batcher: Batcher | None = None
        self._closed = False
        maximum = maximum_batch_size or math.ceil(self.num_envs / 2)
        # A worker reports its steps in groups of its share of a full batch: what
        # one batch needs arrives together, and the next group is stepped meanwhile.
        report_every = max(1, math.ceil(maximum / num_workers))
        try:
            for w, group in enumerate(np.array_split(np.asarray(seeds), num_workers)):
                worker = EnvWorker(make_env, group.tolist(), name=f"env-worker-{w}", report_every=report_every,
                                   context=context)
                self._first_env[worker] = len(self._where)
                self._where += [(worker, j) for j in range(len(group))]
                self._workers.append(worker)
            for worker in self._workers:  # they start in parallel; wait for all
                shared = worker.wait_ready()
                spec = (shared.observation_shape, shared.observation_dtype, worker.num_actions)
                if worker is self._workers[0]:
                    self.observation_shape, self.observation_dtype, self.num_actions = spec
                elif spec != (self.observation_shape, self.observation_dtype, self.num_actions):
                    raise EnvWorkerError(f"{worker.name}'s environments differ from the first worker's")
            self._batcher = Batcher(self._policy, minimum_batch_size, maximum, timeout_ms)
        except BaseException:
            self.close()
            raise
        # Interleave the workers, so that a batch holds a few envs of each of them.
        longest = max(w.num_envs for w in self._workers)
        self._order = [self._first_env[w] + j for j in range(longest) for w in self._workers if j < w.num_envs]
        self._agent: Agent | None = None
        self._error: BaseException | None = None
        self._wake_reader, self._wake_writer = os.pipe()  # wakes act() when the batcher thread fails
        self._poller = select.poll()
        for fd in [self._wake_reader, *(w.stepped_fd for w in self._workers)]:
            self._poller.register(fd, select.POLLIN)
        self._by_fd = {w.stepped_fd: w for w in self._workers}
        self._worker_of = np.array([self._workers.index(w) for w, _ in self._where])  # env -> worker
        self._taken = [0] * len(self._workers)  # per worker: rows the batcher has taken (its thread counts)
        self.batches = self.rows = 0  # batched forward passes and the rows they had
        self.stopwatch = Stopwatch()  # 'inference': the batcher thread's forward passes
        _reuse_freed_memory()

    @classmethod
    def from_config(cls, config: Config, level: str, seed: int) -> "ActorHost":
        """The host run_actor uses: env i seeded seed + i, as in the lock-step actor."""
        make_env = functools.partial(envs.make, level, num_action_repeats=config.num_action_repeats,
                                     **envs.options(config))
        return cls(make_env, [seed + i for i in range(config.num_envs_per_actor)],
                   config.env_workers_per_actor, config.inference_minimum_batch_size,
                   config.inference_maximum_batch_size, config.inference_timeout_ms)

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def initial(self, buffer: unroll.Unroll) -> None:
        """Writes every environment's first output into step 0 of `buffer` [T+1, n, ...]."""
        for i in range(self.num_envs):
            self._copy_output(buffer, 0, i)

    def act(self, agent: Agent, buffer: unroll.Unroll, state: CoreState, unroll_length: int) -> CoreState:
        """Fills steps 1..T of `buffer` (step 0 is already there) acting with `agent`
        from core `state` ([n, H] tensors); returns the core state after step T.

        Blocks until every environment has stepped T times; raises EnvWorkerError
        if a worker fails, or what the network raised."""
        if self._closed:
            raise EnvWorkerError("the actor host is closed")
        if self._error is not None:  # an unroll failed half-way: the envs are out of step
            raise self._error
        self._agent, self._buffer = agent, buffer
        self._states = [s.numpy().copy() for s in state]  # rows are updated as envs act
        next_step = [1] * self.num_envs
        # Per worker: its envs not done with this unroll, and the rows submitted for them.
        unfinished = [w.num_envs for w in self._workers]
        submitted = list(unfinished)
        self._taken = [0] * len(self._workers)
        for i in self._order:
            self._submit(i, 1)
        while any(unfinished):
            if any(submitted[w] - self._taken[w] >= unfinished[w] > 0 for w in range(len(unfinished))):
                # All envs of a worker are waiting in the queue: it idles until they
                # fire, and none of its rows can join them before. Waiting for the
                # maximum, the minimum or the timeout would only waste its core.
                self._batcher.flush()
            for fd, _ in self._poller.poll():
                if fd == self._wake_reader:
                    raise self._error
                worker = self._by_fd[fd]
                w = self._workers.index(worker)
                for j in worker.read_stepped():
                    i = self._first_env[worker] + j
                    t = next_step[i]
                    self._copy_output(buffer, t, i)
                    if t == unroll_length:
                        unfinished[w] -= 1
                    else:
                        next_step[i] = t + 1
                        self._submit(i, t + 1)
                        submitted[w] += 1
        return tuple(torch.from_numpy(s) for s in self._states)

    def _copy_output(self, buffer: unroll.Unroll, t: int, i: int) -> None:
        worker, j = self._where[i]
        for name in _STEP_FIELDS:
            buffer[name][t, i] = worker.shared.arrays[name][j]

    def _submit(self, i: int, t: int) -> None:
        """Asks for env i's action t, from its env output t - 1 (what `_act` feeds the agent)."""
        b = self._buffer
        self._batcher.submit(b["observation"][t - 1, i], b["action"][t - 1, i], b["reward"][t - 1, i],
                             b["done"][t - 1, i], i, t, *(s[i] for s in self._states))

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._closed:
            self._error = error
            os.write(self._wake_writer, b"!")

    @torch.no_grad()
    def _policy(self, observation: np.ndarray, last_action: np.ndarray, reward: np.ndarray, done: np.ndarray,
                env: np.ndarray, step: np.ndarray, *state: np.ndarray) -> np.ndarray:
        """The batched function, on the rows of B environments ([B, ...] each; `env`
        and `step` say whose rows and which step they act for). Records each
        action, its logits and the new core state in the unroll, and hands the
        actions to the workers, one write per worker; returns the actions [B]."""
        try:
            for w, count in enumerate(np.bincount(self._worker_of[env], minlength=len(self._workers))):
                self._taken[w] += int(count)
            start = time.perf_counter()
            output, new_state = self._agent(
                torch.from_numpy(observation)[None], torch.from_numpy(last_action)[None],
                torch.from_numpy(reward)[None], torch.from_numpy(done)[None],
                tuple(torch.from_numpy(s) for s in state),
            )
            logits = output.policy_logits[0]
            actions = sample_actions(logits).numpy()
            self.stopwatch.add("inference", time.perf_counter() - start)
            self._buffer["action"][step, env] = actions
            self._buffer["policy_logits"][step, env] = logits.numpy()
            for states, rows in zip(self._states, new_state):
                states[env] = rows.numpy()
            # Everything act() reads for these envs is written before their workers
            # are told (act() learns of their steps through the workers' pipes).
            self.batches += 1
            self.rows += len(env)
            for worker in self._workers:
                slots = env - self._first_env[worker]
                mine = (slots >= 0) & (slots < worker.num_envs)
                if mine.any():
                    worker.shared.action[slots[mine]] = actions[mine]
                    try:
                        worker.request(slots[mine].tolist())
                    except OSError:  # the worker is gone; act() reports why from its pipe
                        pass
            return actions
        except BaseException as e:  # act() raises it (the requests get it too, unused)
            self._fail(e)
            raise

    def close(self) -> None:
        """Stops the batcher and the workers (they exit; stragglers are killed) and
        frees the shared memory. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._batcher is not None:
            self._batcher.close()
        for worker in self._workers:
            worker.close()
        if hasattr(self, "_wake_reader"):
            os.close(self._wake_reader)
            os.close(self._wake_writer)

    def __enter__(self) -> "ActorHost":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
