"""The data-parallel learner's ranks: N learner processes (one per GPU) that train one
network with torch.distributed (docs/distributed.md).

torchrun starts them and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
without those (a plain `--job_name=learner`) there is one rank and nothing here talks to
anyone. All ranks run on one host (one node with N GPUs): each binds its own unroll port
(impala/address.py) and takes the unrolls of its share of the actors.

What the ranks agree on, and how:
  - at the start, rank 0's state (network, optimizer, frames, parameter version, run id)
    is broadcast (`broadcast_state`), so every rank starts from the same parameters,
    restored or new;
  - every iteration of the training loop, one small all-reduce of three flags (`agree`):
    whether every rank has a batch (they train only together), whether any rank was asked
    to stop (SIGTERM to any rank stops all after the same update), and whether rank 0
    logs now (the others then send it their actor reports, `gather_reports`). Ranks wait
    for a batch at most a second at a time, so this collective runs about once a second
    even without unrolls, and a rank that is gone is noticed within --rank_timeout_s
    (a dead process at once: its connections close);
  - in each update, one all-reduce of the gradients and the loss terms with SUM
    (`all_reduce`, called by learner.learn_step between backward and clipping): the
    losses are sums over time and batch, so the sum of the ranks' gradients is the
    gradient of the whole batch (DDP would average them: N times too small). Clipping and
    the optimizer step then run on the same summed gradients on every rank, so the
    parameters stay identical without being sent, and the non-finite check (on the summed
    loss and the global gradient norm) decides the same on every rank.
A collective that fails (a peer died, or did not answer within --rank_timeout_s) raises
RankLostError.

Backends: NCCL for CUDA tensors (the gradients), gloo for CPU tensors and for the flags
and the broadcast state (a gloo group beside NCCL's).

Owned by the learner's training thread; the server threads never use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from impala.config import Config, ConfigError
from impala.receiver import ActorBook, Report

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankLostError(RuntimeError):
    """Another learner rank died or stopped answering; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Agreement:
    train: bool  # every rank has a batch
    stop: bool  # some rank was asked to stop
    log: bool  # rank 0 writes a progress row now


