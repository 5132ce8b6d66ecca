"""Adapter from a gymnasium env (Discrete actions) to impala's Environment."""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from impala.envs import EpisodicEnvironment


class GymEnvironment(EpisodicEnvironment):
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
            raise ValueError(f"{_name(env)} has action space {space}; only Discrete is supported")
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

    @classmethod
    def from_level(
        cls, level_name: str, *, seed: int, num_action_repeats: int = 1, **make_kwargs: Any
    ) -> GymEnvironment:
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

    def _begin(self) -> tuple[np.ndarray, None]:
        return self._reset(), None

    def _advance(self, action: int) -> tuple[float, bool, np.ndarray, None]:
        reward, done = 0.0, False
        for _ in range(self._repeats):
            observation, r, terminated, truncated, _ = self._env.step(action + self._action_offset)
            reward += float(r)
            if terminated or truncated:  # Time limits end episodes too.
                done = True
                break
        return reward, done, self._reset() if done else self._observation(observation), None

    def close(self) -> None:
        self._env.close()


def _name(env: gymnasium.Env) -> str:
    return env.spec.id if env.spec is not None else type(env.unwrapped).__name__
