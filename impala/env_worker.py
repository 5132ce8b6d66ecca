"""Environment worker processes: environments stepped in another process, their
outputs exchanged through shared memory.

A worker owns k environments. Per environment j it shares one slot with the
process that started it (`SharedSteps`): the env output of its latest step
(the environment's fields of a step, impala/step.py: observation, reward, done,
episode_return, episode_step, and instruction on levels that have one) and the
action to take next. Pipes carry only which slots changed, as 2-byte slot numbers (so a
single read collects every notice waiting); observations never go through a
pipe and nothing on the hot path is pickled:

  owner                                          worker
  action[j] = a; write slot numbers j, ...  ──▶  step env j with action[j], ...
  read slots j, ...                         ◀──  write slots j, ...; write their numbers

A worker steps an environment only when asked, so a slot is never rewritten
while the owner still reads it. It steps the environments asked for in order
and reports them in groups of `report_every` (the owner sets it to the
worker's share of a full batch): the owner wakes once per group rather than
once per step, and infers one group while the worker steps the next
(measurements: docs/results.md, the actor side).

This module does not import torch: a worker costs an interpreter and its
environments, not another copy of torch. Workers are spawned (never forked),
ignore Ctrl-C (their owner handles it), can run at idle priority, die with their owner even when it is
SIGKILLed (PR_SET_PDEATHSIG, which fires when the owner's thread that started
them ends), and exit when their action pipe closes. A worker that fails sends
its traceback on a control pipe and exits. The shared segment's name is
removed as soon as both sides have mapped it, so no death of either side can
leave it behind in /dev/shm.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from impala import step
from impala.envs import Environment, StepOutput
from impala.process import die_with_parent

_SLOT = np.dtype("<u2")  # slot numbers on the pipes; writes of whole numbers are atomic
MAX_ENVS_PER_WORKER = 2**16
_READ_BYTES = 2 * MAX_ENVS_PER_WORKER  # an even size: reads never split a slot number
CLOSE_TIMEOUT_S = 5.0  # a worker not gone this long after being told to go is killed


class EnvWorkerError(RuntimeError):
    """An environment worker failed or exited; the message says which and why."""


class SharedSteps:
    """Shared-memory slots of k environments: the output of each one's latest step
    and the action to take next, one array [k, ...] per field: the environment's
    fields of a step (impala/step.py) and the agent's `action` (i64)."""

    def __init__(self, spec: step.EnvSpec, num_envs: int, name: str | None = None):
        layout = step.fields(spec)
        fields = [
            (name, layout[name].dtype, (num_envs, *layout[name].shape))
            for name in (*step.environment_fields(spec), "action")
        ]
        offsets, size = [], 0
        for _, dtype, shape in fields:
            size = -(-size // 64) * 64  # 64-byte aligned: no array shares a cache line
            offsets.append(size)
            size += dtype.itemsize * int(np.prod(shape))
        self.spec = spec
        self.num_envs = num_envs
        self._memory = shared_memory.SharedMemory(name=name, create=name is None, size=max(size, 1))
        self.name = self._memory.name
        self.arrays = {
            field: np.ndarray(shape, dtype, buffer=self._memory.buf, offset=offset)
            for (field, dtype, shape), offset in zip(fields, offsets)
        }
        self.action = self.arrays["action"]

    def write(self, j: int, output: StepOutput) -> None:
        step.write(self.arrays, j, output)

    def unlink(self) -> None:
        """Removes the segment's name; the memory lives on until both sides unmap it."""
        try:
            self._memory.unlink()
        except FileNotFoundError:
            pass

    def close(self, unlink: bool = False) -> None:
        self.arrays = self.action = None  # views must go before the mapping
        self._memory.close()
        if unlink:
            self.unlink()


def _slots(indices: Sequence[int]) -> bytes:
    return np.asarray(indices, _SLOT).tobytes()


def _yield_to_the_owner() -> None:
    """Runs this process at idle priority (SCHED_IDLE): whenever its owner's threads
    wake up (to copy steps, to infer a batch) they preempt it at once, instead of
    sharing the core with it. With as many workers as cores, inference otherwise
    waits behind env steps while workers wait for its actions (docs/results.md, the
    actor side). The price: on a machine busy with other work, idle-priority
    workers get only the cores left over."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the ordinary priority works, a little slower
        pass


def _worker_main(
    make_env: Callable[..., Environment],
    seeds: Sequence[int],
    report_every: int,
    low_priority: bool,
    actions: Connection,
    stepped: Connection,
    control: Connection,
    parent_pid: int,
) -> None:
    """The worker process: make the environments, announce their slots, then step
    environments as asked until the action pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner handles Ctrl-C and closes us
    if not die_with_parent(parent_pid):
        os._exit(0)
    if low_priority:
        _yield_to_the_owner()
    environments: list[Environment] = []
    slots, announced = None, False
    try:
        environments = [make_env(seed=seed) for seed in seeds]
        spec = step.EnvSpec.of(environments[0])
        slots = SharedSteps(spec, len(environments))
        for j, env in enumerate(environments):
            slots.write(j, env.initial())
        control.send(("ready", slots.name, spec))
        announced = True  # from here on the owner unlinks the slots (as soon as it has mapped them)
        actions_fd, stepped_fd = actions.fileno(), stepped.fileno()
        pending: collections.deque[int] = collections.deque()
        while True:
            if not pending:  # requests that came while we stepped are all read at once here
                requested = os.read(actions_fd, _READ_BYTES)
                if not requested:  # the owner closed the pipe
                    break
                pending.extend(np.frombuffer(requested, _SLOT).tolist())
            stepped_now = [pending.popleft() for _ in range(min(report_every, len(pending)))]
            for j in stepped_now:
                slots.write(j, environments[j].step(int(slots.action[j])))
            os.write(stepped_fd, _slots(stepped_now))
    except BrokenPipeError:  # the owner went away: nothing to report to
        pass
    except BaseException:
        try:
            control.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        for env in environments:
            env.close()
        if slots is not None:
            slots.close(unlink=not announced)


class EnvWorker:
    """The owner's side of one worker process with `len(seeds)` environments.

    Construction spawns the process and returns at once; `wait_ready()` waits for
    the environments and maps their slots. Then `request(slots)` has it step those
    environments (with the actions in `shared.action`), and `read_stepped()`
    returns the slots it has stepped since (their new outputs are in `shared`);
    `stepped_fd` becomes readable when there are some. The worker reports its
    steps in groups of `report_every` (fewer when it runs out of requests).
    With `low_priority` it runs at idle priority, so that its owner's threads
    preempt it (see `_yield_to_the_owner`)."""

    def __init__(
        self,
        make_env: Callable[..., Environment],
        seeds: Sequence[int],
        name: str,
        report_every: int = 1,
        context: Any = None,
        low_priority: bool = False,
    ):
        if not 1 <= len(seeds) <= MAX_ENVS_PER_WORKER:
            raise ValueError(f"a worker needs 1 to {MAX_ENVS_PER_WORKER} environments, got {len(seeds)}")
        context = context or multiprocessing.get_context("spawn")
        self.name = name
        self.num_envs = len(seeds)
        self.shared: SharedSteps | None = None
        actions_reader, self._actions = context.Pipe(duplex=False)
        self._stepped, stepped_writer = context.Pipe(duplex=False)
        self._control, control_writer = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_worker_main,
            name=name,
            daemon=True,
            args=(
                make_env,
                list(seeds),
                report_every,
                low_priority,
                actions_reader,
                stepped_writer,
                control_writer,
                os.getpid(),
            ),
        )
        self.process.start()
        for end in (actions_reader, stepped_writer, control_writer):
            end.close()  # the worker's ends: kept here, they would hide its exit from us
        self.stepped_fd = self._stepped.fileno()
        self._actions_fd = self._actions.fileno()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait_ready(self) -> SharedSteps:
        """Blocks until the worker's environments exist and have their initial
        outputs in the shared slots; returns the slots."""
        try:
            message = self._control.recv()
        except EOFError:
            raise self._failure() from None
        if message[0] == "error":
            raise EnvWorkerError(f"{self.name} failed to start:\n{message[1]}")
        _, shm_name, spec = message
        self.shared = SharedSteps(spec, self.num_envs, name=shm_name)
        # Both sides have it mapped: drop the name now, so that however either side
        # dies (even SIGKILL) nothing is left behind in /dev/shm.
        self.shared.unlink()
        return self.shared

    def request(self, slots: Sequence[int]) -> None:
        """Has the worker step these environments with the actions now in `shared.action`."""
        os.write(self._actions_fd, _slots(slots))

    def read_stepped(self) -> np.ndarray:
        """The slots stepped since the last call, in order (blocks until there is one)."""
        data = os.read(self.stepped_fd, _READ_BYTES)
        if not data:
            raise self._failure()
        return np.frombuffer(data, _SLOT).astype(np.intp)

    def _failure(self) -> EnvWorkerError:
        """What to raise when the worker is gone: its traceback if it sent one."""
        try:
            if self._control.poll(1.0):
                kind, text = self._control.recv()[:2]
                if kind == "error":
                    return EnvWorkerError(f"{self.name} failed:\n{text}")
        except (EOFError, OSError):
            pass
        self.process.join(timeout=1.0)
        return EnvWorkerError(f"{self.name} exited unexpectedly (exit code {self.process.exitcode})")

    def close(self) -> None:
        """Closes the worker's action pipe (it exits), kills it if it lingers, and
        unmaps its slots."""
        self._actions.close()
        self.process.join(timeout=CLOSE_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._stepped.close()
        self._control.close()
        if self.shared is not None:
            self.shared.close()
            self.shared = None
