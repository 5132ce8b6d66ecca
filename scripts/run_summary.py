#!/usr/bin/env python
"""What a training run reached, from its metrics.jsonl: the frames and training
wall time at which the mean return of the last --window episodes first reached
--target, and at the end.

    python scripts/run_summary.py /tmp/impala/pong --target 18

Wall time counts the intervals between consecutive metrics rows, except gaps
longer than --max_gap_s (the run was stopped or paused and later resumed), so a
run resumed across sessions reports the time it trained. A metrics row carries
the mean return of the episodes that ended in its interval and their number; the
running mean weights each row by its episodes.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from impala.metrics import read_jsonl  # noqa: E402


def summarize(rows: list[dict], target: float, window: int = 100, max_gap_s: float = 60.0) -> dict:
    """{'frames', 'wall_s', 'last_mean'} at the end and 'reached' ({'frames',
    'wall_s', 'mean'} or None) for the first row whose running mean >= target."""
    recent: collections.deque[tuple[float, int]] = collections.deque()  # (mean, episodes) per row
    wall, previous, reached, mean = 0.0, None, None, None
    for row in rows:
        if previous is not None and 0 <= row["wall_time"] - previous <= max_gap_s:
            wall += row["wall_time"] - previous
        previous = row["wall_time"]
        if row.get("episodes") and row.get("mean_episode_return") is not None:
            recent.append((row["mean_episode_return"], row["episodes"]))
            while sum(n for _, n in recent) - recent[0][1] >= window:  # keep about `window` episodes
                recent.popleft()
            mean = sum(m * n for m, n in recent) / sum(n for _, n in recent)
            if reached is None and sum(n for _, n in recent) >= window and mean >= target:
                reached = {"frames": row["frames"], "wall_s": wall, "mean": mean}
    return {"frames": rows[-1]["frames"] if rows else 0, "wall_s": wall, "last_mean": mean, "reached": reached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", help="the run's --logdir, or its metrics.jsonl file")
    parser.add_argument(
        "--target",
        type=float,
        required=True,
        help="the mean return to look for (e.g. 18 for Pong, 475 for CartPole-v1)",
    )
    parser.add_argument("--window", type=int, default=100, help="episodes in the running mean (default 100)")
    parser.add_argument(
        "--max_gap_s",
        type=float,
        default=60.0,
        help="gaps between rows longer than this many seconds are not counted as training time (default 60)",
    )
    args = parser.parse_args()
    path = Path(args.logdir)
    file = path / "metrics.jsonl" if path.is_dir() else path
    try:
        rows = read_jsonl(file)
    except (OSError, UnicodeDecodeError) as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else str(e).replace("\n", " ")
        print(f"run_summary.py: error: cannot read {file}: {reason}", file=sys.stderr)
        sys.exit(2)
    s = summarize(rows, args.target, args.window, args.max_gap_s)
    last = f"{s['last_mean']:.1f}" if s["last_mean"] is not None else "-"
    print(
        f"end: {s['frames']:,} frames, {s['wall_s'] / 3600:.2f} h training, "
        f"mean of the last {args.window} episodes {last}"
    )
    if s["reached"]:
        r = s["reached"]
        print(
            f"mean of the last {args.window} episodes first >= {args.target:g} at {r['frames']:,} frames, "
            f"{r['wall_s'] / 3600:.2f} h training ({r['mean']:.1f})"
        )
    else:
        print(f"mean of the last {args.window} episodes never reached {args.target:g}")


if __name__ == "__main__":
    main()
