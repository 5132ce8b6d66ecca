"""Atari (ALE) with the DeepMind preprocessing the IMPALA paper used (Mnih et al., 2015).

Per agent step the action is repeated for `num_action_repeats` emulator frames (4).
The observation is the pixelwise max over the RGB screens of the last two emulator
frames (sprites that flicker between frames stay visible), converted to luminance
(Y = 0.299 R + 0.587 G + 0.114 B), resized to 84x84 (area interpolation) and stacked
with the three before it: uint8 of shape (4, 84, 84), oldest frame first.

Each game starts with 1..`noop_max` (30) no-op frames, their number drawn from a
generator seeded with `seed`. A game is cut after `max_episode_frames` (108,000)
emulator frames of play, i.e. 27,000 agent steps at frame skip 4; the no-op start
frames do not count. That truncation ends the episode like a game over does.
Sticky actions (`sticky_actions`, the ALE's repeat_action_probability) are off
by default as in the paper; 0.25 is the v5 default (Machado et al., 2018). The
game's minimal action set is used unless `full_action_space` (18 actions). Rewards
are not clipped (the learner clips) and FIRE is not pressed at reset.

Lives. With training=True a lost life ends the episode for the learner, DeepMind's
"episodic life": done=True, so nothing is bootstrapped across it, but the game goes
on, the next observation is the next frame of the same game (the frame stack is not
refilled). Only a game over or the frame cap resets the emulator, with fresh no-ops.
(gymnasium's AtariPreprocessing(terminal_on_life_loss=True) would restart the game.)
As with baselines' EpisodicLifeEnv, losing the last life is left to the game over.
With training=False lives do not end episodes.

episode_return / episode_step. The learner counts one episode per done and logs
its return and length, so they follow done: with training=True they are per life
(each life is an episode; on games without lives, such as Pong, that is the whole
game), with training=False per game, the scores papers report (--mode=test).
"""

from __future__ import annotations

import cv2
import gymnasium
import numpy as np
from ale_py import Action, ALEInterface, LoggerMode

from impala.envs import EpisodicEnvironment

# The ALE prints its banner (version, "Powered by Stella") on every emulator it makes,
# i.e. once per process; errors still show. ale_py has no environment variable for
# this: the logger mode is process-wide and set here, before any emulator exists.
ALEInterface.setLoggerMode(LoggerMode.Error)

MAX_FRAMES_PER_EPISODE = 108_000  # 30 minutes of play at 60 Hz.
NOOP_MAX = 30
FRAME_STACK = 4
SCREEN_SIZE = 84


def preprocess(screen_a: np.ndarray, screen_b: np.ndarray) -> np.ndarray:
    """One 84x84 uint8 frame from two consecutive (210, 160, 3) RGB screens."""
    gray = cv2.cvtColor(np.maximum(screen_a, screen_b), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (SCREEN_SIZE, SCREEN_SIZE), interpolation=cv2.INTER_AREA)


class AtariEnvironment(EpisodicEnvironment):
    """Auto-resetting ALE game behind impala's Environment interface (see StepOutput).

    Observations are fresh arrays; the first game is seeded with `seed`, later
    ones continue its random streams. `noops` is the number of no-op frames that
    started the current game; `ale` is the emulator (for inspection).
    """

    def __init__(
        self,
        level_name: str,
        *,
        seed: int,
        num_action_repeats: int = 4,
        training: bool = True,
        sticky_actions: float = 0.0,
        full_action_space: bool = False,
        noop_max: int = NOOP_MAX,
        max_episode_frames: int = MAX_FRAMES_PER_EPISODE,
    ) -> None:
        if num_action_repeats < 1:
            raise ValueError(f"num_action_repeats must be >= 1, got {num_action_repeats}")
        if noop_max < 0 or max_episode_frames < 1:
            raise ValueError(f"need noop_max >= 0 and max_episode_frames >= 1, got {noop_max} and {max_episode_frames}")
        if not 0.0 <= sticky_actions <= 1.0:
            raise ValueError(f"sticky_actions must be in [0, 1], got {sticky_actions}")
        self._env = gymnasium.make(
            level_name,
            frameskip=1,  # Repeats, pooling and the frame cap are done here.
            repeat_action_probability=sticky_actions,
            full_action_space=full_action_space,
            max_num_frames_per_episode=0,  # 0: no ALE cap; ours excludes the no-ops.
        )
        self._atari = self._env.unwrapped  # ALE calls directly: no per-frame copies.
        self._ale: ALEInterface = self._atari.ale
        self._actions = list(self._ale.getLegalActionSet() if full_action_space else self._ale.getMinimalActionSet())
        assert len(self._actions) == self._env.action_space.n
        self.num_actions = len(self._actions)
        self.observation_shape = (FRAME_STACK, SCREEN_SIZE, SCREEN_SIZE)
        self.observation_dtype = np.dtype(np.uint8)

        self._seed = seed
        self._seeded = False
        self._noop_rng = np.random.default_rng(seed)
        self._repeats = num_action_repeats
        self._training = training
        self._noop_max = noop_max
        self._max_frames = max_episode_frames
        self._screens = np.zeros((2, 210, 160, 3), np.uint8)  # last two RGB screens
        self._older = 0  # index of the older one, overwritten next
        self._stack = np.zeros(self.observation_shape, np.uint8)
        self.noops = 0
        self._game_frames = 0
        self._lives = 0

    @property
    def ale(self) -> ALEInterface:
        return self._ale

    def _emulate(self, action: Action, frames: int) -> float:
        """Runs up to `frames` frames of `action` (fewer at a game over); returns the
        reward. The screens of the last two frames run are kept for pooling."""
        reward = 0.0
        for i in range(frames):
            reward += self._ale.act(action)
            if i >= frames - 2:
                self._ale.getScreenRGB(self._screens[self._older])
                self._older ^= 1
            if self._ale.game_over():
                break
        return reward

    def _new_game(self) -> np.ndarray:
        seed = None if self._seeded else self._seed
        self._seeded = True
        self._atari.reset(seed=seed)  # Seeds (once) and resets the ALE.
        while True:
            self._ale.getScreenRGB(self._screens[0])
            self._screens[1] = self._screens[0]
            self.noops = int(self._noop_rng.integers(1, self._noop_max + 1)) if self._noop_max else 0
            self._emulate(Action.NOOP, self.noops)
            if not self._ale.game_over():
                break
            self._atari.reset()  # A game can end during the no-ops; start another.
        self._game_frames = 0
        self._lives = self._ale.lives()
        self._stack[:] = preprocess(self._screens[0], self._screens[1])
        return self._stack.copy()

    def _begin(self) -> tuple[np.ndarray, None]:
        return self._new_game(), None

    def _advance(self, action: int) -> tuple[float, bool, np.ndarray, None]:
        frames = min(self._repeats, self._max_frames - self._game_frames)
        reward = self._emulate(self._actions[action], frames)
        self._game_frames += frames
        lives, previous = self._ale.lives(), self._lives
        self._lives = lives
        game_over = self._ale.game_over() or self._game_frames >= self._max_frames
        life_lost = self._training and 0 < lives < previous
        if game_over:
            observation = self._new_game()
        else:
            self._stack[:-1] = self._stack[1:]
            self._stack[-1] = preprocess(self._screens[0], self._screens[1])
            observation = self._stack.copy()
        return reward, game_over or life_lost, observation, None

    def close(self) -> None:
        self._env.close()
