"""Tests for scripts/atari_table.py: exact table values from synthetic results, errors."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import scripts

SCRIPT = scripts.path("atari_table")


atari_table = scripts.load("atari_table")


def _level(name, returns, hns=None):
    entry = {"level": name, "episode_returns": returns, "mean_return": sum(returns) / len(returns)}
    if hns is not None:
        entry.update(human_normalized_score=hns, human_normalized_score_capped=min(hns, 100.0))
    return entry


def _write(path: Path, levels, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"levels": levels, **extra}))
    return path


@pytest.fixture
def runs(tmp_path):
    """Three runs: a logdir with two games, a file with Pong again (a second seed)
    and a level without reference scores, and a logdir with two more games."""
    a = tmp_path / "a"
    _write(
        a / "test_results.json",
        [
            _level("ALE/Pong-v5", [20.0, 21.0, 19.0], hns=120.0),
            _level("ALE/Breakout-v5", [400.0, 410.0], hns=1000.0),
        ],
        mean_human_normalized_score=560.0,
    )  # the files' own summaries are ignored
    b = _write(
        tmp_path / "b" / "seed2.json",
        [
            _level("ALE/Pong-v5", [17.0, 19.0], hns=100.0),
            _level("CartPole-v1", [500.0]),
        ],
    )
    c = tmp_path / "c"
    _write(
        c / "test_results.json",
        [
            _level("ALE/SpaceInvaders-v5", [900.0, 1100.0], hns=50.0),
            _level("ALE/MsPacman-v5", [1500.0], hns=20.0),
        ],
    )
    return [a, b, c]


def test_csv_holds_exact_values(runs, capsys):
    assert atari_table.main([*map(str, runs), "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["level", "runs", "episodes", "mean_return", "human_normalized_score_percent"]
    body = {r[0]: r[1:] for r in rows[1:]}
    assert [r[0] for r in rows[1:]] == [
        "ALE/Breakout-v5",
        "ALE/MsPacman-v5",
        "ALE/Pong-v5",
        "ALE/SpaceInvaders-v5",
        "CartPole-v1",
        "median",
        "mean",
    ]
    assert body["ALE/Breakout-v5"] == ["1", "2", "405.0", "1000.0"]
    assert body["ALE/Pong-v5"] == ["2", "5", "19.0", "110.0"]  # means over its two runs
    assert body["CartPole-v1"] == ["1", "1", "500.0", ""]  # no reference: no score
    # Scores over the 4 levels that have one: 20, 50, 110, 1000.
    assert body["median"] == ["", "", "", str((50.0 + 110.0) / 2)]
    assert body["mean"] == ["", "", "", str((20.0 + 50.0 + 110.0 + 1000.0) / 4)]


def test_markdown_to_a_file(runs, tmp_path, capsys):
    output = tmp_path / "table.md"
    assert atari_table.main([*map(str, runs), "--output", str(output)]) == 0
    assert capsys.readouterr().out == ""
    lines = output.read_text().splitlines()
    assert lines[0].startswith("| level | runs | episodes | mean return |")
    assert "| ALE/Pong-v5 | 2 | 5 | 19.0 | 110.0 |" in lines
    assert "| CartPole-v1 | 1 | 1 | 500.0 | - |" in lines
    assert lines[-2] == "| **median over 4 levels** | | | | **80.0** |"
    assert lines[-1] == "| **mean over 4 levels** | | | | **295.0** |"


def test_odd_number_of_levels_takes_the_middle_one(tmp_path):
    path = _write(tmp_path / "r.json", [_level(f"L{i}", [0.0], hns=h) for i, h in enumerate([7.0, -3.0, 500.0])])
    assert atari_table.summary(atari_table.table([path])) == (3, 7.0, 168.0)


def test_levels_without_scores_have_no_summary(tmp_path, capsys):
    path = _write(tmp_path / "r.json", [_level("CartPole-v1", [500.0])])
    assert atari_table.main([str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "| **mean over 0 levels** | | | | **-** |"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no results file"),
        ("{not json", "cannot read"),
        ('{"levels": []}', "no list of levels"),
        ("[1, 2]", "no list of levels"),
        ('{"levels": [{"episode_returns": [1], "mean_return": 1}]}', "no level name"),
        ('{"levels": [{"level": "P", "episode_returns": [1]}]}', "no numeric mean_return"),
        ('{"levels": [{"level": "P", "episode_returns": [1], "mean_return": null}]}', "no numeric mean_return"),
        ('{"levels": [{"level": "P", "mean_return": 1}]}', "no list of episode_returns"),
        (
            '{"levels": [{"level": "P", "episode_returns": [1], "mean_return": 1, "human_normalized_score": "high"}]}',
            "non-numeric",
        ),
        (
            '{"levels": [{"level": "P", "episode_returns": [1], "mean_return": 1, "human_normalized_score": 5}, '
            '{"level": "P", "episode_returns": [1], "mean_return": 1}]}',
            "in some runs but not in others",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "test_results.json").write_text(content)
    assert atari_table.main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("atari_table.py: error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_command_line_end_to_end(runs, tmp_path):
    ok = subprocess.run([sys.executable, str(SCRIPT), *map(str, runs)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "| ALE/Breakout-v5 | 1 | 2 | 405.0 | 1000.0 |" in ok.stdout
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "missing")], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "no results file" in bad.stderr
    unwritable = subprocess.run(
        [sys.executable, str(SCRIPT), str(runs[0]), "--output", str(tmp_path / "no" / "such" / "dir" / "t.md")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unwritable.returncode == 2 and unwritable.stderr.startswith("atari_table.py: error: ")
