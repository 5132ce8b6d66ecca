"""Environments behind the one small interface actors use.

Semantics follow scalable_agent's environment flow: an environment resets
itself when an episode ends, so an actor just keeps calling step().

Families (chosen by level name):
  'gym'   - any registered gymnasium env with a Discrete action space.
  'atari' - ALE games (`ALE/...` ids and the legacy `*NoFrameskip-v4` ones),
            with DeepMind preprocessing.
  'dmlab' - DeepMind Lab (impala.envs.dmlab; needs the `deepmind_lab` module):
            `dmlab30` (the DMLab-30 suite, spread over actors), a DMLab-30
            level by name (`rooms_watermaze`, `rooms_collect_good_objects_train`),
            or any DeepMind Lab level script as `dmlab:<path>`
            (`dmlab:seekavoid_arena_01`, `dmlab:contributed/dmlab30/rooms_watermaze`).

Multi-task names (see levels()): `dmlab30`, `atari57` (the Atari-57 games as
`ALE/<Game>-v5` ids, impala/atari57.py), or a comma-separated list of levels of one
family, Atari or DeepMind Lab (`ALE/Pong-v5,ALE/Breakout-v5,ALE/Boxing-v5`). Actor i
plays level i mod n. A list's entries are full level names (`Pong` is refused with a
hint to `ALE/Pong-v5`, so that a level has one name in metrics and results), each
once; suites cannot be listed. The games of a multi-task Atari run share the full
18-action set (see options()), so that one network plays them all.
"""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple, Protocol

import numpy as np

from impala.config import ConfigError


class StepOutput(NamedTuple):
    """What an actor sees after each step.

    On the step that ends an episode (terminated or truncated) done is True,
    reward is that final step's reward, episode_return/episode_step are the
    finished episode's totals, and observation is already the first
    observation of the next episode. Otherwise the totals are running ones.
    instruction goes with observation on environments that give one (DMLab:
    int32 word ids, zero-padded to the env's `instruction_length`); None elsewhere.
    """

    reward: float
    done: bool
    observation: np.ndarray
    episode_return: float
    episode_step: int
    instruction: np.ndarray | None = None


class Environment(Protocol):
    observation_shape: tuple[int, ...]
    observation_dtype: np.dtype
    num_actions: int
    # Optional: environments with instructions also have `instruction_length` (> 0),
    # the length of StepOutput.instruction; see instruction_length() below.

    def initial(self) -> StepOutput: ...

    def step(self, action: int) -> StepOutput: ...

    def close(self) -> None: ...


