"""Human-normalised scores, and the reference scores of the levels that have them.

    human_normalized_score = 100 * (mean return - random) / (human - random)   [percent]

Levels with reference scores:
  - the DMLab-30 levels (impala/dmlab30.py; a training level counts toward its test
    level), named as impala runs them: `rooms_watermaze`, `dmlab:rooms_watermaze`,
    `dmlab:contributed/dmlab30/rooms_watermaze`;
  - the Atari-57 games (impala/atari57.py, with the table's source), as ALE ids:
    `ALE/Pong-v5` (any version), and the legacy `PongNoFrameskip-v4`, `Pong-v4`,
    `PongDeterministic-v4` (and their `-ram` forms).

Over several levels (a suite, a list) the summary gives the mean and the median of
the levels' scores; the median is the figure DeepMind's Atari papers report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from impala import atari57, dmlab30

# scores.atari_game is atari57.game (kept for its callers).
atari_game = atari57.game

CAP = 100.0  # the "capped" variants cap each level at 100 (human level) before averaging


class ReferenceScores(NamedTuple):
    key: str  # the reference table's name for the level
    random: float
    human: float


def human_normalized_score(mean_return: float, random: float, human: float) -> float:
    """100 * (mean_return - random) / (human - random), in percent."""
    if human == random:
        raise ValueError("human and random reference scores are equal")
    return 100.0 * (float(mean_return) - random) / (human - random)


def capped(score: float, cap: float = CAP) -> float:
    return min(float(score), cap)


def reference_scores(level_name: str) -> ReferenceScores | None:
    """Random and human scores for a level name, or None if it has none."""
    name = level_name[len("dmlab:") :] if level_name.startswith("dmlab:") else level_name
    test = dmlab30.test_name(name)
    if test is not None:
        return ReferenceScores(test, dmlab30.RANDOM_SCORES[test], dmlab30.HUMAN_SCORES[test])
    game = atari57.game(level_name)
    if game is not None:
        random, human = atari57.ATARI57[game]
        return ReferenceScores(game, random, human)
    return None


def level_result(level_name: str, episode_returns: Sequence[float]) -> dict:
    """One level's entry of test_results.json: returns, their mean and, where the
    level has reference scores, its human-normalised score (uncapped and capped)."""
    returns = [float(r) for r in episode_returns]
    if not returns:
        raise ValueError(f"no episode returns for {level_name!r}")
    result = {"level": level_name, "episode_returns": returns, "mean_return": float(np.mean(returns))}
    reference = reference_scores(level_name)
    if reference is not None:
        score = human_normalized_score(result["mean_return"], reference.random, reference.human)
        result["human_normalized_score"] = score
        result["human_normalized_score_capped"] = capped(score)
    return result


def summary(level_results: Iterable[dict]) -> dict:
    """test_results.json: the levels, the mean human-normalised scores (uncapped and
    capped per level before averaging) and the median one (uncapped, as Atari papers
    report it) over the levels that have reference scores."""
    levels = list(level_results)
    out: dict = {"levels": levels}
    scored = [r for r in levels if "human_normalized_score" in r]
    if scored:
        out["mean_human_normalized_score"] = float(np.mean([r["human_normalized_score"] for r in scored]))
        out["mean_human_normalized_score_capped"] = float(np.mean([r["human_normalized_score_capped"] for r in scored]))
        out["median_human_normalized_score"] = float(np.median([r["human_normalized_score"] for r in scored]))
    return out
