"""Tests for impala.envs: the StepOutput contract, level lookup, Atari setup."""

import numpy as np
import pytest

from impala import envs
from impala.envs import StepOutput, UnknownLevelError


def _balance(observation: np.ndarray) -> int:
    # Push toward the side the pole falls to; keeps CartPole up for 500 steps.
    return int(3.0 * observation[2] + observation[3] > 0)


def test_cartpole_contract_with_random_actions():
    env = envs.make("CartPole-v1", seed=0)
    assert env.num_actions == 2 and env.observation_shape == (4,)
    assert env.observation_dtype == np.float32
    rng = np.random.default_rng(0)
    first = env.initial()
    assert first == StepOutput(0.0, False, first.observation, 0.0, 0)
    assert first.observation.dtype == np.float32 and first.observation.shape == (4,)

    rewards, episodes = [], 0
    while episodes < 3:
        out = env.step(int(rng.integers(2)))
        rewards.append(out.reward)
        assert out.episode_step == len(rewards)
        assert out.episode_return == pytest.approx(sum(rewards))
        if out.done:
            episodes += 1
            # Auto reset: a fresh CartPole start state is within +-0.05.
            assert np.all(np.abs(out.observation) <= 0.05)
            rewards = []
    after = env.step(0)  # counters restarted for the new episode
    assert (after.episode_step, after.episode_return, after.done) == (1, 1.0, False)
    env.close()


def test_same_seed_same_trajectory():
    def rollout(seed):
        env = envs.make("CartPole-v1", seed=seed)
        out = [env.initial()]
        out += [env.step(i % 2) for i in range(60)]  # crosses episode ends
        return np.stack([o.observation for o in out])

    np.testing.assert_array_equal(rollout(3), rollout(3))
    assert not np.array_equal(rollout(3), rollout(4))


def test_truncation_at_500_is_an_episode_end():
    env = envs.make("CartPole-v1", seed=1)
    out = env.initial()
    for step in range(1, 501):
        out = env.step(_balance(out.observation))
        assert out.done == (step == 500)
    assert (out.episode_step, out.episode_return) == (500, 500.0)
    assert np.all(np.abs(out.observation) <= 0.05)
    assert env.step(_balance(out.observation)).episode_step == 1


def test_max_episode_steps_option_truncates():
    env = envs.make("CartPole-v1", seed=1, max_episode_steps=10)
    out = env.initial()
    for _ in range(3):
        for step in range(1, 11):
            out = env.step(_balance(out.observation))
            assert out.done == (step == 10)
        assert (out.episode_step, out.episode_return) == (10, 10.0)


def test_action_repeat_sums_rewards_and_matches_repeated_steps():
    repeated = envs.make("CartPole-v1", seed=5, num_action_repeats=2)
    single = envs.make("CartPole-v1", seed=5)
    a, b = repeated.initial(), single.initial()
    np.testing.assert_array_equal(a.observation, b.observation)
    for action in [0, 1, 1, 0, 1, 0]:
        a = repeated.step(action)
        single.step(action)
        b = single.step(action)
        assert a.reward == 2.0 and not a.done
        np.testing.assert_array_equal(a.observation, b.observation)
    assert (a.episode_step, a.episode_return) == (6, 12.0)
    # Stops repeating at the episode end: the last step may yield only 1.
    out = a
    while not out.done:
        out = repeated.step(0)
    assert out.reward in (1.0, 2.0)
    assert out.episode_return == pytest.approx(2.0 * (out.episode_step - 1) + out.reward)


def test_invalid_use_is_rejected():
    env = envs.make("CartPole-v1", seed=0)
    with pytest.raises(RuntimeError):
        env.step(0)
    env.initial()
    with pytest.raises(ValueError):
        env.step(2)


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("CartPole-v9", "CartPole-v1"),
        ("ALE/Pongg-v5", "ALE/Pong-v5"),
    ],
)
def test_unknown_level_suggests_close_matches(name, suggestion):
    with pytest.raises(UnknownLevelError, match=suggestion) as info:
        envs.resolve_level(name)
    assert "\n" not in str(info.value)
    with pytest.raises(UnknownLevelError):
        envs.make(name, seed=0)


def test_resolve_level_families():
    assert envs.resolve_level("CartPole-v1") == "gym"
    assert envs.resolve_level("ALE/Pong-v5") == "atari"
    assert envs.resolve_level("PongNoFrameskip-v4") == "atari"


def test_non_discrete_action_space_is_rejected():
    with pytest.raises(ValueError, match="Discrete") as info:
        envs.make("Pendulum-v1", seed=0)
    assert "\n" not in str(info.value)


def test_atari_pong():
    env = envs.make("ALE/Pong-v5", seed=7, num_action_repeats=4)
    assert env.observation_shape == (4, 84, 84)
    assert env.observation_dtype == np.uint8
    assert env.num_actions == 6  # minimal action set
    out = env.initial()
    assert out.observation.shape == (4, 84, 84) and out.observation.dtype == np.uint8
    rng = np.random.default_rng(0)
    total = 0.0
    for step in range(1, 301):
        out = env.step(int(rng.integers(6)))
        assert out.reward in (-1.0, 0.0, 1.0)
        assert out.observation.shape == (4, 84, 84) and out.observation.dtype == np.uint8
        total += out.reward
        assert out.episode_step == step and out.episode_return == total
    assert out.observation.any()
    env.close()


def test_atari_full_action_space_option():
    env = envs.make("ALE/Pong-v5", seed=0, full_action_space=True)
    assert env.num_actions == 18
    env.close()


def test_atari_is_deterministic_for_a_seed():
    def rollout(seed):
        env = envs.make("ALE/Pong-v5", seed=seed, num_action_repeats=4)
        out = [env.initial().observation]
        out += [env.step(i % 6).observation for i in range(60)]
        env.close()
        return np.stack(out)

    first = rollout(11)
    np.testing.assert_array_equal(first, rollout(11))
    # The frame stack shifts: frame k of step t is frame k+1 of step t-1.
    np.testing.assert_array_equal(first[1:, :-1], first[:-1, 1:])
