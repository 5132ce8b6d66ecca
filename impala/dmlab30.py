"""DMLab-30: the 30 DeepMind Lab levels of the IMPALA paper, with their reference scores.

Each level has a training name and a test name (the same for 28 of them; the two
`rooms_*_train` levels have held-out `*_test` variants with unseen objects). Full
DeepMind Lab level paths are `contributed/dmlab30/<name>`. Human and random scores
are keyed by the test name; returns on a training level count toward its test level.

Source: google-deepmind/scalable_agent, dmlab30.py (the level mapping and the human
and random scores used for the paper's DMLab-30 human-normalised scores), as
collected in the project's reference table `shared/reference/dmlab30.json`. This
module is the project's own copy; nothing reads the shared table at run time.

The human-normalised score of a level is 100 * (mean return - random) / (human -
random), in percent; the suite score is its mean over the 30 levels, optionally
with each level capped at 100 first (see impala/scores.py for the generic parts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

LEVEL_PREFIX = "contributed/dmlab30/"
SUITE_NAME = "dmlab30"


class Level(NamedTuple):
    train: str
    test: str
    human: float
    random: float
    language: bool = False


# In the original's order: actor i trains on LEVELS[i % 30].
LEVELS: tuple[Level, ...] = (
    Level("rooms_collect_good_objects_train", "rooms_collect_good_objects_test", human=10.0, random=0.073),
    Level("rooms_exploit_deferred_effects_train", "rooms_exploit_deferred_effects_test", human=85.65, random=8.501),
    Level("rooms_select_nonmatching_object", "rooms_select_nonmatching_object", human=65.9, random=0.312),
    Level("rooms_watermaze", "rooms_watermaze", human=54.0, random=4.065),
    Level("rooms_keys_doors_puzzle", "rooms_keys_doors_puzzle", human=53.8, random=4.135),
    Level(
        "language_select_described_object", "language_select_described_object", human=389.5, random=-0.07, language=True
    ),
    Level("language_select_located_object", "language_select_located_object", human=280.7, random=1.929, language=True),
    Level("language_execute_random_task", "language_execute_random_task", human=254.05, random=-5.913, language=True),
    Level(
        "language_answer_quantitative_question",
        "language_answer_quantitative_question",
        human=184.5,
        random=-0.33,
        language=True,
    ),
    Level("lasertag_one_opponent_small", "lasertag_one_opponent_small", human=12.65, random=-0.224),
    Level("lasertag_three_opponents_small", "lasertag_three_opponents_small", human=18.55, random=-0.214),
    Level("lasertag_one_opponent_large", "lasertag_one_opponent_large", human=18.6, random=-0.083),
    Level("lasertag_three_opponents_large", "lasertag_three_opponents_large", human=31.5, random=-0.102),
    Level("natlab_fixed_large_map", "natlab_fixed_large_map", human=36.9, random=2.173),
    Level("natlab_varying_map_regrowth", "natlab_varying_map_regrowth", human=24.45, random=2.989),
    Level("natlab_varying_map_randomized", "natlab_varying_map_randomized", human=42.35, random=7.346),
    Level("skymaze_irreversible_path_hard", "skymaze_irreversible_path_hard", human=100.0, random=0.1),
    Level("skymaze_irreversible_path_varied", "skymaze_irreversible_path_varied", human=100.0, random=14.4),
    Level("psychlab_arbitrary_visuomotor_mapping", "psychlab_arbitrary_visuomotor_mapping", human=58.75, random=0.163),
    Level("psychlab_continuous_recognition", "psychlab_continuous_recognition", human=58.3, random=0.224),
    Level("psychlab_sequential_comparison", "psychlab_sequential_comparison", human=39.5, random=0.129),
    Level("psychlab_visual_search", "psychlab_visual_search", human=78.5, random=0.085),
    Level("explore_object_locations_small", "explore_object_locations_small", human=74.45, random=3.575),
    Level("explore_object_locations_large", "explore_object_locations_large", human=65.65, random=4.673),
    Level("explore_obstructed_goals_small", "explore_obstructed_goals_small", human=206.0, random=6.76),
    Level("explore_obstructed_goals_large", "explore_obstructed_goals_large", human=119.5, random=2.61),
    Level("explore_goal_locations_small", "explore_goal_locations_small", human=267.5, random=7.66),
    Level("explore_goal_locations_large", "explore_goal_locations_large", human=194.5, random=3.14),
    Level("explore_object_rewards_few", "explore_object_rewards_few", human=77.7, random=2.073),
    Level("explore_object_rewards_many", "explore_object_rewards_many", human=106.7, random=2.438),
)

TRAIN_LEVELS: tuple[str, ...] = tuple(level.train for level in LEVELS)
TEST_LEVELS: tuple[str, ...] = tuple(level.test for level in LEVELS)
ALL_LEVELS: frozenset[str] = frozenset(TRAIN_LEVELS + TEST_LEVELS)
LEVEL_MAPPING: dict[str, str] = {level.train: level.test for level in LEVELS}  # train -> test
LANGUAGE_LEVELS: frozenset[str] = frozenset(
    name for level in LEVELS if level.language for name in (level.train, level.test)
)
HUMAN_SCORES: dict[str, float] = {level.test: level.human for level in LEVELS}
RANDOM_SCORES: dict[str, float] = {level.test: level.random for level in LEVELS}


def short_name(level_name: str) -> str:
    """'contributed/dmlab30/x' -> "x"; other names unchanged."""
    return level_name[len(LEVEL_PREFIX) :] if level_name.startswith(LEVEL_PREFIX) else level_name


def test_name(level_name: str) -> str | None:
    """The test level whose score a DMLab-30 level's returns count toward (None if the
    name is not a DMLab-30 level; a 'contributed/dmlab30/' prefix is accepted)."""
    name = short_name(level_name)
    if name in LEVEL_MAPPING:
        return LEVEL_MAPPING[name]
    return name if name in HUMAN_SCORES else None


def human_normalized_score(level_name: str, returns: Sequence[float], per_level_cap: float | None = None) -> float:
    """100 * (mean(returns) - random) / (human - random) for one DMLab-30 level."""
    name = test_name(level_name)
    if name is None:
        raise KeyError(f"{level_name!r} is not a DMLab-30 level")
    if len(returns) == 0:
        raise ValueError(f"no returns for level {level_name!r}")
    human, random = HUMAN_SCORES[name], RANDOM_SCORES[name]
    score = 100.0 * (float(np.mean(returns)) - random) / (human - random)
    return min(score, per_level_cap) if per_level_cap is not None else score


def compute_human_normalized_score(level_returns: Mapping[str, Sequence[float]], per_level_cap: float | None) -> float:
    """Mean human-normalised score over the 30 levels, as the original computes it:
    training names count as their test names, every test level must have returns,
    and each level is capped at `per_level_cap` (None: uncapped) before averaging."""
    by_test: dict[str, list[float]] = {}
    for level_name, returns in level_returns.items():
        name = test_name(level_name)
        if name is not None:
            by_test.setdefault(name, []).extend(float(r) for r in returns)
    missing = [name for name in TEST_LEVELS if not by_test.get(name)]
    if missing:
        raise ValueError(f"no returns for DMLab-30 levels {missing}")
    return float(np.mean([human_normalized_score(name, by_test[name], per_level_cap) for name in TEST_LEVELS]))
