"""Tests for impala.envs.atari on real ALE games: DeepMind preprocessing, lives, caps."""

import cv2
import gymnasium
import numpy as np
import pytest
from ale_py import Action

from impala import envs
from impala.config import Config
from impala.envs.atari import MAX_FRAMES_PER_EPISODE, AtariEnvironment

FIRE = 1  # Breakout's minimal set: NOOP, FIRE, RIGHT, LEFT


def _gray84(rgb):
    # DQN's: luminance Y = 0.299 R + 0.587 G + 0.114 B, then down to 84x84.
    y = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(y, (84, 84), interpolation=cv2.INTER_AREA)


def _reference_screens(level, seed, noops, actions, repeats=4):
    """RGB screens, one per emulator frame (index 0: right after reset), of a second
    env seeded like AtariEnvironment's, stepped one frame at a time by hand."""
    env = gymnasium.make(level, frameskip=1, repeat_action_probability=0.0, max_num_frames_per_episode=0)
    env.reset(seed=seed)
    ale, action_set = env.unwrapped.ale, env.unwrapped.ale.getMinimalActionSet()
    screens = [ale.getScreenRGB()]
    for action in [Action.NOOP] * noops + [a for a in actions for _ in range(repeats)]:
        ale.act(action if isinstance(action, Action) else action_set[action])
        screens.append(ale.getScreenRGB())
    env.close()
    return screens


def test_observations_pool_the_last_two_frames_of_each_step():
    # Space Invaders draws sprites on alternate frames, so pooling is visible.
    env = AtariEnvironment("ALE/SpaceInvaders-v5", seed=3)
    actions = [int(a) for a in np.random.default_rng(0).integers(env.num_actions, size=40)]
    outs = [env.initial()] + [env.step(a) for a in actions]
    assert not any(o.done for o in outs)
    screens = _reference_screens("ALE/SpaceInvaders-v5", 3, env.noops, actions)
    pooled_differs = False
    for t, out in enumerate(outs):
        last = env.noops + 4 * t  # index of the step's last emulator frame
        assert out.observation.shape == (4, 84, 84) and out.observation.dtype == np.uint8
        expected = _gray84(np.maximum(screens[last - 1], screens[last]))
        np.testing.assert_array_equal(out.observation[-1], expected)
        pooled_differs |= not np.array_equal(expected, _gray84(screens[last]))
    assert pooled_differs
    # The stack shifts by one frame per step; the first one is filled with the start.
    obs = np.stack([o.observation for o in outs])
    np.testing.assert_array_equal(obs[1:, :-1], obs[:-1, 1:])
    assert all(np.array_equal(f, obs[0, -1]) for f in obs[0])
    env.close()


def test_noop_starts_depend_on_the_seed():
    noops, firsts = [], []
    for seed in range(8):
        env = AtariEnvironment("ALE/SpaceInvaders-v5", seed=seed)
        firsts.append(env.initial().observation)
        noops.append(env.noops)
        # Exactly that many emulator frames were played before the first observation.
        assert env.ale.getEpisodeFrameNumber() == env.noops
        env.close()
    assert all(1 <= n <= 30 for n in noops)
    assert len(set(noops)) >= 3
    assert any(not np.array_equal(firsts[0], f) for n, f in zip(noops, firsts) if n != noops[0])
    env = AtariEnvironment("ALE/Pong-v5", seed=0, noop_max=0)
    env.initial()
    assert env.noops == 0 and env.ale.getEpisodeFrameNumber() == 0
    env.close()


def test_every_game_gets_fresh_noops():
    env = AtariEnvironment("ALE/Pong-v5", seed=0, max_episode_frames=8)
    env.initial()
    counts = [env.noops]
    for _ in range(10):
        assert not env.step(0).done
        assert env.step(0).done  # 8 frames: a new game
        counts.append(env.noops)
        assert env.ale.getEpisodeFrameNumber() == env.noops
    assert len(set(counts)) > 1


def _play_breakout(training, steps_limit=2000):
    """One whole game of Breakout pressing FIRE; returns the StepOutputs and lives
    seen after each step, and the ALE frame number after each step."""
    env = envs.make("ALE/Breakout-v5", seed=0, num_action_repeats=4, training=training)
    env.initial()
    assert env.ale.lives() == 5
    outs, lives, frames = [], [], []
    for _ in range(steps_limit):
        outs.append(env.step(FIRE))
        lives.append(env.ale.lives())
        frames.append(env.ale.getEpisodeFrameNumber())
        if frames[-1] == env.noops:  # game over: a new game began
            break
    env.close()
    return outs, lives, frames


