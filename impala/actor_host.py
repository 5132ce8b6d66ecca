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
the workers step the others. A worker reports its steps in groups (its share
of a full batch; by default all its envs), which the host handles as one: one
vectorised copy per field, one `Batcher.submit_many`. When every remaining env
of a worker waits for its action and some of its rows are still queued, that
worker idles until they fire, so the host flushes the batcher instead of
waiting for a full batch or the timeout. Workers run at idle priority, so that
the host's threads preempt them rather than share a core with them. `act()` fills
steps 1..T of one unroll for all n environments and returns when every column
is complete; the unroll layout, the overlap, the core state and the behaviour
logits are exactly those of the lock-step actor (impala/actor.py `LockStep`):
the two are the implementations of run_actor's stepping interface (`Stepper`).

An observation is copied three times on its way: by the worker into shared
memory, from there into the unroll (which the wire sends), and from the
unroll into the batch that the network reads (one gather per batch: the
batcher queues only env numbers and steps). Nothing is pickled or sent through a
pipe but slot numbers.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from impala import envs, unroll
from impala.config import Config
from impala.dynamic_batching import Batcher
from impala.env_worker import EnvWorker, EnvWorkerError
from impala.memory import reuse_freed_memory
from impala.metrics import Stopwatch
from impala.nets import Agent, CoreState, sample_actions
from impala.policy import call_agent, inputs_at
from impala.step import EnvSpec, environment_fields


