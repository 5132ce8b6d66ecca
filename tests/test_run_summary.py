"""scripts/run_summary.py: frames and training time at which runs reached returns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from impala.metrics import MetricsWriter
from tests import scripts

SCRIPT = scripts.path("run_summary")


def test_running_mean_over_the_window_and_gaps_not_counted():
    summarize = scripts.load("run_summary").summarize
    rows = [
        {"frames": 0, "wall_time": 1000.0, "episodes": 0, "mean_episode_return": None},
        {"frames": 100, "wall_time": 1010.0, "episodes": 2, "mean_episode_return": -20.0},
        {"frames": 200, "wall_time": 1020.0, "episodes": 2, "mean_episode_return": 10.0},
        # stopped for an hour, then resumed:
        {"frames": 300, "wall_time": 4620.0, "episodes": 2, "mean_episode_return": 20.0},
        {"frames": 400, "wall_time": 4630.0, "episodes": 2, "mean_episode_return": 20.0},
    ]
    s = summarize(rows, targets=[15.0, 20.0, 21.0], window=4)
    assert s["frames"] == 400 and s["wall_s"] == 30.0  # the 3600 s gap is not training
    assert s["last_mean"] == 20.0  # the last 4 episodes
    # After row 3 the last 4 episodes average (10 + 20) / 2 = 15 (row 1 dropped); after row 4, 20.
    assert s["reached"] == {
        15.0: {"frames": 300, "wall_s": 20.0, "mean": 15.0},
        20.0: {"frames": 400, "wall_s": 30.0, "mean": 20.0},
        21.0: None,
    }
    assert summarize(rows, targets=[-100.0], window=100)["reached"] == {-100.0: None}  # never 100 episodes


def _write_run(logdir: Path, returns: list[float]) -> Path:
    """Rows from the real writer: 2 episodes and 1000 frames per row, 10 s apart."""
    logdir.mkdir()
    writer = MetricsWriter(logdir, tensorboard=False)
    for i, value in enumerate(returns):
        writer.write({"frames": 1000 * (i + 1), "wall_time": 10.0 * i, "episodes": 2, "mean_episode_return": value})
    writer.close()
    return logdir


def test_cli_one_line_per_run_per_target(tmp_path):
    fast = _write_run(tmp_path / "fast", [0.0, 18.0, 20.0, 20.0])
    slow = _write_run(tmp_path / "slow", [0.0, 0.0, 18.0, 18.0])
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(fast), str(slow / "metrics.jsonl"), "--target", "18,20", "--window", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines() == [
        f"{fast}: end: 4,000 frames, 0.01 h training, mean of the last 4 episodes 20.0",
        f"{fast}: mean of the last 4 episodes first >= 18 at 3,000 frames, 0.01 h training (19.0)",
        f"{fast}: mean of the last 4 episodes first >= 20 at 4,000 frames, 0.01 h training (20.0)",
        f"{slow}/metrics.jsonl: end: 4,000 frames, 0.01 h training, mean of the last 4 episodes 18.0",
        f"{slow}/metrics.jsonl: mean of the last 4 episodes first >= 18 at 4,000 frames, 0.01 h training (18.0)",
        f"{slow}/metrics.jsonl: mean of the last 4 episodes never reached 20",
    ]
    # One run prints without the prefix, as before.
    one = subprocess.run(
        [sys.executable, str(SCRIPT), str(fast), "--target", "18"], capture_output=True, text=True, timeout=60
    )
    assert one.stdout.splitlines() == [
        "end: 4,000 frames, 0.01 h training, mean of the last 100 episodes 14.5",  # all 8 episodes
        "mean of the last 100 episodes never reached 18",
    ]


def test_cli_a_missing_run_among_several_is_one_line_and_prints_nothing_else(tmp_path):
    good = _write_run(tmp_path / "good", [1.0])
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(good), str(tmp_path / "absent"), "--target", "1,2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(tmp_path / "absent") in result.stderr


def test_cli_a_window_below_one_is_a_usage_error_without_a_traceback(tmp_path):
    run = _write_run(tmp_path / "run", [1.0])
    for window in ("0", "-3", "x"):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), str(run), "--target", "1", "--window", window],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.splitlines()[-1] == (
            f"run_summary.py: error: argument --window: not a whole number of at least 1: '{window}'"
        )
        assert "Traceback" not in result.stderr
