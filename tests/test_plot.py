"""Tests for scripts/plot.py: the CLI end to end, the smoothing, the error path, and
the figure's panels and lines for several runs and metrics (inspected on the Figure)."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest

from impala.config import Config
from impala.metrics import MetricsWriter, Stopwatch, read_jsonl
from impala.progress import ProgressLog
from impala.receiver import ActorBook
from impala.unroll import new_unroll, unroll_spec
from tests import scripts

SCRIPT = scripts.path("plot")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


plot_script = scripts.load("plot")


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
    xs, ys = plot_script.load_run(run).curve("mean_episode_return", "frames")
    assert xs == [2000.0, 4000.0] and ys == [10.0, 20.0]
    xs, _ = plot_script.load_run(run, x="wall_time").curve("mean_episode_return", "wall_time")
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


# --- several runs, several metrics ---------------------------------------------------

LEVELS = ("breakout", "pong")


def _write_learner_run(logdir: Path, rows: int = 12, samples: int = 640, entropy: float = 1.5, levels=(), **drop):
    """A metrics.jsonl written by the real MetricsWriter, with the learner's keys:
    `samples` (T x B) agent steps per update at 4 frames each, two updates per row,
    entropy_loss = -entropy * samples (a sum over the batch, as in impala.losses).
    Keys named in `drop` are left out; `levels` adds per-level returns."""
    logdir.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(logdir, tensorboard=False)
    for i in range(1, rows + 1):
        row = {
            "frames": i * 2 * samples * 4,
            "param_version": 2 * i,
            "fps": 400.0,
            "sps": 100.0,
            "skipped_updates": 0,
            "wall_time": 1_700_000_000.0 + 5.0 * i,
            "mean_episode_return": None if i == 1 else float(i),
            "episodes": 0 if i == 1 else 2,
            "policy_lag": 1.0 + i % 2,
            "total_loss": 1.0 / i,
            "pg_loss": 0.5 / i,
            "baseline_loss": 2.0 / i,
            "entropy_loss": -entropy * samples,
            "grad_norm": 3.0,
            "vtrace/mean_rho": 1.0,
            "vtrace/rho_clipped": 0.5,
            "vtrace/pg_rho_clipped": 0.5,
            "vtrace/mean_abs_vs_minus_value": 0.2,
        }
        for n, level in enumerate(levels):
            if (i + n) % 2:  # a level has no episode in every interval
                row[f"mean_episode_return/{level}"] = float(10 * n + i)
                row[f"episodes/{level}"] = 1
        writer.write({k: v for k, v in row.items() if k not in drop})
    writer.close()
    return logdir


def _curves(ax) -> list[str]:
    """Labels of an axes' curve lines (not raw points or reference lines)."""
    return sorted(line.get_label() for line in ax.lines if not line.get_label().startswith("_"))


def _legends(ax) -> list[list[str]]:
    """The texts of each legend drawn on an axes (a panel's keys, then the runs)."""
    return [[t.get_text() for t in a.get_texts()] for a in ax.get_children() if isinstance(a, matplotlib.legend.Legend)]


def _color(line) -> str:
    return matplotlib.colors.to_hex(line.get_color())


def _figure(*args, **kwargs):
    warnings: list[str] = []
    fig = plot_script.build_figure(*args, warn=warnings.append, **kwargs)
    return fig, warnings


