"""Adapter from a gymnasium env (Discrete actions) to impala's Environment."""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from impala.envs import StepOutput


class GymEnvironment:
    """Auto-resetting wrapper that keeps episode totals (see StepOutput).

    Observations are returned as fresh arrays of `observation_dtype`
    (float32 by default), so callers may keep them without the env
    overwriting them later. The env is seeded once, on its first reset;
    later resets continue its random stream.
    """

    def __init__(
        self,
        env: gymnasium.Env,
        *,
        seed: int,
        num_action_repeats: int = 1,
        observation_dtype: np.dtype | type = np.float32,
    ) -> None:
        space = env.action_space
        if not isinstance(space, gymnasium.spaces.Discrete):
            env.close()
            raise ValueError(
                f"{_name(env)} has action space {space}; only Discrete is supported"
            )
        if env.observation_space.shape is None:
            env.close()
            raise ValueError(f"{_name(env)} observation space {env.observation_space} has no shape")
        if num_action_repeats < 1:
            env.close()
            raise ValueError(f"num_action_repeats must be >= 1, got {num_action_repeats}")
        self._env = env
        self._seed = seed
        self._seeded = False
        self._repeats = num_action_repeats
        self._action_offset = int(space.start)  # Discrete(n, start) -> actions 0..n-1
        self.num_actions = int(space.n)
        self.observation_dtype = np.dtype(observation_dtype)
        self.observation_shape = tuple(env.observation_space.shape)
        self._episode_return = 0.0
        self._episode_step = 0
        self._started = False

    @classmethod
    def from_level(
        cls, level_name: str, *, seed: int, num_action_repeats: int = 1, **make_kwargs: Any
    ) -> "GymEnvironment":
        """gymnasium.make(level_name, **make_kwargs), e.g. max_episode_steps=..."""
        return cls(
            gymnasium.make(level_name, **make_kwargs),
            seed=seed,
            num_action_repeats=num_action_repeats,
        )

    def _observation(self, observation: Any) -> np.ndarray:
        return np.array(observation, dtype=self.observation_dtype, copy=True)

    def _reset(self) -> np.ndarray:
        seed = None if self._seeded else self._seed
        self._seeded = True
        observation, _ = self._env.reset(seed=seed)
        return self._observation(observation)

    def initial(self) -> StepOutput:
        """Start a new episode (the first one is seeded) and return its start."""
        self._episode_return, self._episode_step = 0.0, 0
        self._started = True
        return StepOutput(0.0, False, self._reset(), 0.0, 0)

    def step(self, action: int) -> StepOutput:
        if not self._started:
            raise RuntimeError("call initial() before step()")
        action = int(action)
        if not 0 <= action < self.num_actions:
            raise ValueError(f"action {action} outside [0, {self.num_actions})")
        reward, done = 0.0, False
        for _ in range(self._repeats):
            observation, r, terminated, truncated, _ = self._env.step(
                action + self._action_offset
            )
            reward += float(r)
            if terminated or truncated:  # Time limits end episodes too.
                done = True
                break
        self._episode_return += reward
        self._episode_step += 1
        if not done:
            return StepOutput(
                reward, False, self._observation(observation),
                self._episode_return, self._episode_step,
            )
        finished = StepOutput(
            reward, True, self._reset(), self._episode_return, self._episode_step
        )
        self._episode_return, self._episode_step = 0.0, 0
        return finished

    def close(self) -> None:
        self._env.close()


def _name(env: gymnasium.Env) -> str:
    return env.spec.id if env.spec is not None else type(env.unwrapped).__name__
