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
from pathlib import Path
from typing import Any, Iterator, Mapping


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
