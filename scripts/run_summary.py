#!/usr/bin/env python
"""What training runs reached, from their metrics.jsonl: the frames and training
wall time at which the mean return of the last --window episodes first reached
each --target, and at the end.

    python scripts/run_summary.py /tmp/impala/pong --target 18
    python scripts/run_summary.py /tmp/impala/pong-s1 /tmp/impala/pong-s2 --target 18,20

One line per run for the end and one per run per target; with several runs each
line starts with the run's path as given.

Wall time counts the intervals between consecutive metrics rows, except gaps
longer than --max_gap_s (the run was stopped or paused and later resumed), so a
run resumed across sessions reports the time it trained. A metrics row carries
the mean return of the episodes that ended in its interval and their number; the
running mean weights each row by its episodes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from impala.metrics import EpisodeWindow, read_jsonl  # noqa: E402


def summarize(rows: list[dict], targets: Sequence[float], window: int = 100, max_gap_s: float = 60.0) -> dict:
    """{'frames', 'wall_s', 'last_mean'} at the end and 'reached': {target:
    {'frames', 'wall_s', 'mean'} of the first row whose running mean >= target, or None}."""
    recent = EpisodeWindow(window)
    wall, previous = 0.0, None
    reached: dict[float, dict | None] = dict.fromkeys(targets)
    for row in rows:
        if previous is not None and 0 <= row["wall_time"] - previous <= max_gap_s:
            wall += row["wall_time"] - previous
        previous = row["wall_time"]
        if row.get("episodes") and row.get("mean_episode_return") is not None:
            recent.add(row["mean_episode_return"], row["episodes"])
            for target in targets:
                if reached[target] is None and recent.full and recent.mean >= target:
                    reached[target] = {"frames": row["frames"], "wall_s": wall, "mean": recent.mean}
    return {"frames": rows[-1]["frames"] if rows else 0, "wall_s": wall, "last_mean": recent.mean, "reached": reached}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {text!r}")
    return value


def _targets(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdirs", nargs="+", help="the runs' --logdir, or their metrics.jsonl files")
    parser.add_argument(
        "--target",
        type=_targets,
        required=True,
        help="the mean returns to look for, comma separated (e.g. 18,20 for Pong, 475 for CartPole-v1)",
    )
    parser.add_argument("--window", type=_positive, default=100, help="episodes in the running mean (default 100)")
    parser.add_argument(
        "--max_gap_s",
        type=float,
        default=60.0,
        help="gaps between rows longer than this many seconds are not counted as training time (default 60)",
    )
    args = parser.parse_args()
    runs = []
    for logdir in args.logdirs:  # all read before anything is printed
        path = Path(logdir)
        file = path / "metrics.jsonl" if path.is_dir() else path
        try:
            runs.append((logdir, read_jsonl(file)))
        except (OSError, UnicodeDecodeError) as e:
            reason = "no such file" if isinstance(e, FileNotFoundError) else str(e).replace("\n", " ")
            print(f"run_summary.py: error: cannot read {file}: {reason}", file=sys.stderr)
            sys.exit(2)
    for logdir, rows in runs:
        prefix = f"{logdir}: " if len(runs) > 1 else ""
        s = summarize(rows, args.target, args.window, args.max_gap_s)
        last = f"{s['last_mean']:.1f}" if s["last_mean"] is not None else "-"
        print(
            f"{prefix}end: {s['frames']:,} frames, {s['wall_s'] / 3600:.2f} h training, "
            f"mean of the last {args.window} episodes {last}"
        )
        for target, r in s["reached"].items():
            if r:
                print(
                    f"{prefix}mean of the last {args.window} episodes first >= {target:g} at {r['frames']:,} frames, "
                    f"{r['wall_s'] / 3600:.2f} h training ({r['mean']:.1f})"
                )
            else:
                print(f"{prefix}mean of the last {args.window} episodes never reached {target:g}")


if __name__ == "__main__":
    main()
