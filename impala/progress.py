"""The progress log: every --log_interval_s, one progress line, one metrics.jsonl
row and TensorBoard scalars, from the training thread's updates and the actor
book's report (impala/receiver.py).

What a row holds, beyond the losses and rates:
  - V-trace diagnostics averaged over the row's updates (`vtrace/...`, see
    losses.vtrace_diagnostics) and the updates skipped for a non-finite loss or
    gradient (`skipped_updates`);
  - with experience replay (--replay_proportion, impala/replay.py), the replayed
    updates applied (`replay_updates`); the losses and diagnostics above are the fresh
    updates' (comparable with runs without replay), the replayed ones' go under
    `replay/...` (`replay/vtrace/mean_rho`: how far the replayed data is off-policy);
  - finished episodes: their mean return and length in frames, per level for
    multi-level runs (only the configured levels get keys, so a row stays bounded);
    TensorBoard also gets every episode, as the original logged them
    (`<level>/episode_return` and `<level>/episode_frames` at the current frames);
  - for DMLab-30 runs the training human-normalised score, uncapped and capped at
    100 per level (`dmlab30/training_no_cap`, `dmlab30/training_cap_100`, the
    original's names), whenever every level has finished an episode since the last
    one (the original's rule);
  - for multi-task Atari runs (atari57, a list of games), by the same rule, each
    game's human-normalised score of its mean return over the episodes since the
    last one (`atari/training_hns/<level>`, percent) and their median and mean
    (`atari/training_median_hns`, `atari/training_mean_hns`), over the games with
    Atari-57 reference scores. Training episodes end at a lost life
    (impala/envs/atari.py), so on games with lives these read below the whole-game
    scores --mode=test reports;
  - TensorBoard: a histogram of the actions taken (`actions`);
  - unroll rates per actor (`actor_unrolls_per_s/<task>`) for at most
    MAX_ACTOR_KEYS actors, the lowest task numbers; `connected_actors` counts all.
    With the receiver's bounds (task numbers below --max_actors, only configured
    levels) a row's size is bounded whatever the peers send.

Owned by the training thread; it reads the actor book only through take_report().
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import numpy as np
from absl import logging

from impala import dmlab30, envs, scores
from impala.config import Config
from impala.metrics import EpisodeWindow, MetricsWriter, Stopwatch, read_jsonl
from impala.receiver import ActorBook, Report

MAX_ACTOR_KEYS = 256  # per-actor keys in one metrics row
RECENT_EPISODES = 100  # the progress line's "last 100" and --stop_at_return's window


def configured_levels(level_name: str) -> tuple[str, ...]:
    """The levels a run's actors play: one, or a suite's or list's (envs.levels)."""
    return tuple(dict.fromkeys(envs.levels(level_name)))


def atari_training_scores(level_returns: dict[str, list[float]]) -> dict[str, float]:
    """`atari/training_hns/<level>` for each game with returns and reference scores (of
    its mean return), and their median and mean; {} if there is no such game."""
    per_game = {}
    for level, returns in level_returns.items():
        reference = scores.reference_scores(level)
        if reference is not None and returns:
            per_game[level] = scores.human_normalized_score(float(np.mean(returns)), reference.random, reference.human)
    if not per_game:
        return {}
    row = {f"atari/training_hns/{level}": score for level, score in per_game.items()}
    row["atari/training_median_hns"] = float(np.median(list(per_game.values())))
    row["atari/training_mean_hns"] = float(np.mean(list(per_game.values())))
    return row


