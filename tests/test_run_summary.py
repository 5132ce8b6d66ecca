"""scripts/run_summary.py: frames and training time at which a run reached a return."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _summarize():
    spec = importlib.util.spec_from_file_location("run_summary", ROOT / "scripts" / "run_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.summarize


def test_running_mean_over_the_window_and_gaps_not_counted():
    summarize = _summarize()
    rows = [
        {"frames": 0, "wall_time": 1000.0, "episodes": 0, "mean_episode_return": None},
        {"frames": 100, "wall_time": 1010.0, "episodes": 2, "mean_episode_return": -20.0},
        {"frames": 200, "wall_time": 1020.0, "episodes": 2, "mean_episode_return": 10.0},
        # stopped for an hour, then resumed:
        {"frames": 300, "wall_time": 4620.0, "episodes": 2, "mean_episode_return": 20.0},
        {"frames": 400, "wall_time": 4630.0, "episodes": 2, "mean_episode_return": 20.0},
    ]
    s = summarize(rows, target=15.0, window=4)
    assert s["frames"] == 400 and s["wall_s"] == 30.0  # the 3600 s gap is not training
    assert s["last_mean"] == 20.0  # the last 4 episodes
    # After row 3 the last 4 episodes average (10 + 20) / 2 = 15 (row 1 dropped).
    assert s["reached"] == {"frames": 300, "wall_s": 20.0, "mean": 15.0}
    assert summarize(rows, target=21.0, window=4)["reached"] is None
    assert summarize(rows, target=-100.0, window=100)["reached"] is None  # never 100 episodes
