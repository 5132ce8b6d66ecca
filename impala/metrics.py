"""Training metrics: `<logdir>/metrics.jsonl` (one JSON object per log step) and
TensorBoard scalars, both keyed by environment frames."""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from impala.files import write_atomically


class MetricsWriter:
    def __init__(self, logdir: str | os.PathLike, tensorboard: bool = True):
        self.path = Path(logdir) / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when used

            self._tb = SummaryWriter(log_dir=str(Path(logdir) / "tensorboard"))

    def write(self, row: Mapping[str, Any]) -> None:
        """Appends `row` (must hold 'frames'); None and NaN become JSON null."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if key != "frames" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=int(row["frames"]))

    def scalar(self, tag: str, value: float, frames: int) -> None:
        """One TensorBoard scalar outside the rows (e.g. one per finished episode)."""
        if self._tb is not None and math.isfinite(value):
            self._tb.add_scalar(tag, value, global_step=frames)

    def histogram_of_counts(self, tag: str, counts: np.ndarray, frames: int) -> None:
        """A TensorBoard histogram of integer values 0..n-1 given their counts [n]."""
        total = int(counts.sum())
        if self._tb is None or total == 0:
            return
        values = np.arange(len(counts), dtype=np.float64)
        used = np.flatnonzero(counts)
        self._tb.add_histogram_raw(
            tag,
            min=float(used[0]),
            max=float(used[-1]),
            num=total,
            sum=float(values @ counts),
            sum_squares=float((values**2) @ counts),
            bucket_limits=(values + 0.5).tolist(),
            bucket_counts=counts.tolist(),
            global_step=frames,
        )

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file; a torn last line (crash mid-write) is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class EpisodeWindow:
    """The mean return of about the last `window` episodes, from metrics rows that
    each carry the mean return of the episodes that ended in their interval and how
    many ended (mean_episode_return and episodes, or a level's /<level> keys).

    Rows are kept whole, weighted by their episodes: the oldest row is dropped while
    the rest still hold `window` episodes, so the mean covers `window` episodes or a
    few more. scripts/run_summary.py's targets and scripts/plot.py --window use it."""

    def __init__(self, window: int = 100):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self._rows: collections.deque[tuple[float, int]] = collections.deque()  # (mean, episodes)

    def add(self, mean: float, episodes: int) -> None:
        """One row's episodes (none: nothing changes)."""
        if episodes <= 0:
            return
        self._rows.append((mean, episodes))
        while self.episodes - self._rows[0][1] >= self.window:
            self._rows.popleft()

    @property
    def episodes(self) -> int:
        return sum(n for _, n in self._rows)

    @property
    def full(self) -> bool:
        """Whether the mean covers at least `window` episodes."""
        return self.episodes >= self.window

    @property
    def mean(self) -> float | None:
        """None before the first episode."""
        return sum(m * n for m, n in self._rows) / self.episodes if self._rows else None


def drop_rows_after(path: str | os.PathLike, frames: int) -> None:
    """On resume, forgets metrics rows of training lost with the previous process
    (logged after its last checkpoint), so `frames` stays monotonic in the file."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["frames"] <= frames:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    if len(keep) != len(lines):
        write_atomically(path, lambda f: f.writelines(keep))
        logging.info("Dropped %d metrics rows logged after the checkpoint.", len(lines) - len(keep))


class Stopwatch:
    """Seconds spent in named parts of a program, summed until `take()`; the
    throughput benchmark reads them to say where the time goes. Thread-safe;
    about a microsecond per measured section."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = collections.defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - start)

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            self._seconds[part] += seconds

    def take(self) -> dict[str, float]:
        """The sums since the last take, and starts new ones."""
        with self._lock:
            seconds, self._seconds = dict(self._seconds), collections.defaultdict(float)
        return seconds
