"""Atari (ALE) with the DeepMind preprocessing used in the IMPALA paper."""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

from impala.envs.gym import GymEnvironment

MAX_FRAMES_PER_EPISODE = 108_000  # 30 minutes of play at 60 Hz.
FRAME_STACK = 4
SCREEN_SIZE = 84


class AtariEnvironment(GymEnvironment):
    """uint8 observations of shape (4, 84, 84): the last 4 grayscale frames.

    Done here: up to 30 random no-ops at reset, action repeat of
    `num_action_repeats` frames (4 is standard) with max-pooling over the last
    two, 84x84 grayscale, a 4-frame stack, episodes capped at 108,000 frames,
    optional sticky actions, minimal action set unless full_action_space.
    Not done: no reward clipping (the learner clips), and a lost life does
    not end the episode (no terminal-on-life-loss, no FIRE on reset).
    """

    def __init__(
        self,
        level_name: str,
        *,
        seed: int,
        num_action_repeats: int = 4,
        sticky_actions: float = 0.0,
        full_action_space: bool = False,
    ) -> None:
        env = gymnasium.make(
            level_name,
            frameskip=1,  # AtariPreprocessing does the skipping (and max-pooling).
            repeat_action_probability=sticky_actions,
            full_action_space=full_action_space,
            max_num_frames_per_episode=MAX_FRAMES_PER_EPISODE,
        )
        env = AtariPreprocessing(
            env,
            noop_max=30,
            frame_skip=num_action_repeats,
            screen_size=SCREEN_SIZE,
            grayscale_obs=True,
            scale_obs=False,
            terminal_on_life_loss=False,
        )
        env = FrameStackObservation(env, stack_size=FRAME_STACK)
        super().__init__(
            env, seed=seed, num_action_repeats=1, observation_dtype=np.uint8
        )