class Ranks:
    """This process's place among the learner ranks; one rank (no process group) when
    torchrun did not start it."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, timeout_s: float = 60.0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.timeout_s = timeout_s
        self._cpu_group: Any = None
        self._last_sent: list[torch.Tensor] = []  # the tensors of this rank's latest collective

    @classmethod
    def from_environment(cls, config: Config) -> Ranks:
        """The ranks torchrun describes in the environment; a one-line ConfigError when
        they disagree with --learner_ranks."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size != config.learner_ranks:
            raise ConfigError(
                f"--learner_ranks={config.learner_ranks} but this learner was started as one of {world_size} "
                f"(WORLD_SIZE): start it with torchrun --nproc_per_node={config.learner_ranks}"
            )
        if world_size == 1:
            return cls()
        missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise ConfigError(
                f"--learner_ranks={world_size} needs {', '.join(missing)} in the environment "
                "(start the learner with torchrun)"
            )
        rank = int(os.environ["RANK"])
        return cls(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)), config.rank_timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU (LOCAL_RANK) when `device` is CUDA."""
        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device) -> None:
        """Joins the process group (NCCL for CUDA, gloo for the CPU); waits for all ranks."""
        if self.world_size == 1:
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size, timeout=timeout)
            self._cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        except (RuntimeError, ValueError) as e:
            raise RankLostError(f"learner rank {self.rank}: the other ranks did not join: {_first_line(e)}")

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            self._wait_for_gloo_release()
            with contextlib.suppress(RuntimeError):
                dist.destroy_process_group()

    def _wait_for_gloo_release(self, limit_s: float = 5.0) -> None:
        """Waits (at most `limit_s`) until gloo's worker threads have let go of the
        latest collective's tensors. A worker drops a finished work after the caller
        has its result, and dropping a tensor needs the GIL: a process that went on to
        exit first had the worker take the GIL during interpreter shutdown, which ends
        the thread inside a C++ destructor and aborts the process (SIGABRT, "terminate
        called without an active exception"; about one in seven two-rank runs on an
        idle machine). Sleeping releases the GIL for the worker."""
        deadline = time.monotonic() + limit_s
        while any(t._use_count() > 1 for t in self._last_sent) and time.monotonic() < deadline:
            time.sleep(0.001)
        self._last_sent = []

    # -- collectives (each raises RankLostError when a peer is gone) ------------------

    def agree(self, have_batch: bool, stop: bool, log: bool) -> Agreement:
        """One all-reduce (MAX) of this rank's flags; every rank gets the same answer."""
        flags = torch.tensor([not have_batch, stop, log], dtype=torch.int32)
        self._last_sent = [flags]
        with self._collective("agree"):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return Agreement(train=not flags[0].item(), stop=bool(flags[1].item()), log=bool(flags[2].item()))

    def all_reduce(self, sums: list[torch.Tensor], means: list[torch.Tensor]) -> None:
        """In place: `sums` become their sums over the ranks, `means` their means. One
        all-reduce per dtype and device (the tensors are flattened into one buffer)."""
        count = len(sums)
        tensors = [*sums, *means]
        buckets: dict[tuple, list[int]] = {}
        self._last_sent = []
        for i, t in enumerate(tensors):
            buckets.setdefault((t.dtype, t.device), []).append(i)
        for indices in buckets.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            self._last_sent.append(flat)
            group = self._cpu_group if flat.device.type == "cpu" else None
            with self._collective("all_reduce"):
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for i in indices:
                t = tensors[i]
                part = flat[offset : offset + t.numel()].view_as(t)
                t.copy_(part if i < count else part / self.world_size)
                offset += t.numel()

    def broadcast_state(self, state: dict | None, device: torch.device) -> dict:
        """Rank 0's `state` (tensors, numbers, strings) on every rank, on `device`."""
        payload = [None]
        if self.is_main:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            payload = [buffer.getvalue()]
        with self._collective("broadcast"):
            dist.broadcast_object_list(payload, src=0, group=self._cpu_group)
        return torch.load(io.BytesIO(payload[0]), map_location=device, weights_only=True)

    def gather_reports(self, report: Report) -> list[Report]:
        """Every rank's actor report, on rank 0 (others get [])."""
        reports: list | None = [None] * self.world_size if self.is_main else None
        with self._collective("gather"):
            dist.gather_object(report, reports, dst=0, group=self._cpu_group)
        return reports or []

    @contextlib.contextmanager
    def _collective(self, name: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
            raise RankLostError(
                f"learner rank {self.rank}: another rank is lost ({name} failed: {_first_line(e)})"
            ) from None


def merge_reports(reports: list[Report]) -> Report:
    """The ranks' actor reports as one (each actor reports to one rank)."""
    first = reports[0]
    return Report(
        elapsed=first.elapsed,
        unroll_rates=dict(sorted(kv for r in reports for kv in r.unroll_rates.items())),
        lags=[lag for r in reports for lag in r.lags],
        episodes=[e for r in reports for e in r.episodes],
        action_counts=np.sum([r.action_counts for r in reports], axis=0),
        bad_messages=sum(r.bad_messages for r in reports),
    )


class GatheredBook:
    """Rank 0's view of all ranks' actor books for the progress log: `take_report`
    merges its own report with the others' gathered at the last agreement to log."""

    def __init__(self, book: ActorBook):
        self.book = book
        self.others: list[Report] = []

    def take_report(self) -> Report:
        report = merge_reports([self.book.take_report(), *self.others])
        self.others = []
        return report


@contextlib.contextmanager
def stop_on_signals(active: bool) -> Iterator[threading.Event]:
    """While active, SIGTERM and SIGINT set the yielded event instead of raising
    KeyboardInterrupt: a rank interrupted between its all-reduce and its optimizer step
    would leave the ranks' parameters different, so the ranks stop together, at an
    agreement (`Ranks.agree`)."""
    event = threading.Event()
    if not active:
        yield event
        return
    previous = {s: signal.signal(s, lambda signum, frame: event.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield event
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
