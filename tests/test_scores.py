"""Human-normalised scores and the reference tables (DMLab-30, Atari-57)."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium
import numpy as np
import pytest

from impala import atari57, dmlab30, scores

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"


def _shared(name: str) -> dict:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not here")
    return json.loads(path.read_text())


def test_human_normalized_score_by_hand():
    # rooms_watermaze: human 54, random 4.065 (scalable_agent's dmlab30.py).
    assert scores.human_normalized_score(29.0325, 4.065, 54.0) == pytest.approx(50.0)
    assert scores.human_normalized_score(4.065, 4.065, 54.0) == 0.0
    assert scores.human_normalized_score(54.0, 4.065, 54.0) == pytest.approx(100.0)
    # Pong: random -20.7, human 14.6 (dqn_zoo's atari_data.py).
    assert scores.human_normalized_score(21.0, -20.7, 14.6) == pytest.approx(100 * 41.7 / 35.3)
    assert scores.capped(118.1) == 100.0 and scores.capped(-3.0) == -3.0
    with pytest.raises(ValueError):
        scores.human_normalized_score(1.0, 2.0, 2.0)


def test_dmlab30_table_is_the_reference_table():
    table = _shared("dmlab30.json")
    assert table["level_prefix"] == dmlab30.LEVEL_PREFIX
    assert len(dmlab30.LEVELS) == len(table["levels"]) == 30
    for ours, ref in zip(dmlab30.LEVELS, table["levels"]):
        assert (ours.train, ours.test, ours.language) == (ref["train"], ref["test"], ref["language"])
        assert (ours.human, ours.random) == (ref["human"], ref["random"])
        assert ref["name"] == ours.test


def test_atari57_table_is_the_reference_table():
    table = _shared("atari57.json")["games"]
    assert atari57.ATARI57 == {game: (v["random"], v["human"]) for game, v in table.items()}
    assert len(atari57.ATARI57) == 57


def test_every_atari57_game_has_its_ale_id():
    import ale_py

    gymnasium.register_envs(ale_py)
    registry = gymnasium.registry
    assert sorted(atari57.ALE_GAMES.values()) == sorted(atari57.ATARI57)
    for game, key in atari57.ALE_GAMES.items():
        assert f"ALE/{game}-v5" in registry, game
        assert scores.reference_scores(f"ALE/{game}-v5").key == key
    # The atari57 suite is those 57 ids, in the table's order.
    assert atari57.LEVELS == tuple(f"ALE/{game}-v5" for game in atari57.ALE_GAMES)
    assert [atari57.game(level) for level in atari57.LEVELS] == list(atari57.ATARI57)


@pytest.mark.parametrize(
    "level,key",
    [
        ("ALE/Pong-v5", "pong"),
        ("ALE/MsPacman-v5", "ms_pacman"),
        ("ALE/MontezumaRevenge-v5", "montezuma_revenge"),
        ("ALE/UpNDown-v5", "up_n_down"),
        ("ALE/Breakout-ram-v5", "breakout"),
        ("PongNoFrameskip-v4", "pong"),
        ("SpaceInvaders-v4", "space_invaders"),
        ("BreakoutDeterministic-v4", "breakout"),
        ("ALE/Pitfall2-v5", None),  # not the Atari-57 Pitfall
        ("ALE/Atlantis2-v5", None),
        ("ALE/Pacman-v5", None),  # not MsPacman
        ("CartPole-v1", None),
        ("rooms_watermaze", "rooms_watermaze"),
        ("rooms_collect_good_objects_train", "rooms_collect_good_objects_test"),  # counts toward its test level
        ("dmlab:rooms_exploit_deferred_effects_train", "rooms_exploit_deferred_effects_test"),
        ("dmlab:contributed/dmlab30/explore_goal_locations_small", "explore_goal_locations_small"),
        ("dmlab:seekavoid_arena_01", None),
        ("dmlab30", None),
    ],
)
def test_reference_scores_lookup(level, key):
    reference = scores.reference_scores(level)
    assert (reference.key if reference else None) == key


def test_level_result_and_summary_by_hand():
    pong = scores.level_result("ALE/Pong-v5", [-21, -19])
    assert pong["mean_return"] == -20.0
    assert pong["human_normalized_score"] == pytest.approx(100 * (-20.0 + 20.7) / (14.6 + 20.7))
    assert pong["human_normalized_score_capped"] == pong["human_normalized_score"]
    easy = scores.level_result("rooms_collect_good_objects_test", [30.0])  # far above human (10)
    assert easy["human_normalized_score"] == pytest.approx(100 * (30 - 0.073) / (10 - 0.073))
    assert easy["human_normalized_score_capped"] == 100.0
    plain = scores.level_result("CartPole-v1", [10, 20, 30])
    assert plain == {"level": "CartPole-v1", "episode_returns": [10.0, 20.0, 30.0], "mean_return": 20.0}

    out = scores.summary([pong, easy])
    assert out["levels"] == [pong, easy]
    assert out["mean_human_normalized_score"] == pytest.approx(
        (pong["human_normalized_score"] + easy["human_normalized_score"]) / 2
    )
    assert out["mean_human_normalized_score_capped"] == pytest.approx((pong["human_normalized_score"] + 100) / 2)
    assert out["median_human_normalized_score"] == pytest.approx(out["mean_human_normalized_score"])  # two levels
    assert scores.summary([plain]) == {"levels": [plain]}
    with pytest.raises(ValueError):
        scores.level_result("CartPole-v1", [])


def test_dmlab30_suite_score_as_the_original_computes_it():
    rng = np.random.default_rng(0)
    returns = {level.train: list(rng.uniform(0, 2 * level.human, size=3)) for level in dmlab30.LEVELS}
    by_hand = [
        100 * (np.mean(returns[level.train]) - level.random) / (level.human - level.random) for level in dmlab30.LEVELS
    ]
    assert dmlab30.compute_human_normalized_score(returns, None) == pytest.approx(np.mean(by_hand))
    assert dmlab30.compute_human_normalized_score(returns, 100) == pytest.approx(np.mean(np.minimum(by_hand, 100)))
    # Test names give the same; a missing level is an error, as in the original.
    as_test = {dmlab30.LEVEL_MAPPING[k]: v for k, v in returns.items()}
    assert dmlab30.compute_human_normalized_score(as_test, None) == pytest.approx(np.mean(by_hand))
    del as_test["rooms_watermaze"]
    with pytest.raises(ValueError, match="rooms_watermaze"):
        dmlab30.compute_human_normalized_score(as_test, None)
    # scores.summary over the 30 level results is the same number.
    results = [scores.level_result(level.test, returns[level.train]) for level in dmlab30.LEVELS]
    out = scores.summary(results)
    assert out["mean_human_normalized_score"] == pytest.approx(np.mean(by_hand))
    assert out["mean_human_normalized_score_capped"] == pytest.approx(np.mean(np.minimum(by_hand, 100)))


def test_dmlab30_names():
    assert len(dmlab30.TRAIN_LEVELS) == len(set(dmlab30.TRAIN_LEVELS)) == 30
    assert len(dmlab30.ALL_LEVELS) == 32  # two levels have distinct test variants
    assert dmlab30.LANGUAGE_LEVELS == {level.train for level in dmlab30.LEVELS if level.train.startswith("language_")}
    assert (
        dmlab30.test_name("contributed/dmlab30/rooms_collect_good_objects_train") == "rooms_collect_good_objects_test"
    )
    assert dmlab30.test_name("seekavoid_arena_01") is None


def test_summary_median_over_scored_levels():
    # Human-normalised 0%, 50%, 1000% (Pong: random -20.7, human 14.6), and one level without reference scores.
    results = [
        scores.level_result("ALE/Pong-v5", [-20.7]),
        scores.level_result("ALE/Pong-v5", [(-20.7 + 14.6) / 2]),
        scores.level_result("ALE/Pong-v5", [-20.7 + 10 * 35.3]),
        scores.level_result("CartPole-v1", [500.0]),
    ]
    out = scores.summary(results)
    assert out["median_human_normalized_score"] == pytest.approx(50.0)
    assert out["mean_human_normalized_score"] == pytest.approx(1050 / 3)
    assert out["mean_human_normalized_score_capped"] == pytest.approx(150 / 3)
