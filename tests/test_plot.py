"""Tests for scripts/plot.py: the CLI end to end, the smoothing, the error path."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "plot.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_module():
    spec = importlib.util.spec_from_file_location("impala_plot_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_script = _load_module()


def _write_run(path: Path, returns, start_frames=0, torn=True):
    """A metrics.jsonl like the learner's: some null returns, a torn last line."""
    with open(path, "w") as f:
        for i, value in enumerate(returns):
            row = {
                "frames": start_frames + 1000 * (i + 1),
                "mean_episode_return": value,
                "wall_time": 1_700_000_000.0 + 10 * i,
                "fps": 123.4,
            }
            f.write(json.dumps(row) + "\n")
        if torn:
            f.write('{"frames": 99000, "mean_episode_ret')  # crash mid-write
    return path


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_cli_draws_png_from_files_and_logdirs(tmp_path):
    first = _write_run(tmp_path / "a.jsonl", [None, 10.0, 12.5, None, 20.0, 31.0])
    logdir = tmp_path / "run_b"
    logdir.mkdir()
    _write_run(logdir / "metrics.jsonl", [None, None, 9.0, 15.0, 14.0], start_frames=500)
    output = tmp_path / "out" / "curve.png"  # parent directory does not exist yet

    result = _run(
        first, logdir, "--output", output, "--labels", "first,second", "--smoothing", "0.6", "--title", "CartPole"
    )
    assert result.returncode == 0, result.stderr
    data = output.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)


def test_cli_wall_time_axis(tmp_path):
    run = _write_run(tmp_path / "a.jsonl", [1.0, None, 3.0])
    output = tmp_path / "wall.png"
    result = _run(run, "--output", output, "--x", "wall_time", "--smoothing", "0")
    assert result.returncode == 0, result.stderr
    assert output.read_bytes().startswith(PNG_SIGNATURE)


def test_smooth_matches_hand_computation():
    # s0 = 1; s1 = .5*1 + .5*3 = 2; s2 = .5*2 + .5*(-2) = 0; s3 = .5*0 + .5*8 = 4
    assert plot_script.smooth([1.0, 3.0, -2.0, 8.0], 0.5) == pytest.approx([1.0, 2.0, 0.0, 4.0])
    # weight 0.9: s1 = 0.9*10 + 0.1*0 = 9; s2 = 0.9*9 + 0.1*20 = 10.1
    assert plot_script.smooth([10, 0, 20], 0.9) == pytest.approx([10.0, 9.0, 10.1])
    assert plot_script.smooth([4.0, 7.0], 0.0) == [4.0, 7.0]
    assert plot_script.smooth([], 0.9) == []
    with pytest.raises(ValueError):
        plot_script.smooth([1.0], 1.0)


def test_load_curve_skips_nulls_and_torn_line(tmp_path):
    run = _write_run(tmp_path / "a.jsonl", [None, 10.0, float("nan"), 20.0])
    # json.dumps writes NaN as the non-standard token NaN, which json.loads accepts;
    # it must not reach the plot.
    xs, ys = plot_script.load_curve(run)
    assert xs == [2000.0, 4000.0] and ys == [10.0, 20.0]
    xs, _ = plot_script.load_curve(run, x="wall_time")
    assert xs == [10.0, 30.0]  # seconds since the first row


def test_frames_formatting():
    assert plot_script._format_frames(0) == "0"
    assert plot_script._format_frames(2500) == "2.5k"
    assert plot_script._format_frames(1_500_000) == "1.5M"
    assert plot_script._format_frames(2e9) == "2B"


@pytest.mark.parametrize("case", ["missing", "no_returns"])
def test_error_path_exit_2_one_line(tmp_path, case):
    if case == "missing":
        path = tmp_path / "nope.jsonl"
    else:
        path = _write_run(tmp_path / "empty.jsonl", [None, None])
    output = tmp_path / "curve.png"
    result = _run(path, "--output", output)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path.name) in lines[0]
    assert not output.exists()


def test_plot_function_checks_labels_and_inputs(tmp_path):
    good = _write_run(tmp_path / "a.jsonl", [1.0, 2.0])
    with pytest.raises(plot_script.PlotError, match="label"):
        plot_script.plot([good], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(plot_script.PlotError, match="no metrics file"):
        plot_script.plot([good, tmp_path / "missing_dir"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    plot_script.plot([good], tmp_path / "x.png", smoothing=0.0)
    assert (tmp_path / "x.png").read_bytes().startswith(PNG_SIGNATURE)