def test_life_loss_ends_a_training_episode_without_resetting_the_game():
    outs, lives, frames = _play_breakout(training=True)
    done_at = [t for t, o in enumerate(outs) if o.done]
    assert len(done_at) == 5 and done_at[-1] == len(outs) - 1  # 4 lives lost, then game over
    for k, t in enumerate(done_at[:-1]):
        assert lives[t] == 4 - k and lives[t - 1] == 5 - k  # one life fewer, not back to 5
        assert frames[t] == frames[t - 1] + 4  # the same game goes on, no reset
        assert frames[t + 1] == frames[t] + 4
        # The observation after the done is the game's next frame, the stack not refilled.
        np.testing.assert_array_equal(outs[t].observation[:-1], outs[t - 1].observation[1:])
    # Per-life counters: each life's steps, restarted after every done.
    starts = [-1] + done_at[:-1]
    assert [outs[t].episode_step for t in done_at] == [t - s for s, t in zip(starts, done_at)]
    assert outs[done_at[0] + 1].episode_step == 1


def test_life_loss_is_not_an_episode_end_in_test_mode():
    training, _, _ = _play_breakout(training=True)
    test, lives, _ = _play_breakout(training=False)
    assert [t for t, o in enumerate(test) if o.done] == [len(test) - 1]
    assert len(test) == len(training)  # the same game, episodes cut differently
    game = test[-1]
    assert game.episode_step == len(test)
    assert game.episode_return == sum(o.reward for o in test)
    lives_per_episode = [o for o in training if o.done]
    assert game.episode_return == sum(o.episode_return for o in lives_per_episode)
    assert game.episode_step == sum(o.episode_step for o in lives_per_episode)


def test_whole_game_scores_add_up_with_rewards_in_test_mode():
    # Space Invaders with random actions scores, so returns are not trivially 0.
    results = {}
    for training in (True, False):
        env = AtariEnvironment("ALE/SpaceInvaders-v5", seed=1, training=training)
        env.initial()
        rng = np.random.default_rng(1)
        episodes = []
        while True:
            out = env.step(int(rng.integers(env.num_actions)))
            if out.done:
                episodes.append((out.episode_return, out.episode_step))
                if env.ale.getEpisodeFrameNumber() == env.noops:  # game over
                    break
        env.close()
        results[training] = episodes
    assert len(results[True]) == 3 and len(results[False]) == 1  # 3 lives
    game_return, game_steps = results[False][0]
    assert game_return > 0
    assert game_return == sum(r for r, _ in results[True])
    assert game_steps == sum(n for _, n in results[True])


@pytest.mark.parametrize("training", [True, False])
def test_episodes_are_capped_in_emulator_frames(training):
    assert AtariEnvironment.__init__.__kwdefaults__["max_episode_frames"] == MAX_FRAMES_PER_EPISODE == 108_000
    env = AtariEnvironment("ALE/Pong-v5", seed=2, max_episode_frames=160, training=training)
    env.initial()
    for _ in range(2):  # the cap holds for every game, not only the first
        noops = env.noops
        for step in range(1, 41):
            if step == 40:
                assert env.ale.getEpisodeFrameNumber() == noops + 156  # no-ops not counted
            out = env.step(step % 6)
            assert out.done == (step == 40)
        assert out.episode_step == 40
        assert env.ale.getEpisodeFrameNumber() == env.noops  # a new game
    env.close()


def test_cap_that_is_not_a_multiple_of_the_frame_skip():
    env = AtariEnvironment("ALE/Pong-v5", seed=2, max_episode_frames=10)
    env.initial()
    noops = env.noops
    assert not env.step(0).done and not env.step(0).done
    assert env.ale.getEpisodeFrameNumber() == noops + 8
    out = env.step(0)  # only 2 frames left
    assert out.done and out.episode_step == 3
    env.close()


def test_sticky_actions_and_action_sets_reach_the_ale():
    env = AtariEnvironment("ALE/Pong-v5", seed=0)
    assert env.ale.getFloat("repeat_action_probability") == 0.0
    assert env.num_actions == 6
    env.close()
    config = Config(level_name="ALE/Pong-v5", sticky_actions=0.25, full_action_space=True)
    env = envs.make(config.level_name, seed=0, **envs.options(config))
    assert env.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert env.num_actions == 18
    env.initial()
    assert env.step(17).observation.shape == (4, 84, 84)
    env.close()


def test_invalid_use_is_rejected():
    env = AtariEnvironment("ALE/Pong-v5", seed=0)
    with pytest.raises(RuntimeError):
        env.step(0)
    env.initial()
    with pytest.raises(ValueError):
        env.step(6)
    env.close()
    with pytest.raises(ValueError):
        AtariEnvironment("ALE/Pong-v5", seed=0, sticky_actions=1.5)


def test_returned_observations_are_not_overwritten():
    env = AtariEnvironment("ALE/Pong-v5", seed=0)
    first = env.initial().observation
    kept = first.copy()
    out = env.step(0)
    out.observation[:] = 0  # a caller scribbling on its copy changes nothing here
    np.testing.assert_array_equal(first, kept)
    assert env.step(0).observation[:-1].any()
    env.close()
