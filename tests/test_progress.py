"""The progress log on its own: a real actor book and metrics file, no sockets."""

from __future__ import annotations

import numpy as np
import pytest

from impala import dmlab30
from impala.config import Config
from impala.metrics import MetricsWriter, Stopwatch, read_jsonl
from impala.progress import MAX_ACTOR_KEYS, ProgressLog, configured_levels
from impala.receiver import ActorBook
from impala.unroll import new_unroll, unroll_spec

A = 3


def _book_with_episodes(book: ActorBook, level: str, returns: list[float], steps: int = 10) -> None:
    spec = unroll_spec(len(returns), (2,), np.float32, A)
    arrays = new_unroll(spec, 1)
    arrays["done"][1:, 0] = True
    arrays["episode_return"][1:, 0] = returns
    arrays["episode_step"][1:, 0] = steps
    book.record(0, b"peer", level, arrays, lag=None)


def _log(tmp_path, level_name: str, book: ActorBook) -> tuple[ProgressLog, MetricsWriter]:
    config = Config(level_name=level_name, logdir=str(tmp_path), num_action_repeats=4)
    metrics = MetricsWriter(tmp_path, tensorboard=False)
    return ProgressLog(config, metrics, book, Stopwatch(), lambda: 0, frames=0), metrics


def test_dmlab30_training_score_is_logged_when_every_level_has_an_episode(tmp_path):
    book = ActorBook(num_actions=A, num_action_repeats=4)
    log, metrics = _log(tmp_path, "dmlab30", book)
    levels = configured_levels("dmlab30")
    assert levels == dmlab30.TRAIN_LEVELS
    returns = {level: float(i) for i, level in enumerate(levels)}
    for level in levels[:-1]:
        _book_with_episodes(book, level, [returns[level]])
    _book_with_episodes(book, "not_a_configured_level", [1e6])
    first = log.maybe_write(frames=100, param_version=1, learning_rate=0.1, force=True)
    assert "dmlab30/training_no_cap" not in first  # one level has no episode yet
    assert "mean_episode_return/not_a_configured_level" not in first  # per-level keys stay bounded
    assert first["mean_episode_frames/rooms_watermaze"] == 40  # 10 agent steps x 4 repeats
    _book_with_episodes(book, levels[-1], [returns[levels[-1]]])
    second = log.maybe_write(frames=200, param_version=2, learning_rate=0.1, force=True)
    expected = dmlab30.compute_human_normalized_score({k: [v] for k, v in returns.items()}, per_level_cap=None)
    capped = dmlab30.compute_human_normalized_score({k: [v] for k, v in returns.items()}, per_level_cap=100)
    assert second["dmlab30/training_no_cap"] == pytest.approx(expected)
    assert second["dmlab30/training_cap_100"] == pytest.approx(capped)
    # The original then starts over: the next score needs every level again.
    _book_with_episodes(book, levels[0], [5.0])
    third = log.maybe_write(frames=300, param_version=3, learning_rate=0.1, force=True)
    assert "dmlab30/training_no_cap" not in third
    metrics.close()
    assert [r["frames"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [100, 200, 300]


def test_a_row_counts_skipped_updates_and_averages_the_others(tmp_path):
    book = ActorBook(num_actions=A, num_action_repeats=1)
    log, metrics = _log(tmp_path, "CartPole-v1", book)
    log.add_update({"total_loss": 1.0, "vtrace/mean_rho": 0.5, "skipped": 0.0})
    log.add_update({"total_loss": float("nan"), "vtrace/mean_rho": float("nan"), "skipped": 1.0})
    log.add_update({"total_loss": 3.0, "vtrace/mean_rho": 1.5, "skipped": 0.0})
    row = log.maybe_write(frames=10, param_version=2, learning_rate=0.1, force=True)
    assert row["skipped_updates"] == 1 and row["total_loss"] == 2.0 and row["vtrace/mean_rho"] == 1.0
    assert "skipped" not in row
    metrics.close()


def test_per_actor_keys_in_a_row_are_capped(tmp_path):
    book = ActorBook(num_actions=A, num_action_repeats=1)
    log, metrics = _log(tmp_path, "CartPole-v1", book)
    arrays = new_unroll(unroll_spec(2, (2,), np.float32, A), 1)
    for task in range(MAX_ACTOR_KEYS + 40):
        book.record(task, b"peer%d" % task, "CartPole-v1", arrays, lag=None)
    row = log.maybe_write(frames=10, param_version=1, learning_rate=0.1, force=True)
    keys = sorted(k for k in row if k.startswith("actor_unrolls_per_s/"))
    assert row["connected_actors"] == MAX_ACTOR_KEYS + 40
    assert len(keys) == MAX_ACTOR_KEYS and "actor_unrolls_per_s/0" in keys
    metrics.close()


def test_the_return_goal_needs_100_episodes_and_a_resumed_log_counts_its_rows_to_the_checkpoint(tmp_path):
    book = ActorBook(num_actions=A, num_action_repeats=1)
    log, metrics = _log(tmp_path, "CartPole-v1", book)
    _book_with_episodes(book, "CartPole-v1", [10.0] * 60)
    log.maybe_write(frames=100, param_version=1, learning_rate=0.1, force=True)
    assert not log.reached(5.0)  # 60 episodes: not yet a mean of the last 100
    _book_with_episodes(book, "CartPole-v1", [0.0] * 40)
    log.maybe_write(frames=200, param_version=2, learning_rate=0.1, force=True)
    assert log.reached(6.0) and not log.reached(6.1) and not log.reached(None)  # (60 x 10 + 40 x 0) / 100
    _book_with_episodes(book, "CartPole-v1", [-100.0] * 100)
    log.maybe_write(frames=300, param_version=3, learning_rate=0.1, force=True)
    assert not log.reached(6.0)
    metrics.close()
    # Resumed from a checkpoint at 200 frames: the rows up to there count, the later one not.
    metrics = MetricsWriter(tmp_path, tensorboard=False)
    resumed = ProgressLog(log.config, metrics, book, Stopwatch(), lambda: 0, frames=200)
    assert resumed.reached(6.0) and resumed.recent.episodes == 100
    metrics.close()