def test_several_runs_and_metrics_one_panel_each_one_colour_per_run(tmp_path):
    a = _write_learner_run(tmp_path / "a")
    b = _write_learner_run(tmp_path / "b", samples=320)
    fig, warnings = _figure([a, b], metrics=["return", "entropy", "lag", "vtrace", "loss", "grad_norm"], hlines=[20])
    assert warnings == []
    axes = fig.get_axes()
    keys = ["mean_episode_return", "entropy", "policy_lag", None, "total_loss", "pg_loss", "baseline_loss"]
    keys += ["entropy_loss", "grad_norm"]
    assert len(axes) == len(keys) == 9  # loss is four panels, vtrace one
    vtrace = ["mean_abs_vs_minus_value", "mean_rho", "pg_rho_clipped", "rho_clipped"]
    for ax, key in zip(axes, keys):
        if key is None:  # one line per run per vtrace/* key, no raw points
            assert _curves(ax) == sorted(f"{r}: vtrace/{k}" for r in "ab" for k in vtrace)
            assert len(ax.lines) == 8
            assert _legends(ax) == [vtrace]
            continue
        assert _curves(ax) == [f"a: {key}", f"b: {key}"]
        raw = [line for line in ax.lines if line.get_label() == "_raw"]
        assert len(raw) == 2
        hline = [line for line in ax.lines if line.get_label() == "_hline"]
        assert len(hline) == (1 if key == "mean_episode_return" else 0)
    # The same colour for a run on every panel, and one legend for the runs.
    colors = {
        r: {_color(line) for ax in axes for line in ax.lines if line.get_label().startswith(f"{r}: ")} for r in "ab"
    }
    assert len(colors["a"]) == len(colors["b"]) == 1 and colors["a"] != colors["b"]
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["a", "b"]
    assert all(ax.get_legend() is None for ax in axes[1:] if ax is not axes[3])
    assert axes[-1].get_xlabel() == "environment frames" and axes[0].get_xlabel() == ""
    assert axes[1].get_ylabel() == "policy entropy (nats/step)"
    fig.clf()


def test_entropy_per_step_from_entropy_loss_whatever_the_batch(tmp_path):
    big = plot_script.load_run(_write_learner_run(tmp_path / "big", samples=640, entropy=1.5))
    small = plot_script.load_run(_write_learner_run(tmp_path / "small", samples=80, entropy=0.7))
    assert plot_script.samples_per_update(big.rows) == 640
    assert big.curve("entropy", "frames")[1] == pytest.approx([1.5] * 12)
    assert small.curve("entropy", "frames")[1] == pytest.approx([0.7] * 12)
    # Without param_version the batch size is unknown: no entropy, and a warning that says why.
    blind = _write_learner_run(tmp_path / "blind", param_version=None)
    assert "entropy" not in plot_script.load_run(blind).keys
    fig, warnings = _figure([tmp_path / "big", blind], metrics=["entropy"])
    assert len(warnings) == 1 and "blind" in warnings[0] and "plot entropy_loss" in warnings[0]
    fig.clf()


def test_entropy_from_the_progress_logs_rows_with_skipped_updates(tmp_path):
    """Rows written by the learner's own ProgressLog: the keys and the frames/updates
    bookkeeping plot.py derives T x B from (a skipped update consumes frames)."""
    config = Config(level_name="CartPole-v1", logdir=str(tmp_path), num_action_repeats=4, batch_size=8, unroll_length=5)
    samples = config.batch_size * config.unroll_length
    book = ActorBook(num_actions=2, num_action_repeats=4)
    metrics = MetricsWriter(tmp_path, tensorboard=False)
    clock = itertools.count(0.0, 7.0).__next__
    log = ProgressLog(config, metrics, book, Stopwatch(), lambda: 0, frames=0, clock=clock)
    frames = version = 0
    for update in range(12):
        if update % 3 == 1:  # most intervals between rows hold a skipped update
            log.add_update({"total_loss": float("nan"), "entropy_loss": float("nan"), "skipped": 1.0})
        else:
            log.add_update(
                {
                    "total_loss": 1.0,
                    "pg_loss": 0.5,
                    "baseline_loss": 0.1,
                    "entropy_loss": -0.6 * samples,
                    "skipped": 0.0,
                }
            )
            version += 1
        frames += config.frames_per_step
        arrays = new_unroll(unroll_spec(config.unroll_length, (4,), np.float32, 2), 1)
        book.record(0, b"peer", "CartPole-v1", arrays, lag=update % 3)
        if update % 2:
            log.maybe_write(frames, version, learning_rate=0.1, force=True)
    metrics.close()
    assert sum(r["skipped_updates"] for r in read_jsonl(tmp_path / "metrics.jsonl")) == 4
    run = plot_script.load_run(tmp_path)
    assert plot_script.samples_per_update(run.rows) == samples
    assert run.curve("entropy", "frames")[1] == pytest.approx([0.6] * 6)
    fig, warnings = _figure([tmp_path], metrics=["entropy", "lag", "loss"])
    assert warnings == [] and len(fig.get_axes()) == 6
    fig.clf()


