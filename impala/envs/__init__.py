"""Environments behind the one small interface actors use.

Semantics follow scalable_agent's environment flow: an environment resets
itself when an episode ends, so an actor just keeps calling step().

Families (chosen by level name):
  'gym'   - any registered gymnasium env with a Discrete action space.
  'atari' - ALE games (`ALE/...` ids and the legacy `*NoFrameskip-v4` ones),
            with DeepMind preprocessing.
  A 'dmlab' family would slot in here: one more branch in resolve_level/make.
"""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple, Protocol

import numpy as np


class StepOutput(NamedTuple):
    """What an actor sees after each step.

    On the step that ends an episode (terminated or truncated) done is True,
    reward is that final step's reward, episode_return/episode_step are the
    finished episode's totals, and observation is already the first
    observation of the next episode. Otherwise the totals are running ones.
    """

    reward: float
    done: bool
    observation: np.ndarray
    episode_return: float
    episode_step: int


class Environment(Protocol):
    observation_shape: tuple[int, ...]
    observation_dtype: np.dtype
    num_actions: int

    def initial(self) -> StepOutput: ...

    def step(self, action: int) -> StepOutput: ...

    def close(self) -> None: ...


class UnknownLevelError(ValueError):
    """The level name is not a registered environment id."""


_ATARI_ENTRY_POINT = "ale_py.env:AtariEnv"
_ale_registered = False


def _registry() -> dict[str, Any]:
    # Importing ale_py (slowish) only when a level is actually looked up.
    global _ale_registered
    import gymnasium

    if not _ale_registered:
        import ale_py

        gymnasium.register_envs(ale_py)
        _ale_registered = True
    return gymnasium.registry


def resolve_level(level_name: str) -> str:
    """Return the family ('gym' or 'atari') that serves level_name."""
    if not isinstance(level_name, str):
        raise UnknownLevelError(f"level name must be a str, got {level_name!r}")
    registry = _registry()
    spec = registry.get(level_name)
    if spec is None:
        matches = difflib.get_close_matches(level_name, list(registry), n=3)
        hint = f"; did you mean {', '.join(matches)}?" if matches else ""
        raise UnknownLevelError(f"unknown level {level_name!r}{hint}")
    if spec.entry_point == _ATARI_ENTRY_POINT:
        return "atari"
    return "gym"


def make(
    level_name: str,
    *,
    seed: int,
    num_action_repeats: int = 1,
    training: bool = True,
    **options: Any,
) -> Environment:
    """Build the environment for level_name.

    `training` is accepted for every family: Atari ends episodes at a lost life
    only when training (see impala.envs.atari); gym ignores it.
    Remaining options go to the family's constructor.
    """
    family = resolve_level(level_name)
    if family == "atari":
        from impala.envs.atari import AtariEnvironment

        return AtariEnvironment(
            level_name, seed=seed, num_action_repeats=num_action_repeats,
            training=training, **options
        )
    from impala.envs.gym import GymEnvironment

    return GymEnvironment.from_level(
        level_name, seed=seed, num_action_repeats=num_action_repeats, **options
    )


__all__ = [
    "Environment",
    "StepOutput",
    "UnknownLevelError",
    "make",
    "resolve_level",
]


def level_for_task(level_name: str, task: int) -> str:
    """The level actor `task` plays: the level itself, or for a multi-task name one
    of its levels (as the original spread DMLab-30 over actors)."""
    return level_name


def options(config: Any) -> dict[str, Any]:
    """The family-specific options that an impala Config sets for its level."""
    if resolve_level(config.level_name) == "atari":
        return {"sticky_actions": config.sticky_actions,
                "full_action_space": config.full_action_space}
    return {}