class ProgressLog:
    def __init__(
        self,
        config: Config,
        metrics: MetricsWriter,
        book: ActorBook,
        watch: Stopwatch,
        refused_connections: Callable[[], int],
        frames: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config, self.metrics, self.book, self.watch = config, metrics, book, watch
        self.refused_connections = refused_connections
        self.clock = clock
        self.levels = configured_levels(config.level_name)
        self.dmlab30 = config.level_name == dmlab30.SUITE_NAME
        self.atari = len(self.levels) > 1 and envs.resolve_level(config.level_name) == "atari"
        self.level_returns: dict[str, list[float]] = {level: [] for level in self.levels}
        # The last 100 episodes' mean, as scripts/run_summary.py counts it; a resumed run
        # starts from its metrics rows up to the checkpoint (the learner dropped later ones).
        self.recent = EpisodeWindow(RECENT_EPISODES)
        if frames > 0 and metrics.path.exists():
            for row in read_jsonl(metrics.path):
                if row["frames"] <= frames and row.get("mean_episode_return") is not None:
                    self.recent.add(row["mean_episode_return"], row.get("episodes") or 0)
        self.last_time, self.last_frames = clock(), frames
        self.sums: dict[str, float] = collections.defaultdict(float)
        self.replay_sums: dict[str, float] = collections.defaultdict(float)
        self.updates = 0
        self.replay_updates = 0
        self.skipped = 0

    def add_update(self, stats: dict[str, float], replayed: bool = False) -> None:
        """Adds one learn_step's stats (of a replayed batch: kept apart); a skipped
        update is only counted."""
        if stats.get("skipped"):
            self.skipped += 1
            return
        sums = self.replay_sums if replayed else self.sums
        for key, value in stats.items():
            if key != "skipped":
                sums[key] += value
        if replayed:
            self.replay_updates += 1
        else:
            self.updates += 1

    def maybe_write(self, frames: int, param_version: int, learning_rate: float, force: bool = False) -> dict | None:
        """Writes a row if the log interval has passed (or `force` and there is
        something new); returns it."""
        now = self.clock()
        if not force and now - self.last_time < self.config.log_interval_s:
            return None
        if force and frames == self.last_frames:
            return None  # nothing new since the last row
        report = self.book.take_report()
        row = self._row(report, frames, param_version, learning_rate, max(now - self.last_time, 1e-9))
        self.metrics.write(row)
        self._tensorboard(report, frames)
        self._print(row, report)
        self.sums.clear()
        self.replay_sums.clear()
        self.updates = self.replay_updates = self.skipped = 0
        self.last_time, self.last_frames = now, frames
        return row

    def reached(self, goal: float | None) -> bool:
        """Whether the mean return of the last RECENT_EPISODES episodes is at least
        `goal` (--stop_at_return); never before that many episodes, or without a goal."""
        return goal is not None and self.recent.full and self.recent.mean >= goal

    def _row(self, report: Report, frames: int, param_version: int, learning_rate: float, elapsed: float) -> dict:
        config, episodes = self.config, report.episodes
        fps = (frames - self.last_frames) / elapsed
        returns = [e.episode_return for e in episodes]
        row = {
            "frames": frames,
            "param_version": param_version,
            "fps": round(fps, 1),
            "sps": round(fps / config.num_action_repeats, 1),
            "mean_episode_return": float(np.mean(returns)) if episodes else None,
            "mean_episode_length": float(np.mean([e.frames for e in episodes])) / config.num_action_repeats
            if episodes
            else None,
            "mean_episode_frames": float(np.mean([e.frames for e in episodes])) if episodes else None,
            "episodes": len(episodes),
            "policy_lag": float(np.mean(report.lags)) if report.lags else None,
            "learning_rate": learning_rate,
            "connected_actors": len(report.unroll_rates),
            "refused_connections": self.refused_connections(),
            "bad_messages": report.bad_messages,
            "skipped_updates": self.skipped,
            "wall_time": time.time(),
        }
        if returns:
            self.recent.add(row["mean_episode_return"], len(returns))
        row.update({k: v / max(self.updates, 1) for k, v in self.sums.items()})
        if config.replay_proportion > 0:
            row["replay_updates"] = self.replay_updates
            row.update({f"replay/{k}": v / self.replay_updates for k, v in self.replay_sums.items()})
        row.update(
            {
                f"actor_unrolls_per_s/{task}": round(rate, 2)
                for task, rate in sorted(report.unroll_rates.items())[:MAX_ACTOR_KEYS]
            }
        )
        # Seconds spent per second of wall time, summed over threads and actors.
        row.update({f"time/{part}": round(s / elapsed, 4) for part, s in sorted(self.watch.take().items())})
        by_level: dict[str, list] = {}
        for e in episodes:
            if e.level in self.level_returns:
                by_level.setdefault(e.level, []).append(e)
                if self.dmlab30 or self.atari:  # only suite scores read them: others would grow forever
                    self.level_returns[e.level].append(e.episode_return)
        if len(self.levels) > 1:  # multi-level runs
            for level, done in sorted(by_level.items()):
                row[f"mean_episode_return/{level}"] = float(np.mean([e.episode_return for e in done]))
                row[f"mean_episode_frames/{level}"] = float(np.mean([e.frames for e in done]))
                row[f"episodes/{level}"] = len(done)
        if self.dmlab30 and all(self.level_returns.values()):
            row["dmlab30/training_no_cap"] = dmlab30.compute_human_normalized_score(self.level_returns, None)
            row["dmlab30/training_cap_100"] = dmlab30.compute_human_normalized_score(self.level_returns, 100)
            self.level_returns = {level: [] for level in self.levels}
        if self.atari and all(self.level_returns.values()):
            row.update(atari_training_scores(self.level_returns))
            self.level_returns = {level: [] for level in self.levels}
        return row

    def _tensorboard(self, report: Report, frames: int) -> None:
        for e in report.episodes:
            if e.level in self.level_returns:
                self.metrics.scalar(f"{e.level}/episode_return", e.episode_return, frames)
                self.metrics.scalar(f"{e.level}/episode_frames", e.frames, frames)
        self.metrics.histogram_of_counts("actions", report.action_counts, frames)

    def _print(self, row: dict, report: Report) -> None:
        rates, episodes = report.unroll_rates, report.episodes
        skipped = f" | {row['skipped_updates']} updates skipped (non-finite)" if row["skipped_updates"] else ""
        logging.info(
            "frames %s | %s frames/s (%s agent steps/s) | return %s (%d episodes; last %d: %s) | loss %.3g "
            "(pg %.3g, baseline %.3g, entropy %.3g) | lag %s | actors %d (%s unrolls/s each)%s",
            f"{row['frames']:,}",
            f"{row['fps']:,.0f}",
            f"{row['sps']:,.0f}",
            f"{row['mean_episode_return']:.1f}" if episodes else "-",
            len(episodes),
            RECENT_EPISODES,
            f"{self.recent.mean:.1f}" if self.recent.mean is not None else "-",
            row.get("total_loss", float("nan")),
            row.get("pg_loss", float("nan")),
            row.get("baseline_loss", float("nan")),
            row.get("entropy_loss", float("nan")),
            f"{row['policy_lag']:.1f}" if report.lags else "-",
            len(rates),
            f"{min(rates.values()):.1f}-{max(rates.values()):.1f}" if rates else "-",
            skipped,
        )