def test_glob_one_line_per_level_named_in_the_legend(tmp_path):
    multi = _write_learner_run(tmp_path / "multi", levels=LEVELS)
    fig, _ = _figure([multi], metrics=["mean_episode_return/*"], hlines=[20])
    (ax,) = fig.get_axes()
    assert _curves(ax) == [f"multi: mean_episode_return/{level}" for level in LEVELS]
    assert len([line for line in ax.lines if line.get_label() == "_hline"]) == 1
    assert _legends(ax) == [list(LEVELS), ["multi"]]
    xs, _ = next(line.get_data() for line in ax.lines if line.get_label().endswith("/pong"))
    assert len(xs) == 6  # only the rows where pong had an episode
    assert len({_color(line) for line in ax.lines if not line.get_label().startswith("_")}) == 2  # one run: by colour
    fig.clf()
    # Two runs: a colour per run, a line style per level; the runs' legend keeps its own.
    other = _write_learner_run(tmp_path / "other", levels=LEVELS)
    fig, _ = _figure([multi, other], metrics=["mean_episode_return/*", "return"])
    ax = fig.get_axes()[0]
    curves = [line for line in ax.lines if not line.get_label().startswith("_")]
    assert len(curves) == 4
    assert {(line.get_label().split(":")[0], _color(line)) for line in curves} == {
        ("multi", "#1f77b4"),
        ("other", "#ff7f0e"),
    }
    assert len({line.get_linestyle() for line in curves}) == 2
    assert _legends(ax) == [list(LEVELS), ["multi", "other"]]
    fig.clf()


def test_runs_with_one_label_are_a_mean_with_a_min_max_band(tmp_path):
    runs = [_write_learner_run(tmp_path / f"s{seed}", rows=rows) for seed, rows in ((1, 12), (2, 8), (3, 12))]
    for run, scale in zip(runs, (1.0, 2.0, 4.0)):  # the seeds' returns differ
        rows = read_jsonl(run / "metrics.jsonl")
        (run / "metrics.jsonl").unlink()
        writer = MetricsWriter(run, tensorboard=False)
        for row in rows:
            writer.write(
                {**row, "mean_episode_return": row["mean_episode_return"] and row["mean_episode_return"] * scale}
            )
        writer.close()
    solo = _write_learner_run(tmp_path / "solo")
    fig, _ = _figure([*runs, solo], labels=["A", "A", "A", "B"], smoothing=0.0)
    (ax,) = fig.get_axes()
    assert _curves(ax) == ["A: mean_episode_return", "B: mean_episode_return"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A (3 runs)", "B"]
    mean = next(line for line in ax.lines if line.get_label() == "A: mean_episode_return")
    xs, ys = mean.get_data()
    frames_per_row = 2 * 640 * 4
    assert list(xs) == [frames_per_row * i for i in range(2, 9)]  # the range all three cover (s2 is shorter)
    assert list(ys) == pytest.approx([i * 7 / 3 for i in range(2, 9)])  # mean of i, 2i, 4i
    (band,) = ax.collections
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert (low, high) == pytest.approx((2.0, 32.0))  # min at the first x, max at the last
    fig.clf()


def test_default_figure_is_the_return_curve_as_before(tmp_path):
    a, b = _write_learner_run(tmp_path / "a"), _write_learner_run(tmp_path / "b", rows=5)
    fig, _ = _figure([a, b])
    (ax,) = fig.get_axes()
    assert ax.get_ylabel() == "mean episode return" and ax.get_xlabel() == "environment frames"
    assert _curves(ax) == ["a: mean_episode_return", "b: mean_episode_return"] and len(ax.lines) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    fig.clf()
    # The command line without --metrics draws what --metrics return draws.
    first, second = tmp_path / "default.png", tmp_path / "return.png"
    assert _run(a, b, "--output", first).returncode == 0
    assert _run(a, b, "--output", second, "--metrics", "return").returncode == 0
    assert first.read_bytes() == second.read_bytes()


def test_cli_metric_missing_in_one_run_is_a_warning(tmp_path):
    a = _write_learner_run(tmp_path / "a")
    b = _write_learner_run(tmp_path / "b", policy_lag=None)
    output = tmp_path / "lag.png"
    result = _run(a, b, "--metrics", "return,lag", "--x", "wall_time", "--output", output)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("plot.py: warning: b (") and "policy_lag" in result.stderr
    assert output.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--metrics", "return,polcy_lag"], "no values of polcy_lag in "),
        (["--metrics", "lag", "--hline", "20"], "--hline is drawn on the mean_episode_return panels"),
    ],
)
def test_cli_metric_missing_everywhere_is_one_line_exit_2(tmp_path, args, expected):
    a = _write_learner_run(tmp_path / "a", levels=LEVELS)
    b = _write_learner_run(tmp_path / "b")
    output = tmp_path / "x.png"
    result = _run(a, b, *args, "--output", output)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("plot.py: error: " + expected), result.stderr
    if "polcy_lag" in args[1]:
        known = result.stderr.split("there are: ")[1].strip().split(", ")
        assert known[0] == "policy_lag"  # the close match first
        assert {"vtrace/mean_rho", "mean_episode_return/pong", "entropy", "lag", "vtrace"} <= set(known)
    assert not output.exists()


