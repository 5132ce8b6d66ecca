#!/usr/bin/env python
"""The per-game results table of Atari papers, from `--mode=test` results.

  python scripts/atari_table.py logs/pong logs/breakout/test_results.json --format csv

Each path is a `test_results.json` file or a logdir holding one. Every level in
every file counts as one run of that level (a file may hold several levels). A
level run more than once (several seeds) gets the mean over its runs of the mean
return and of the human-normalised score (the same thing, the score being linear
in the return). The table has one row per level, sorted by name, then the median
and the mean human-normalised score over the levels that have one; levels without
reference scores show "-" and do not count. Scores are in percent. The files'
own summary fields are not used, since the levels of several files are combined.

Markdown (default, rounded for reading) or CSV (full precision), to stdout or
`--output`. A missing or malformed input is a one-line error on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

RESULTS_FILE = "test_results.json"
HNS = "human_normalized_score"


class TableError(Exception):
    """A problem with the inputs, reported as one line (exit status 2)."""


class Row(NamedTuple):
    level: str
    runs: int
    episodes: int
    mean_return: float
    human_normalized_score: float | None


def _results_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise TableError(f"no results file at {path}")
    return path


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def load_runs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The checked level entries of one results file (or logdir)."""
    file = _results_file(path)
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"cannot read {file}: {e}".replace("\n", " ")) from None
    levels = data.get("levels") if isinstance(data, dict) else None
    if not isinstance(levels, list) or not levels:
        raise TableError(f"{file} has no list of levels")
    for i, entry in enumerate(levels):
        where = f"{file}: levels[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("level"), str):
            raise TableError(f"{where} has no level name")
        returns = entry.get("episode_returns")
        if not isinstance(returns, list) or any(_number(r) is None for r in returns):
            raise TableError(f"{where} ({entry['level']}) has no list of episode_returns")
        if _number(entry.get("mean_return")) is None:
            raise TableError(f"{where} ({entry['level']}) has no numeric mean_return")
        if entry.get(HNS) is not None and _number(entry[HNS]) is None:
            raise TableError(f"{where} ({entry['level']}) has a non-numeric {HNS}")
    return levels


def table(paths: Sequence[str | os.PathLike]) -> list[Row]:
    """One row per level over all runs in `paths`, sorted by level name."""
    if not paths:
        raise TableError("no results files given")
    by_level: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for entry in load_runs(path):
            by_level.setdefault(entry["level"], []).append(entry)
    rows = []
    for level in sorted(by_level):
        runs = by_level[level]
        scores = [_number(r.get(HNS)) for r in runs]
        if any(s is None for s in scores) and any(s is not None for s in scores):
            raise TableError(f"{level} has a {HNS} in some runs but not in others")
        rows.append(
            Row(
                level=level,
                runs=len(runs),
                episodes=sum(len(r["episode_returns"]) for r in runs),
                mean_return=statistics.fmean(float(r["mean_return"]) for r in runs),
                human_normalized_score=None if scores[0] is None else statistics.fmean(scores),
            )
        )
    return rows


def summary(rows: Sequence[Row]) -> tuple[int, float | None, float | None]:
    """(number of levels with a score, median score, mean score) over levels."""
    scores = [r.human_normalized_score for r in rows if r.human_normalized_score is not None]
    if not scores:
        return 0, None, None
    return len(scores), statistics.median(scores), statistics.fmean(scores)


HEADER = ("level", "runs", "episodes", "mean_return", "human_normalized_score_percent")


def to_csv(rows: Sequence[Row]) -> str:
    """Full-precision CSV; the summary rows are `median` and `mean` in the level column."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for r in rows:
        writer.writerow(
            [
                r.level,
                r.runs,
                r.episodes,
                repr(r.mean_return),
                "" if r.human_normalized_score is None else repr(r.human_normalized_score),
            ]
        )
    _, median, mean = summary(rows)
    for name, value in (("median", median), ("mean", mean)):
        writer.writerow([name, "", "", "", "" if value is None else repr(value)])
    return out.getvalue()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def to_markdown(rows: Sequence[Row]) -> str:
    count, median, mean = summary(rows)
    lines = [
        "| level | runs | episodes | mean return | human-normalised score (%) |",
        "|:--|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {r.level} | {r.runs} | {r.episodes} | {_fmt(r.mean_return)} | {_fmt(r.human_normalized_score)} |"
        for r in rows
    ]
    lines.append(f"| **median over {count} levels** | | | | **{_fmt(median)}** |")
    lines.append(f"| **mean over {count} levels** | | | | **{_fmt(mean)}** |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help=f"{RESULTS_FILE} files or logdirs holding one")
    parser.add_argument(
        "--format",
        choices=("markdown", "csv"),
        default="markdown",
        help="markdown: rounded, for reading (default); csv: full precision",
    )
    parser.add_argument("--output", "-o", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    try:
        rows = table(args.paths)
        text = to_csv(rows) if args.format == "csv" else to_markdown(rows)
        if args.output is None:
            sys.stdout.write(text)
        else:
            Path(args.output).write_text(text)
    except TableError as e:
        print(f"atari_table.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the output cannot be written
        print(f"atari_table.py: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
