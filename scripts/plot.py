#!/usr/bin/env python
"""Learning curves (mean episode return against environment frames) from one or
more `metrics.jsonl` files written by the learner.

  python scripts/plot.py logs/run1 logs/run2/metrics.jsonl --output curve.png \
      --labels baseline,deep --smoothing 0.9 --title CartPole-v1

Each path is a metrics.jsonl file or a logdir holding one. Rows without a return
(null `mean_episode_return`: no episode finished in that interval) are skipped;
a torn last line (the learner died mid-write) is ignored. Raw points are drawn
faintly, with an exponential moving average of them on top.

On success it prints where the PNG went. A missing file, or a run without any
return values, is a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402  (after selecting the backend)
from matplotlib.ticker import FuncFormatter  # noqa: E402

from impala.metrics import read_jsonl  # noqa: E402

X_AXES = ("frames", "wall_time")


class PlotError(Exception):
    """A problem with the inputs, reported as one line (exit status 2)."""


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average: s_0 = v_0, s_i = weight * s_{i-1} + (1 - weight) * v_i.

    weight 0 returns the values unchanged; values near 1 smooth more."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out: list[float] = []
    for value in values:
        out.append(float(value) if not out else weight * out[-1] + (1.0 - weight) * float(value))
    return out


def _metrics_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"no metrics file at {path}")
    return path


def _default_label(path: Path) -> str:
    if path.name == "metrics.jsonl":
        return path.parent.name or str(path)
    return path.stem


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def load_curve(path: str | os.PathLike, x: str = "frames") -> tuple[list[float], list[float]]:
    """(xs, returns) of the rows that hold both, sorted by x. With x='wall_time'
    the xs are seconds since the run's first row."""
    if x not in X_AXES:
        raise PlotError(f"unknown x axis {x!r}; choose one of {', '.join(X_AXES)}")
    file = _metrics_file(path)
    try:
        rows = [r for r in read_jsonl(file) if isinstance(r, dict)]
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"cannot read {file}: {e}") from None
    start = None
    if x == "wall_time":
        times = [t for t in (_number(r.get("wall_time")) for r in rows) if t is not None]
        if not times:
            raise PlotError(f"{file} has no wall_time values")
        start = times[0]
    points = []
    for row in rows:
        xv, yv = _number(row.get(x)), _number(row.get("mean_episode_return"))
        if xv is not None and yv is not None:
            points.append((xv - start if start is not None else xv, yv))
    if not points:
        raise PlotError(f"{file} has no mean_episode_return values")
    points.sort(key=lambda p: p[0])  # stable: rows with equal x keep file order
    return [p[0] for p in points], [p[1] for p in points]


def _format_frames(value: float, _pos=None) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def plot(
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    labels: Sequence[str] | None = None,
    smoothing: float = 0.9,
    title: str | None = None,
    x: str = "frames",
) -> None:
    """Draws one curve per metrics file and saves a PNG at `output`.

    Raises PlotError for a missing file, a run without returns, or labels that
    do not match the paths."""
    if not paths:
        raise PlotError("no metrics files given")
    if labels is not None and len(labels) != len(paths):
        raise PlotError(f"{len(labels)} label(s) for {len(paths)} run(s)")
    if not 0.0 <= smoothing < 1.0:
        raise PlotError(f"smoothing must be in [0, 1), got {smoothing}")
    curves = [load_curve(p, x) for p in paths]  # every input checked before drawing
    if labels is None:
        labels = [_default_label(_metrics_file(p)) for p in paths]

    hours = x == "wall_time" and max(xs[-1] for xs, _ in curves) >= 2 * 3600
    scale = 3600.0 if hours else 60.0
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        for i, ((xs, ys), label) in enumerate(zip(curves, labels)):
            color = f"C{i % 10}"
            if x == "wall_time":
                xs = [v / scale for v in xs]
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8, marker=".", markersize=3)
            ax.plot(xs, smooth(ys, smoothing), color=color, linewidth=2.0, label=label)
        if x == "frames":
            ax.xaxis.set_major_formatter(FuncFormatter(_format_frames))
            ax.set_xlabel("environment frames")
        else:
            ax.set_xlabel("wall-clock time (hours)" if hours else "wall-clock time (minutes)")
        ax.set_ylabel("mean episode return")
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, format="png")
    finally:
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="metrics.jsonl files or logdirs holding one")
    parser.add_argument("--output", "-o", required=True, help="PNG file to write (its folder is made if missing)")
    parser.add_argument("--labels", help="comma-separated legend labels, one per path")
    parser.add_argument(
        "--smoothing", type=float, default=0.9, help="exponential moving average weight in [0, 1) (default 0.9)"
    )
    parser.add_argument("--title", help="title above the plot (default: none)")
    parser.add_argument("--x", choices=X_AXES, default="frames", help="x axis (default frames)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels is not None else None
    try:
        plot(args.paths, args.output, labels=labels, smoothing=args.smoothing, title=args.title, x=args.x)
    except PlotError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the output cannot be written
        print(f"plot.py: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(f"plot.py: wrote {Path(args.output).resolve()} ({len(args.paths)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