class ActorHost:
    """n = len(seeds) environments in `num_workers` processes, with dynamically
    batched inference (see the module docstring and docs/dynamic_batching.md).

    Environment i is made by `make_env(seed=seeds[i])`; workers hold contiguous
    groups of them (as np.array_split cuts). `maximum_batch_size` 0 means all the
    environments (a batch then holds whatever has arrived when the network is free,
    up to every env). Workers run at idle priority unless `low_priority_workers` is
    False, so that inference preempts env steps instead of queueing behind them.
    Run it with one torch thread (run_actor does): the workers need the other cores."""

    def __init__(
        self,
        make_env: Callable[..., envs.Environment],
        seeds: Sequence[int],
        num_workers: int,
        minimum_batch_size: int = 1,
        maximum_batch_size: int = 0,
        timeout_ms: float = 10.0,
        low_priority_workers: bool = True,
        fill_batches: bool = True,
    ):
        if not 1 <= num_workers <= len(seeds):
            raise ValueError(f"need 1 <= num_workers ({num_workers}) <= environments ({len(seeds)})")
        self.num_envs = len(seeds)
        context = multiprocessing.get_context("spawn")
        self.spec: EnvSpec | None = None  # the environments' spaces, as the first worker reports them
        self._workers: list[EnvWorker] = []
        worker_of: list[int] = []  # env i -> the index of its worker
        self._first_env: dict[EnvWorker, int] = {}
        self._batcher: Batcher | None = None
        self._closed = False
        maximum = maximum_batch_size or self.num_envs
        # A worker reports its steps in groups of its share of a full batch: what
        # one batch needs arrives together (by default all its envs: the worker then
        # waits for their actions while its core infers them, as a lock-step actor would).
        report_every = max(1, math.ceil(maximum / num_workers))
        try:
            for w, group in enumerate(np.array_split(np.asarray(seeds), num_workers)):
                worker = EnvWorker(
                    make_env,
                    group.tolist(),
                    name=f"env-worker-{w}",
                    report_every=report_every,
                    context=context,
                    low_priority=low_priority_workers,
                )
                self._first_env[worker] = len(worker_of)
                worker_of += [w] * len(group)
                self._workers.append(worker)
            for worker in self._workers:  # they start in parallel; wait for all
                spec = worker.wait_ready().spec
                if worker is self._workers[0]:
                    self.spec = spec
                elif spec != self.spec:
                    raise EnvWorkerError(f"{worker.name}'s environments differ from the first worker's")
            self._env_fields = environment_fields(self.spec)
            # fill_batches: wait for full batches (impala's rule, docs/dynamic_batching.md).
            self._batcher = Batcher(self._policy, minimum_batch_size, maximum, timeout_ms, fill=fill_batches)
        except BaseException:
            self.close()
            raise
        # The first requests of an unroll: each worker's envs in groups as it reports
        # them, the workers interleaved, so that a batch holds a group of each.
        groups = [np.arange(self._first_env[w], self._first_env[w] + w.num_envs) for w in self._workers]
        groups = [np.array_split(g, math.ceil(len(g) / report_every)) for g in groups]
        self._first_groups = [g[k] for k in range(max(map(len, groups))) for g in groups if k < len(g)]
        self._agent: Agent | None = None
        self._error: BaseException | None = None
        self._wake_reader, self._wake_writer = os.pipe()  # wakes act() when the batcher thread fails
        self._poller = select.poll()
        for fd in [self._wake_reader, *(w.stepped_fd for w in self._workers)]:
            self._poller.register(fd, select.POLLIN)
        self._by_fd = {w.stepped_fd: (k, w) for k, w in enumerate(self._workers)}
        self._worker_of = np.array(worker_of)  # env -> the index of its worker
        # Per worker, counted by the batcher thread: rows taken into a batch, and rows
        # whose actions have gone to the worker.
        self._taken = [0] * len(self._workers)
        self._answered = [0] * len(self._workers)
        self.batches = self.rows = 0  # batched forward passes and the rows they had
        # 'inference': the batcher thread's forward passes; 'act': act() (the main thread)
        self.stopwatch = Stopwatch()
        reuse_freed_memory()

    @classmethod
    def from_config(cls, config: Config, level: str, seed: int) -> ActorHost:
        """The host run_actor uses: env i seeded seed + i, as in the lock-step actor."""
        make_env = functools.partial(
            envs.make, level, num_action_repeats=config.num_action_repeats, **envs.options(config)
        )
        return cls(
            make_env,
            [seed + i for i in range(config.num_envs_per_actor)],
            config.env_workers_per_actor,
            config.inference_minimum_batch_size,
            config.inference_maximum_batch_size,
            config.inference_timeout_ms,
            fill_batches=config.inference_fill_batches,
        )

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return self.spec.observation_shape

    @property
    def observation_dtype(self) -> np.dtype:
        return self.spec.observation_dtype

    @property
    def num_actions(self) -> int:
        return self.spec.num_actions

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def initial(self, buffer: unroll.Unroll) -> None:
        """Writes every environment's first output into step 0 of `buffer` [T+1, n, ...]."""
        for worker in self._workers:
            slots = np.arange(worker.num_envs)
            self._copy_outputs(buffer, worker, slots, self._first_env[worker] + slots, 0)

    def act(self, agent: Agent, buffer: unroll.Unroll, state: CoreState, unroll_length: int) -> CoreState:
        """Fills steps 1..T of `buffer` (step 0 is already there) acting with `agent`
        from core `state` ([n, H] tensors); returns the core state after step T.

        Blocks until every environment has stepped T times; raises EnvWorkerError
        if a worker fails, or what the network raised. Its time goes to the
        stopwatch as 'act'."""
        start = time.perf_counter()
        if self._closed:
            raise EnvWorkerError("the actor host is closed")
        if self._error is not None:  # an unroll failed half-way: the envs are out of step
            raise self._error
        self._agent, self._buffer = agent, buffer
        self._states = [s.numpy().copy() for s in state]  # rows are updated as envs act
        next_step = np.ones(self.num_envs, np.intp)  # per env: the step its next output fills
        # Per worker: its envs not done with this unroll, and the rows submitted for them.
        unfinished = [w.num_envs for w in self._workers]
        submitted = list(unfinished)
        self._taken = [0] * len(self._workers)
        self._answered = [0] * len(self._workers)
        for group in self._first_groups:
            self._submit(group, next_step[group])
        while any(unfinished):
            if any(self._idles_on_queued_rows(w, submitted[w], unfinished[w]) for w in range(len(unfinished))):
                self._batcher.flush()
            for fd, _ in self._poller.poll():
                if fd == self._wake_reader:
                    raise self._error
                w, worker = self._by_fd[fd]
                slots = worker.read_stepped()  # a group of its envs, handled as one
                env = self._first_env[worker] + slots
                step = next_step[env]
                self._copy_outputs(buffer, worker, slots, env, step)
                going = step < unroll_length
                unfinished[w] -= len(env) - int(np.count_nonzero(going))
                if going.any():
                    env, step = env[going], step[going] + 1
                    next_step[env] = step
                    self._submit(env, step)
                    submitted[w] += len(env)
        self.stopwatch.add("act", time.perf_counter() - start)
        return tuple(torch.from_numpy(s) for s in self._states)

    def _idles_on_queued_rows(self, w: int, submitted: int, unfinished: int) -> bool:
        """Whether worker w has nothing to step (every env of it not done with the
        unroll waits for its action) while some of its rows wait in the queue.
        Waiting for a fuller batch or the timeout would then only waste its core."""
        at_the_host = submitted - self._answered[w]
        return unfinished > 0 and at_the_host >= unfinished and submitted > self._taken[w]

    def _copy_outputs(
        self, buffer: unroll.Unroll, worker: EnvWorker, slots: np.ndarray, env: np.ndarray, step: np.ndarray | int
    ) -> None:
        """Copies the outputs in `worker`'s slots into the unroll: slot slots[k] to
        [step[k], env[k]]."""
        for name in self._env_fields:
            buffer[name][step, env] = worker.shared.arrays[name][slots]

    def _submit(self, env: np.ndarray, step: np.ndarray) -> None:
        """Asks for env[k]'s action step[k], from its env output step[k] - 1 (what
        what LockStep feeds the agent); `_policy` reads the rows from the unroll."""
        for start in range(0, len(env), self._batcher.maximum_batch_size):
            end = start + self._batcher.maximum_batch_size
            self._batcher.submit_many(env[start:end], step[start:end])

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._closed:
            self._error = error
            os.write(self._wake_writer, b"!")

    @torch.no_grad()
    def _policy(self, env: np.ndarray, step: np.ndarray) -> np.ndarray:
        """The batched function, for B environments `env` [B] and the steps `step`
        [B] they act for. Gathers their inputs from the unroll and the core states
        (one copy each), records each action, its logits and the new core state,
        and hands the actions to the workers, one write per worker; returns the
        actions [B]."""
        try:
            worker_of = self._worker_of[env]
            counts = np.bincount(worker_of, minlength=len(self._workers)).tolist()
            for w, count in enumerate(counts):
                self._taken[w] += count
            start = time.perf_counter()
            output, new_state = call_agent(
                self._agent,
                inputs_at(self._buffer, (step - 1, env)),
                tuple(torch.from_numpy(s[env]) for s in self._states),
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
            for w, worker in enumerate(self._workers):
                if counts[w]:
                    mine = worker_of == w
                    slots = env[mine] - self._first_env[worker]
                    worker.shared.action[slots] = actions[mine]
                    try:
                        worker.request(slots)
                    except OSError:  # the worker is gone; act() reports why from its pipe
                        pass
                    self._answered[w] += counts[w]
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

    def __enter__(self) -> ActorHost:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
