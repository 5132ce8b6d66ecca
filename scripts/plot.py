#!/usr/bin/env python
"""Learning curves and training diagnostics (return, entropy, policy lag, V-trace,
losses, ...) against environment frames or wall time, from one or more
`metrics.jsonl` files written by the learner.

  python scripts/plot.py logs/run1 logs/run2/metrics.jsonl --output curve.png \\
      --labels baseline,deep --smoothing 0.9 --title CartPole-v1
  python scripts/plot.py /tmp/impala/pong --metrics return,entropy,lag,vtrace,fps \\
      --hline 18 --output /tmp/pong.png
  python scripts/plot.py a-s1 a-s2 a-s3 b-s1 b-s2 b-s3 --labels A,A,A,B,B,B \\
      --metrics return,loss --x wall_time --output /tmp/ab.png
  python scripts/plot.py /tmp/impala/multi --metrics 'mean_episode_return/*' --output /tmp/games.png

Each path is a metrics.jsonl file or a logdir holding one. --metrics (comma
separated, default mean_episode_return) draws one panel per metric, stacked on a
shared x axis, each run in the same colour on every panel. A metric is a key of
the rows, a glob of keys (`mean_episode_return/*`: one line per level of a
multi-level run, named in that panel's legend; `time/*`), or an alias: return,
lag (policy_lag), vtrace (vtrace/*, one panel), loss (total_loss, pg_loss,
baseline_loss, entropy_loss: four panels). `entropy` is the policy entropy in
nats per agent step: the learner logs entropy_loss, the negated entropy summed
over a batch's T x B steps, and T x B follows from the rows (frames and updates
between rows, fps / sps frames per step).

--window N draws the return panels as the mean of the last N episodes (the
running mean run_summary.py's targets use, from the rows' episode counts)
instead of an exponential moving average of the rows' means.

Runs given the same --labels are seeds of one configuration: they draw one line,
the mean of their smoothed curves, with a band from their min to their max, over
the x range all of them cover. --hline draws a reference line (e.g. 18 or 20 for
Pong) on the return panels. For the frames and hours at which runs reached a
target, see scripts/run_summary.py.

Null values (no episode finished in an interval) are skipped; a torn last line
(the learner died mid-write) is ignored. Raw points are drawn faintly on panels
of one metric, with an exponential moving average of them on top.

On success it prints where the PNG went. A metric that a run lacks is skipped
there with a one-line warning on stderr; a metric that no run has, a missing
file, or bad options is a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402  (after selecting the backend)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's impala, installed or not
from impala.metrics import EpisodeWindow, read_jsonl  # noqa: E402

X_AXES = ("frames", "wall_time")
RETURN = "mean_episode_return"
# Each alias stands for one panel per entry.
ALIASES: dict[str, tuple[str, ...]] = {
    "return": (RETURN,),
    "lag": ("policy_lag",),
    "vtrace": ("vtrace/*",),
    "loss": ("total_loss", "pg_loss", "baseline_loss", "entropy_loss"),
}
Y_LABELS = {
    RETURN: "mean episode return",
    "policy_lag": "policy lag (updates)",
    "entropy": "policy entropy (nats/step)",
    "fps": "frames per second",
}
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = (None, "o", "s", "^", "x", "D", "v", "+")


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


def _episodes_key(return_key: str) -> str:
    """The row key counting the episodes behind a return key (episodes, episodes/<level>)."""
    return "episodes" + return_key[len(RETURN) :]


def samples_per_update(rows: Sequence[dict]) -> float | None:
    """T x B, the agent steps in one learner batch, from consecutive rows: the
    frames between them / the updates between them (applied + skipped) / the
    frames per agent step (fps / sps). The median over the run; None without two
    rows that hold frames, param_version, fps and sps."""
    estimates = []
    for prev, row in zip(rows, rows[1:]):
        frames, version, prev_frames, prev_version, fps, sps = (
            _number(r.get(k))
            for r, k in (
                (row, "frames"),
                (row, "param_version"),
                (prev, "frames"),
                (prev, "param_version"),
                (row, "fps"),
                (row, "sps"),
            )
        )
        if None in (frames, version, prev_frames, prev_version, fps, sps) or not fps or not sps:
            continue
        updates = version - prev_version + (_number(row.get("skipped_updates")) or 0)
        if updates > 0 and frames > prev_frames:
            estimates.append((frames - prev_frames) / updates / round(fps / sps))
    return statistics.median(estimates) if estimates else None


@dataclass
class Run:
    file: Path
    rows: list[dict]  # the file's rows; with the derived 'entropy' where the learner logged none
    keys: set[str]  # the keys that hold a number in some row

    def curve(self, key: str, x: str, window: int | None = None) -> tuple[list[float], list[float]]:
        """(xs, ys) of the rows that hold both, sorted by x. With x='wall_time' the
        xs are seconds since the run's first row. With a `window` (return keys only),
        ys are the mean return of the last `window` episodes (impala.metrics.EpisodeWindow,
        as run_summary.py), from the rows that ended episodes."""
        start = 0.0
        if x == "wall_time":
            start = next(t for t in (_number(r.get(x)) for r in self.rows) if t is not None)
        points = []
        for row in self.rows:
            xv, yv = _number(row.get(x)), _number(row.get(key))
            if xv is not None and yv is not None:
                points.append((xv - start, yv, _number(row.get(_episodes_key(key))) or 0))
        points.sort(key=lambda p: p[0])  # stable: rows with equal x keep file order
        if window is None:
            return [p[0] for p in points], [p[1] for p in points]
        recent, xs, ys = EpisodeWindow(window), [], []
        for xv, yv, episodes in points:
            if episodes > 0:
                recent.add(yv, int(episodes))
                xs.append(xv)
                ys.append(recent.mean)
        return xs, ys


def load_run(path: str | os.PathLike, x: str = "frames") -> Run:
    """The rows of one metrics file (or logdir holding one), checked to have x values."""
    if x not in X_AXES:
        raise PlotError(f"unknown x axis {x!r}; choose one of {', '.join(X_AXES)}")
    file = _metrics_file(path)
    try:
        rows = [r for r in read_jsonl(file) if isinstance(r, dict)]
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"cannot read {file}: {e}") from None
    if not any(_number(r.get(x)) is not None for r in rows):
        raise PlotError(f"{file} has no {x} values")
    if not any(_number(r.get("entropy")) is not None for r in rows):
        samples = samples_per_update(rows)
        if samples:
            rows = [
                {**r, "entropy": -r["entropy_loss"] / samples} if _number(r.get("entropy_loss")) is not None else r
                for r in rows
            ]
    return Run(file, rows, {k for row in rows for k, v in row.items() if _number(v) is not None})


@dataclass
class Panel:
    name: str  # one key, or a glob of keys
    ylabel: str

    def is_glob(self) -> bool:
        return any(c in self.name for c in "*?[")

    def keys_in(self, run: Run) -> list[str]:
        if self.is_glob():
            return sorted(k for k in run.keys if fnmatch.fnmatchcase(k, self.name))
        return [self.name] if self.name in run.keys else []

    def is_return(self) -> bool:
        return self.name == RETURN or self.name.startswith(RETURN + "/")


def panels_for(metrics: Sequence[str]) -> list[Panel]:
    """One panel per metric, aliases expanded (duplicates dropped, order kept)."""
    names: list[str] = []
    for metric in metrics:
        for name in ALIASES.get(metric, (metric,)):
            if name not in names:
                names.append(name)
    return [Panel(name, Y_LABELS.get(name, name)) for name in names]


def _known_metrics(runs: Sequence[Run], wanted: str) -> str:
    """The metrics the runs have, those close to `wanted` first; groups of many
    keys under one prefix (time/*, per-level keys) as one glob."""
    keys = sorted(set().union(*(run.keys for run in runs)) - set(X_AXES))
    by_prefix: dict[str, list[str]] = {}
    for key in keys:
        if "/" in key:
            by_prefix.setdefault(key.split("/")[0], []).append(key)
    many = {prefix for prefix, group in by_prefix.items() if len(group) > 5}
    listed = sorted({f"{k.split('/')[0]}/*" if "/" in k and k.split("/")[0] in many else k for k in keys})
    listed += [alias for alias in ALIASES if alias not in listed]
    close = difflib.get_close_matches(wanted, list(dict.fromkeys(listed + keys)), n=5, cutoff=0.6)
    return ", ".join(close + [name for name in listed if name not in close])


def _format_frames(value: float, _pos=None) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def _warn_to_stderr(message: str) -> None:
    print(f"plot.py: warning: {message}", file=sys.stderr)


def build_figure(
    paths: Sequence[str | os.PathLike],
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] = (RETURN,),
    smoothing: float = 0.9,
    title: str | None = None,
    x: str = "frames",
    hlines: Sequence[float] = (),
    window: int | None = None,
    warn: Callable[[str], None] = _warn_to_stderr,
) -> Figure:
    """The figure: one panel (Axes) per metric, top to bottom, sharing x.

    Every curve's line is labelled '<run label>: <key>' (a group's mean line too);
    raw points and reference lines have labels starting with '_'. Runs with the
    same label form one group. Raises PlotError for a missing file, a metric no
    run has, labels that do not match the paths, or bad options; calls `warn` once
    per (run, metric) that is skipped. With a `window`, return panels draw the mean
    of the last `window` episodes instead of an exponential moving average."""
    if not paths:
        raise PlotError("no metrics files given")
    if labels is not None and len(labels) != len(paths):
        raise PlotError(f"{len(labels)} label(s) for {len(paths)} run(s)")
    if not 0.0 <= smoothing < 1.0:
        raise PlotError(f"smoothing must be in [0, 1), got {smoothing}")
    if window is not None and window < 1:
        raise PlotError(f"--window must be at least 1, got {window}")
    metrics = [m.strip() for m in metrics if m.strip()]
    if not metrics:
        raise PlotError("no metrics given")
    runs = [load_run(p, x) for p in paths]  # every input checked before drawing
    if labels is None:
        labels = [_default_label(run.file) for run in runs]
        # Groups come from --labels only: two logdirs that share a name stay two lines.
        labels = [str(run.file) if labels.count(label) > 1 else label for run, label in zip(runs, labels)]
    panels = panels_for(metrics)
    if hlines and not any(panel.is_return() for panel in panels):
        raise PlotError(f"--hline is drawn on the {RETURN} panels; --metrics has none")

    # (panel, run) -> keys; a metric no run has is an error, one some runs lack a warning.
    keys = {}
    for panel in panels:
        for i, run in enumerate(runs):
            keys[panel.name, i] = panel.keys_in(run)
            if window is not None and panel.is_return():
                # The window counts episodes: a return key without its count cannot be drawn so.
                counted = [k for k in keys[panel.name, i] if _episodes_key(k) in run.keys]
                if keys[panel.name, i] and not counted:
                    raise PlotError(f"--window needs episode counts beside {panel.name}; {run.file} has none")
                keys[panel.name, i] = counted
        if not any(keys[panel.name, i] for i in range(len(runs))):
            where = ", ".join(str(run.file) for run in runs)
            raise PlotError(f"no values of {panel.name} in {where}; there are: {_known_metrics(runs, panel.name)}")
    for panel in panels:
        for i, run in enumerate(runs):
            if not keys[panel.name, i]:
                hint = ""
                if panel.name == "entropy" and "entropy_loss" in run.keys:
                    hint = " (its rows do not give the batch size; plot entropy_loss)"
                warn(f"{labels[i]} ({run.file}) has no {panel.name}{hint}; skipped there")

    groups: dict[str, list[int]] = {}  # label -> run indices, in order of first appearance
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    colors = {label: f"C{n % 10}" for n, label in enumerate(groups)}

    curves = {
        (panel.name, i, key): run.curve(key, x, window if panel.is_return() else None)
        for panel in panels
        for i, run in enumerate(runs)
        for key in keys[panel.name, i]
    }
    longest = max((xs[-1] for xs, _ in curves.values() if xs), default=0.0)
    hours = x == "wall_time" and longest >= 2 * 3600
    x_scale = (3600.0 if hours else 60.0) if x == "wall_time" else 1.0

    height = 5.0 if len(panels) == 1 else 1.2 + 2.4 * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, height), dpi=100, sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, panel in zip(axes, panels):
        windowed = window is not None and panel.is_return()
        weight = 0.0 if windowed else smoothing  # a window is smoothing enough
        panel_keys = sorted({k for i in range(len(runs)) for k in keys[panel.name, i]})
        prefix = panel.name.split("*")[0] if panel.is_glob() else ""
        key_handles = []
        for k, key in enumerate(panel_keys):
            # Colour is the run's; several keys in one panel differ by line style, or
            # by colour when there is one run.
            if len(groups) == 1:
                style = {"color": f"C{k % 10}", "linestyle": LINE_STYLES[k // 10 % len(LINE_STYLES)], "marker": None}
            else:
                style = {
                    "linestyle": LINE_STYLES[k % len(LINE_STYLES)],
                    "marker": MARKERS[k // len(LINE_STYLES) % len(MARKERS)],
                }
            key_name = key[len(prefix) :] if key.startswith(prefix) else key
            key_handles.append(Line2D([], [], **{"color": "black", **style}, label=key_name))
            for label, members in groups.items():
                color = style.get("color", colors[label])
                drawn = [i for i in members if curves.get((panel.name, i, key), ((),))[0]]
                runs_curves = [
                    ([v / x_scale for v in xs], ys) for xs, ys in (curves[panel.name, i, key] for i in drawn)
                ]
                line = {"color": color, "linestyle": style["linestyle"], "linewidth": 2.0}
                if style["marker"]:
                    line.update(marker=style["marker"], markevery=0.1, markersize=4)
                if len(runs_curves) == 1:
                    xs, ys = runs_curves[0]
                    if len(panel_keys) == 1 and not windowed:
                        # Raw points under an EMA (under a --window line the rows' own
                        # means, of one episode or several, would only hide it).
                        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8, marker=".", markersize=3, label="_raw")
                    ax.plot(xs, smooth(ys, weight), label=f"{label}: {key}", **line)
                elif runs_curves:
                    grid, mean, low, high = _band(runs_curves, weight)
                    if grid is None:
                        warn(f"the runs labelled {label} do not overlap in {x} for {key}; skipped there")
                        continue
                    ax.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
                    ax.plot(grid, mean, label=f"{label}: {key}", **line)
        if panel.is_return():
            for value in hlines:
                ax.axhline(value, color="grey", linestyle="--", linewidth=1.0, label="_hline")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if len(panel_keys) > 1:
            # An artist of its own: the runs' legend (ax.legend) must not replace it on the first panel.
            names = [h.get_label() for h in key_handles]
            ax.add_artist(Legend(ax, key_handles, names, loc="best", fontsize="small", title=panel.name))
    run_handles = [
        Line2D([], [], color=colors[label], linewidth=2.0, label=label + (f" ({n} runs)" if n > 1 else ""))
        for label, n in ((label, len(members)) for label, members in groups.items())
    ]
    axes[0].legend(handles=run_handles, loc="best")
    if title:
        axes[0].set_title(title)
    bottom = axes[-1]
    if x == "frames":
        bottom.xaxis.set_major_formatter(FuncFormatter(_format_frames))
        bottom.set_xlabel("environment frames")
    else:
        bottom.set_xlabel("wall-clock time (hours)" if hours else "wall-clock time (minutes)")
    fig.tight_layout()
    return fig


def _band(curves: Sequence[tuple[list[float], list[float]]], smoothing: float):
    """(grid, mean, min, max) of the runs' smoothed curves, on the union of their
    xs within the range all of them cover; (None,) * 4 if they do not overlap."""
    lo, hi = max(xs[0] for xs, _ in curves), min(xs[-1] for xs, _ in curves)
    if lo > hi:
        return None, None, None, None
    grid = np.unique(np.concatenate([np.asarray(xs) for xs, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    stacked = np.stack([np.interp(grid, xs, smooth(ys, smoothing)) for xs, ys in curves])  # [runs, len(grid)]
    return grid, stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0)


def plot(paths: Sequence[str | os.PathLike], output: str | os.PathLike, **options) -> None:
    """Builds the figure (build_figure's options) and saves it as a PNG at `output`."""
    fig = build_figure(paths, **options)
    try:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, format="png")
    finally:
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="metrics.jsonl files or logdirs holding one")
    parser.add_argument("--output", "-o", required=True, help="PNG file to write (its folder is made if missing)")
    parser.add_argument(
        "--labels", help="comma-separated legend labels, one per path; runs with the same label are drawn as one group"
    )
    parser.add_argument(
        "--metrics",
        default=RETURN,
        help=f"comma-separated metrics, one panel each: row keys, globs of keys, or the aliases "
        f"{', '.join(ALIASES)}; 'entropy' is derived from entropy_loss (default {RETURN})",
    )
    parser.add_argument(
        "--smoothing", type=float, default=0.9, help="exponential moving average weight in [0, 1) (default 0.9)"
    )
    parser.add_argument(
        "--window",
        type=int,
        help="return panels draw the mean of the last WINDOW episodes (as run_summary.py's targets), "
        "not an exponential moving average",
    )
    parser.add_argument("--title", help="title above the plot (default: none)")
    parser.add_argument("--x", choices=X_AXES, default="frames", help="x axis (default frames)")
    parser.add_argument(
        "--hline",
        type=float,
        action="append",
        default=[],
        help="a horizontal reference line on the return panels, e.g. 18 for Pong (may be repeated)",
    )
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels is not None else None
    try:
        plot(
            args.paths,
            args.output,
            labels=labels,
            metrics=args.metrics.split(","),
            smoothing=args.smoothing,
            title=args.title,
            x=args.x,
            hlines=args.hline,
            window=args.window,
        )
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