class EpisodicEnvironment:
    """What every environment here does around its own game: refuse step() before
    initial() and actions out of range, keep the episode's running return and step,
    and follow StepOutput's convention on the step that ends an episode.
    Subclasses set `num_actions` and implement `_begin()` -> (observation,
    instruction) for a new episode and `_advance(action)` -> (reward, done,
    observation, instruction), where a done step's observation is already the
    next episode's first (instruction None where the level has none)."""

    num_actions: int
    _episode_return = 0.0
    _episode_step = 0
    _started = False

    def _begin(self) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _advance(self, action: int) -> tuple[float, bool, np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def initial(self) -> StepOutput:
        """Starts a new episode (the first one seeded) and returns its start."""
        observation, instruction = self._begin()
        self._episode_return, self._episode_step = 0.0, 0
        self._started = True
        return StepOutput(0.0, False, observation, 0.0, 0, instruction)

    def step(self, action: int) -> StepOutput:
        if not self._started:
            raise RuntimeError("call initial() before step()")
        action = int(action)
        if not 0 <= action < self.num_actions:
            raise ValueError(f"action {action} outside [0, {self.num_actions})")
        reward, done, observation, instruction = self._advance(action)
        self._episode_return += reward
        self._episode_step += 1
        output = StepOutput(reward, done, observation, self._episode_return, self._episode_step, instruction)
        if done:
            self._episode_return, self._episode_step = 0.0, 0
        return output


class UnknownLevelError(ValueError):
    """The level name is not a registered environment id."""


class EngineMissingError(ConfigError):
    """The level's engine (DeepMind Lab) is not installed; the message says how to get it."""


DMLAB_SUITE = "dmlab30"
ATARI_SUITE = "atari57"
DMLAB_PREFIX = "dmlab:"
LIST_SEPARATOR = ","
_FAMILY_NAMES = {"gym": "gymnasium", "atari": "Atari", "dmlab": "DeepMind Lab"}


def _is_dmlab(level_name: str) -> bool:
    from impala import dmlab30

    return level_name == DMLAB_SUITE or level_name.startswith(DMLAB_PREFIX) or level_name in dmlab30.ALL_LEVELS


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


def levels(level_name: str) -> tuple[str, ...]:
    """The levels a --level_name names, in task order (actor i plays levels[i % n]):
    a suite's, a comma-separated list's entries (blanks around them dropped), or the
    level itself. Not checked here: resolve_level checks them."""
    if level_name == DMLAB_SUITE:
        from impala import dmlab30

        return dmlab30.TRAIN_LEVELS
    if level_name == ATARI_SUITE:
        from impala import atari57

        return atari57.LEVELS
    if LIST_SEPARATOR in level_name:
        return tuple(entry.strip() for entry in level_name.split(LIST_SEPARATOR))
    return (level_name,)


def is_multitask(level_name: str) -> bool:
    """Whether a --level_name names several levels (a suite or a list)."""
    return len(levels(level_name)) > 1


def level_for_task(level_name: str, task: int) -> str:
    """The level actor `task` plays: the level itself, or for a multi-task name its
    level task mod n (as the original spread DMLab-30 over actors)."""
    names = levels(level_name)
    return names[task % len(names)]


def resolve_level(level_name: str) -> str:
    """Return the family ('gym', 'atari' or 'dmlab') that serves level_name, checking
    every level of a multi-task name: an unknown one is an UnknownLevelError (with
    close matches), a list that cannot be one run (empty or repeated entries, a suite
    in it, mixed families, gymnasium levels) a ConfigError; both are one line."""
    if not isinstance(level_name, str):
        raise UnknownLevelError(f"level name must be a str, got {level_name!r}")
    if level_name == DMLAB_SUITE:
        return "dmlab"
    names = levels(level_name)
    if len(names) == 1:
        return _resolve_one(level_name)
    seen: set[str] = set()
    for name in names:
        if not name:
            raise ConfigError(f"--level_name {level_name!r} has an empty entry")
        if name in (DMLAB_SUITE, ATARI_SUITE):
            raise ConfigError(f"a suite ({name}) cannot be part of a list of levels; name it alone or list its levels")
        if name in seen:
            # Refused rather than deduplicated: a repeated level would silently get more actors.
            raise ConfigError(f"--level_name lists {name} twice; name each level once")
        seen.add(name)
    families = {name: _resolve_one(name) for name in names}
    first = names[0]
    for name, family in families.items():
        if family != families[first]:
            raise ConfigError(
                f"--level_name mixes {_FAMILY_NAMES[families[first]]} ({first}) and {_FAMILY_NAMES[family]} "
                f"({name}) levels; a multi-task run's levels must all be Atari or all DeepMind Lab"
            )
    if families[first] == "gym":
        # Unlike Atari's (one frame format, the full action set) and DMLab's, their spaces differ.
        raise ConfigError(f"a list of levels must be Atari games or DeepMind Lab levels; {first} is a gymnasium level")
    return families[first]


def _resolve_one(level_name: str) -> str:
    if _is_dmlab(level_name):
        if level_name.startswith(DMLAB_PREFIX) and not level_name[len(DMLAB_PREFIX) :].strip():
            raise UnknownLevelError(f"{level_name!r} names no level; try dmlab:seekavoid_arena_01 or dmlab30")
        return "dmlab"
    registry = _registry()
    spec = registry.get(level_name)
    if spec is None:
        from impala import dmlab30

        ale_id = f"ALE/{level_name}-v5"  # a bare game name: `Pong`
        if ale_id in registry:
            matches = [ale_id]
        else:
            candidates = [*registry, DMLAB_SUITE, ATARI_SUITE, *sorted(dmlab30.ALL_LEVELS)]
            matches = difflib.get_close_matches(level_name, candidates, n=3)
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

    A multi-task name (dmlab30, atari57, a list) builds its first level: its levels
    share spaces, given the options that options(config) gives them.
    `training` is accepted for every family: Atari ends episodes at a lost life
    only when training (see impala.envs.atari); gym ignores it.
    Remaining options go to the family's constructor.
    """
    family = resolve_level(level_name)
    level = level_for_task(level_name, 0)
    if family == "dmlab":
        from impala.envs.dmlab import DmLabEnvironment

        return DmLabEnvironment(level, seed=seed, num_action_repeats=num_action_repeats, training=training, **options)
    if family == "atari":
        from impala.envs.atari import AtariEnvironment

        return AtariEnvironment(level, seed=seed, num_action_repeats=num_action_repeats, training=training, **options)
    from impala.envs.gym import GymEnvironment

    return GymEnvironment.from_level(level, seed=seed, num_action_repeats=num_action_repeats, **options)


def make_checked(level_name: str, **kwargs: Any) -> Environment:
    """`make` for a level the user named: an environment this program cannot use
    (e.g. a continuous action space) is a one-line ConfigError. UnknownLevelError
    (itself a user error with its own hint) and EngineMissingError (a ConfigError)
    pass through."""
    try:
        return make(level_name, **kwargs)
    except UnknownLevelError:
        raise
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e).splitlines()[0]) from None


__all__ = [
    "Environment",
    "StepOutput",
    "UnknownLevelError",
    "is_multitask",
    "level_for_task",
    "levels",
    "make",
    "make_checked",
    "resolve_level",
]


def instruction_length(env: Any) -> int:
    """Length of the instruction an environment gives with each step (0: none)."""
    return int(getattr(env, "instruction_length", 0) or 0)


def options(config: Any) -> dict[str, Any]:
    """The family-specific options that an impala Config sets for its level."""
    family = resolve_level(config.level_name)
    if family == "dmlab":
        return {
            "width": config.width,
            "height": config.height,
            "level_cache_dir": config.level_cache_dir,
            "dataset_path": config.dataset_path,
            "renderer": config.dmlab_renderer,
        }
    if family == "atari":
        # The games of a multi-task run share one network, hence one action set: all 18
        # actions (as the paper's multi-task agent), whatever --full_action_space says.
        full = config.full_action_space or is_multitask(config.level_name)
        return {"sticky_actions": config.sticky_actions, "full_action_space": full}
    return {}
