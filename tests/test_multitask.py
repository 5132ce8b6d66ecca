"""Multi-task Atari: the atari57 suite and lists of games in --level_name, the shared
18-action set, per-game training metrics, and --mode=test's per-game table with the
median human-normalised score. Real games, real processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from impala import atari57, checkpoint, dmlab30, envs
from impala.actor import make_stepper
from impala.config import Config, ConfigError
from impala.learner import env_spec
from impala.metrics import read_jsonl
from impala.progress import configured_levels
from tests import cli

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
# Games whose lives (training episodes) and whole games (--mode=test) are short under
# a near-uniform policy: tens to hundreds of agent steps.
GAMES = ("ALE/Breakout-v5", "ALE/Qbert-v5", "ALE/Asterix-v5")
LIST = ",".join(GAMES)
TINY = [
    f"--level_name={LIST}",
    "--network=shallow",
    "--use_lstm=false",
    "--num_action_repeats=4",
]


def test_suite_and_list_names():
    assert envs.levels("atari57") == atari57.LEVELS and len(atari57.LEVELS) == 57
    assert atari57.LEVELS[:3] == ("ALE/Alien-v5", "ALE/Amidar-v5", "ALE/Assault-v5")
    assert envs.resolve_level("atari57") == "atari"  # every id registered by the installed ale-py
    assert envs.levels(LIST) == GAMES
    assert envs.levels(" ALE/Pong-v5 ,ALE/Boxing-v5") == ("ALE/Pong-v5", "ALE/Boxing-v5")
    assert envs.resolve_level(LIST) == "atari" and envs.is_multitask(LIST)
    # Single levels and dmlab30 are as before.
    assert envs.levels("ALE/Pong-v5") == ("ALE/Pong-v5",) and not envs.is_multitask("ALE/Pong-v5")
    assert envs.levels("dmlab30") == dmlab30.TRAIN_LEVELS
    # A list of DeepMind Lab levels is one family too.
    assert envs.resolve_level("rooms_watermaze,dmlab:seekavoid_arena_01") == "dmlab"
    # The metrics' and the receiver's configured levels cover all n levels, not 30.
    assert configured_levels("atari57") == atari57.LEVELS
    assert configured_levels(LIST) == GAMES


def test_level_for_task_round_robin():
    assert [envs.level_for_task(LIST, task) for task in range(7)] == [GAMES[t % 3] for t in range(7)]
    assert [envs.level_for_task("atari57", task) for task in (0, 56, 57, 60)] == [
        "ALE/Alien-v5",
        "ALE/Zaxxon-v5",
        "ALE/Alien-v5",
        "ALE/Asterix-v5",  # 60 mod 57 = 3: Alien, Amidar, Assault, Asterix
    ]
    assert envs.level_for_task("ALE/Pong-v5", 5) == "ALE/Pong-v5"


@pytest.mark.parametrize(
    "level_name, error, expected",
    [
        ("ALE/Pong-v5,ALE/Breakout-v5,", ConfigError, "empty entry"),
        ("atari57,ALE/Pong-v5", ConfigError, "a suite (atari57) cannot be part of a list"),
        ("ALE/Pong-v5,dmlab30", ConfigError, "a suite (dmlab30) cannot be part of a list"),
        ("ALE/Pong-v5,rooms_watermaze", ConfigError, "mixes Atari (ALE/Pong-v5) and DeepMind Lab (rooms_watermaze)"),
        ("CartPole-v1,Acrobot-v1", ConfigError, "CartPole-v1 is a gymnasium level"),
        ("Pong,ALE/Breakout-v5", envs.UnknownLevelError, "did you mean ALE/Pong-v5?"),  # short names: a hint
        ("atari56", envs.UnknownLevelError, "did you mean atari57"),
    ],
)
def test_lists_that_cannot_be_one_run(level_name, error, expected):
    with pytest.raises(error) as e:
        envs.resolve_level(level_name)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "level_name, expected",
    [
        ("ALE/Pongg-v5,ALE/Breakout-v5", "unknown level 'ALE/Pongg-v5'; did you mean ALE/Pong-v5"),
        ("ALE/Pong-v5,CartPole-v1", "mixes Atari (ALE/Pong-v5) and gymnasium (CartPole-v1) levels"),
        ("ALE/Pong-v5,ALE/Breakout-v5,ALE/Pong-v5", "lists ALE/Pong-v5 twice"),
    ],
)
def test_bad_lists_are_one_line_errors_of_the_program(level_name, expected, tmp_path):
    result = subprocess.run(
        cli.command(f"--level_name={level_name}", f"--logdir={tmp_path}"),
        cwd=cli.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize("full_action_space", [False, True])
def test_multi_game_atari_uses_the_full_action_space(full_action_space):
    # --full_action_space=false (the default) cannot take a multi-game run off the 18 actions.
    config = Config(level_name=LIST, network="shallow", use_lstm=False, full_action_space=full_action_space)
    assert envs.options(config)["full_action_space"] is True
    assert env_spec(config).num_actions == 18  # the learner's network
    assert env_spec(config).observation_shape == (4, 84, 84)
    for task, game in enumerate(GAMES):  # each actor's environments, in the actor and in env workers
        for workers in (0, 1):
            level = envs.level_for_task(LIST, task)
            stepper = make_stepper(config.replace(env_workers_per_actor=workers), level, seed=task)
            try:
                assert level == game and stepper.spec.num_actions == 18
                assert stepper.spec.observation_shape == (4, 84, 84)
            finally:
                stepper.close()
    # A single game keeps its minimal action set (Breakout: 4 actions) unless asked.
    single = Config(level_name="ALE/Breakout-v5", full_action_space=full_action_space)
    assert env_spec(single).num_actions == (18 if full_action_space else 4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A short real run on the three games: one actor per game."""
    logdir = tmp_path_factory.mktemp("multitask")
    result = cli.run(
        *TINY,
        "--num_actors=3",
        "--num_envs_per_actor=1",
        "--unroll_length=5",
        "--batch_size=2",
        "--total_environment_frames=6000",
        "--log_interval_s=1",
        f"--logdir={logdir}",
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    return logdir, result


def atari_reference(game: str) -> tuple[float, float]:
    """(random, human) of a game, from the shared reference table where it is here."""
    path = SHARED / "atari57.json"
    if path.exists():
        entry = json.loads(path.read_text())["games"][game]
        return entry["random"], entry["human"]
    return atari57.ATARI57[game]


def by_hand(level: str, mean_return: float) -> float:
    random, human = atari_reference(atari57.game(level))
    return 100 * (mean_return - random) / (human - random)


def test_per_game_training_metrics(trained):
    logdir, _ = trained
    rows = read_jsonl(logdir / "metrics.jsonl")
    for game in GAMES:  # every game's actor sent episodes
        assert any(f"mean_episode_return/{game}" in row for row in rows), game
        assert any(f"episodes/{game}" in row for row in rows), game
    scored = [row for row in rows if "atari/training_median_hns" in row]
    assert scored, "no row with the per-game training scores"
    for row in scored:
        per_game = [row[f"atari/training_hns/{game}"] for game in GAMES]
        assert row["atari/training_median_hns"] == pytest.approx(np.median(per_game))
        assert row["atari/training_mean_hns"] == pytest.approx(np.mean(per_game))
    # The first scores are of the episodes up to then: each game's mean return, normalised.
    first = rows.index(scored[0])
    for game in GAMES:
        returns = [
            (row[f"mean_episode_return/{game}"], row[f"episodes/{game}"])
            for row in rows[: first + 1]
            if f"episodes/{game}" in row
        ]
        mean_return = sum(r * n for r, n in returns) / sum(n for _, n in returns)
        assert scored[0][f"atari/training_hns/{game}"] == pytest.approx(by_hand(game, mean_return))
    # The network the run trained has one policy output per action of the full set.
    state = checkpoint.load(checkpoint.latest(logdir))
    assert state["model"]["policy.weight"].shape[0] == 18


def test_test_mode_plays_each_game_and_reports_the_median(trained):
    logdir, _ = trained
    result = subprocess.run(
        cli.command("--mode=test", *TINY, "--test_num_episodes=1", f"--logdir={logdir}"),
        cwd=cli.ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((logdir / "test_results.json").read_text())
    assert [r["level"] for r in results["levels"]] == list(GAMES)
    per_game = []
    for r in results["levels"]:
        assert len(r["episode_returns"]) == 1
        assert r["human_normalized_score"] == pytest.approx(by_hand(r["level"], r["episode_returns"][0]))
        per_game.append(r["human_normalized_score"])
    assert results["median_human_normalized_score"] == pytest.approx(np.median(per_game))
    assert results["mean_human_normalized_score"] == pytest.approx(np.mean(per_game))
    lines = result.stdout.splitlines()
    for game, score in zip(GAMES, per_game):
        assert any(line.startswith(f"{game} ") and f"{score:.1f}%" in line for line in lines), game
    assert lines[-1].split() == ["median", f"{np.median(per_game):.1f}%"]
    assert lines[-2].split()[:2] == ["mean", f"{np.mean(per_game):.1f}%"]