def test_window_draws_the_mean_of_the_last_episodes_as_run_summary_counts_it(tmp_path):
    """--window: the return line is the running mean over the last N episodes (rows
    weighted by their episodes, whole rows kept), the quantity run_summary.py's
    targets use; without it, the same rows give an exponential moving average."""
    run = _write_learner_run(tmp_path / "a", rows=12, levels=("pong",))  # rows 2..12: 2 episodes, return i
    fig, warnings = _figure([run], metrics=["return", "mean_episode_return/*"], window=4, smoothing=0.9)
    assert warnings == []
    top, levels = fig.get_axes()
    line = next(line for line in top.lines if line.get_label() == "a: mean_episode_return")
    xs, ys = line.get_data()
    assert list(xs) == [2 * 640 * 4 * i for i in range(2, 13)]  # the rows that ended episodes
    # Row i's 2 episodes and row i-1's make the last 4: the mean is i - 0.5 (row 2 alone: 2).
    assert list(ys) == pytest.approx([2.0] + [i - 0.5 for i in range(3, 13)])
    assert ys[-1] == scripts.load("run_summary").summarize(read_jsonl(run / "metrics.jsonl"), [], window=4)["last_mean"]
    assert not [line for line in top.lines if line.get_label() == "_raw"]  # the rows' own means would hide it
    # A level's window uses its own counts (episodes/pong: one episode in every other row).
    (pong,) = [line for line in levels.lines if line.get_label() == "a: mean_episode_return/pong"]
    assert list(pong.get_data()[1]) == pytest.approx([1.0, 2.0, 3.0, 4.0, 6.0, 8.0])  # returns 1, 3, ..., 11
    fig.clf()
    fig, _ = _figure([run], window=None, smoothing=0.9)
    (ax,) = fig.get_axes()
    line = next(line for line in ax.lines if line.get_label() == "a: mean_episode_return")
    assert list(line.get_data()[1]) == pytest.approx(plot_script.smooth([float(i) for i in range(2, 13)], 0.9))
    fig.clf()


def test_window_without_episode_counts_is_one_line_exit_2(tmp_path):
    run = _write_learner_run(tmp_path / "a", episodes=None)
    result = _run(run, "--window", "100", "--output", tmp_path / "x.png")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"plot.py: error: --window needs episode counts beside mean_episode_return; {run / 'metrics.jsonl'} has none"
    ]
    assert _run(run, "--window", "0", "--output", tmp_path / "x.png").returncode == 2
    assert not (tmp_path / "x.png").exists()
