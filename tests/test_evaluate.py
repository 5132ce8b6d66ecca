"""--mode=test: the latest checkpoint played on each level, results and scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from impala import checkpoint, dmlab30, envs, evaluate
from impala.checkpoint import network_signature
from impala.config import Config
from impala.nets import make_agent
from tests import cli

TESTS = Path(__file__).resolve().parent  # holds the deepmind_lab stand-in package
SHARED = TESTS.parent.parent / "shared" / "reference"
DMLAB_FLAGS = ["--network=shallow", "--width=32", "--height=24", "--lstm_size=16", "--num_action_repeats=4"]
PONG_FLAGS = ["--network=shallow", "--use_lstm=false", "--num_action_repeats=4"]
CARTPOLE = dict(level_name="CartPole-v1", num_action_repeats=1, network="mlp", use_lstm=False, mlp_sizes="16")


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    sys.modules.pop("deepmind_lab", None)
    yield
    sys.modules.pop("deepmind_lab", None)


def fresh_checkpoint(config: Config, seed: int = 0) -> Path:
    """A freshly initialised network for `config`, saved as a training run would."""
    torch.manual_seed(seed)
    env = envs.make(config.level_name, seed=1, num_action_repeats=config.num_action_repeats, **envs.options(config))
    agent = make_agent(config, env.observation_shape, env.num_actions, envs.instruction_length(env))
    env.close()
    state = {
        "model": agent.state_dict(),
        "frames": 0,
        "param_version": 0,
        "signature": network_signature(config, agent),
        "level_name": config.level_name,
    }
    return checkpoint.save(config.logdir, state, frames=0)


def run_test_mode(*flags: str, stand_in: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if stand_in:
        env["PYTHONPATH"] = str(TESTS) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(
        cli.command("--mode=test", *flags), cwd=cli.ROOT, capture_output=True, text=True, timeout=240, env=env
    )


def dmlab30_reference() -> dict[str, tuple[float, float]]:
    """Test level -> (human, random), from the shared reference table (the project's
    own copy only where the shared one is missing; test_scores.py compares the two)."""
    path = SHARED / "dmlab30.json"
    if path.exists():
        return {level["test"]: (level["human"], level["random"]) for level in json.loads(path.read_text())["levels"]}
    return {level.test: (level.human, level.random) for level in dmlab30.LEVELS}


def pong_reference() -> tuple[float, float]:
    """(random, human) of Pong, as dmlab30_reference does."""
    path = SHARED / "atari57.json"
    if path.exists():
        pong = json.loads(path.read_text())["games"]["pong"]
        return pong["random"], pong["human"]
    return (-20.7, 14.6)


def test_dmlab30_test_mode_scores_all_30_levels(tmp_path, stand_in):
    import deepmind_lab  # the stand-in: its rules tell which returns each level can give

    config = Config(level_name="dmlab30", network="shallow", width=32, height=24, lstm_size=16, logdir=str(tmp_path))
    fresh_checkpoint(config)
    result = run_test_mode(
        "--level_name=dmlab30", *DMLAB_FLAGS, "--test_num_episodes=2", f"--logdir={tmp_path}", stand_in=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "test_results.json").read_text())
    assert [r["level"] for r in results["levels"]] == list(dmlab30.TEST_LEVELS)

    table = dmlab30_reference()
    uncapped, capped = [], []
    for r in results["levels"]:
        assert set(r) == {
            "level",
            "episode_returns",
            "mean_return",
            "human_normalized_score",
            "human_normalized_score_capped",
        }
        returns = r["episode_returns"]
        assert len(returns) == 2 and r["mean_return"] == pytest.approx(np.mean(returns))
        path = "contributed/dmlab30/" + r["level"]  # returns that only this level's rules give
        per_step = 4 * deepmind_lab.reward_per_frame(path)
        for value in returns:
            assert 0 <= value <= deepmind_lab.episode_frames(path) * deepmind_lab.reward_per_frame(path)
            assert value % per_step == 0
        human, random = table[r["level"]]
        by_hand = 100 * (np.mean(returns) - random) / (human - random)
        assert r["human_normalized_score"] == pytest.approx(by_hand)
        assert r["human_normalized_score_capped"] == pytest.approx(min(by_hand, 100))
        uncapped.append(by_hand)
        capped.append(min(by_hand, 100))
    assert set(results) == {
        "levels",
        "mean_human_normalized_score",
        "mean_human_normalized_score_capped",
        "median_human_normalized_score",
    }
    assert results["mean_human_normalized_score"] == pytest.approx(np.mean(uncapped))
    assert results["mean_human_normalized_score_capped"] == pytest.approx(np.mean(capped))
    assert results["median_human_normalized_score"] == pytest.approx(np.median(uncapped))
    # Progress across levels, then the table on stdout.
    assert "Level 1/30 rooms_collect_good_objects_test: episode 1/2" in result.stderr
    assert "Level 30/30 explore_object_rewards_many: mean return" in result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("rooms_collect_good_objects_test ") for line in lines)
    assert lines[-2].startswith("mean ") and f"{np.mean(uncapped):.1f}%" in lines[-2]
    assert lines[-1].startswith("median ") and f"{np.median(uncapped):.1f}%" in lines[-1]


def test_pong_test_mode_reports_the_atari_score(tmp_path):
    config = Config(level_name="ALE/Pong-v5", network="shallow", use_lstm=False, logdir=str(tmp_path))
    fresh_checkpoint(config)
    result = run_test_mode("--level_name=ALE/Pong-v5", *PONG_FLAGS, "--test_num_episodes=1", f"--logdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "test_results.json").read_text())
    [pong] = results["levels"]
    assert pong["level"] == "ALE/Pong-v5" and len(pong["episode_returns"]) == 1
    value = pong["episode_returns"][0]
    assert -21 <= value <= 21 and value == int(value)  # one whole game of Pong
    random, human = pong_reference()
    by_hand = 100 * (value - random) / (human - random)
    assert pong["human_normalized_score"] == pytest.approx(by_hand)
    assert pong["human_normalized_score_capped"] == pytest.approx(min(by_hand, 100))
    assert results["mean_human_normalized_score"] == pytest.approx(by_hand)
    assert results["mean_human_normalized_score_capped"] == pytest.approx(min(by_hand, 100))
    assert results["median_human_normalized_score"] == pytest.approx(by_hand)


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_test_mode("--level_name=CartPole-v1", f"--logdir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "no checkpoint" in result.stderr and str(tmp_path) in result.stderr
    assert not (tmp_path / "test_results.json").exists()


def test_cartpole_test_mode_in_process(tmp_path, capsys):
    config = Config(**CARTPOLE, logdir=str(tmp_path), test_num_episodes=3, seed=5)
    fresh_checkpoint(config)
    results = evaluate.run(config)
    assert json.loads((tmp_path / "test_results.json").read_text()) == results
    [cartpole] = results["levels"]
    assert set(results) == {"levels"}  # no reference scores for CartPole
    assert set(cartpole) == {"level", "episode_returns", "mean_return"}
    assert len(cartpole["episode_returns"]) == 3 and all(r >= 1 for r in cartpole["episode_returns"])
    assert "CartPole-v1" in capsys.readouterr().out
    assert evaluate.run(config) == results  # the same checkpoint and seed: the same episodes


def test_the_latest_checkpoint_must_fit_the_flags(tmp_path):
    fresh_checkpoint(Config(**CARTPOLE, logdir=str(tmp_path)))
    with pytest.raises(checkpoint.CheckpointError, match="different network") as e:
        evaluate.evaluate(Config(**{**CARTPOLE, "mlp_sizes": "32"}, logdir=str(tmp_path)))
    assert "\n" not in str(e.value)


def test_play_counts_whole_episodes():
    config = Config(**CARTPOLE)
    env = envs.make("CartPole-v1", seed=3, num_action_repeats=1)
    agent = make_agent(config, env.observation_shape, env.num_actions)
    seen = []
    returns = evaluate.play(agent, env, 4, lambda k, r, n: seen.append((k, r, n)))
    env.close()
    assert len(returns) == 4 and [k for k, _, _ in seen] == [1, 2, 3, 4]
    assert returns == [r for _, r, _ in seen] and all(r == n for _, r, n in seen)  # CartPole: 1 per step


def test_test_levels():
    assert evaluate.test_levels("dmlab30") == list(dmlab30.TEST_LEVELS)
    assert evaluate.test_levels("rooms_collect_good_objects_train") == ["rooms_collect_good_objects_train"]
    assert evaluate.test_levels("ALE/Pong-v5") == ["ALE/Pong-v5"]
    assert evaluate.test_levels("ALE/Pong-v5, ALE/Breakout-v5") == ["ALE/Pong-v5", "ALE/Breakout-v5"]
    assert evaluate.test_levels("atari57")[:2] == ["ALE/Alien-v5", "ALE/Amidar-v5"]
    assert len(evaluate.test_levels("atari57")) == 57


def test_format_table():
    results = {
        "levels": [
            {
                "level": "a",
                "episode_returns": [1.0],
                "mean_return": 1.0,
                "human_normalized_score": 50.0,
                "human_normalized_score_capped": 50.0,
            },
            {
                "level": "rooms_watermaze",
                "episode_returns": [2.0, 4.0],
                "mean_return": 3.0,
                "human_normalized_score": 150.0,
                "human_normalized_score_capped": 100.0,
            },
        ],
        "mean_human_normalized_score": 100.0,
        "mean_human_normalized_score_capped": 75.0,
        "median_human_normalized_score": 100.0,
    }
    lines = evaluate.format_table(results).splitlines()
    assert lines[0].split() == ["level", "episodes", "mean", "return", "human-normalised", "capped"]
    assert lines[3].split() == ["rooms_watermaze", "2", "3.00", "150.0%", "100.0%"]
    assert lines[-2].split() == ["mean", "100.0%", "75.0%"]
    assert lines[-1].split() == ["median", "100.0%"]
