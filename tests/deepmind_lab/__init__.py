"""A stand-in for DeepMind Lab's `deepmind_lab` module, for tests only.

The real engine cannot be built on the test machines, so this module takes its
place (tests put `tests/` on sys.path, or on PYTHONPATH for subprocesses). It
follows the documented Python API (docs/users/python_api.md of google-deepmind/lab)
strictly, and raises where the real module's behaviour is undefined or an error:

  - `Lab(level, observations, config={}, renderer='software', level_cache=None)`:
    config keys and values must be str; observations must be names from
    observation_spec(); the renderer 'software' or 'hardware'; a level cache needs
    fetch() and write(); an unknown level raises RuntimeError, and the two held-out
    DMLab-30 test levels need config allowHoldOutLevels='true';
  - `step(action, num_steps=1)`: action must be a numpy array of dtype intc and
    shape (7,) within action_spec(); num_steps a positive int;
  - `observations()` and `step()` only while an episode runs (after reset(), until
    is_running() turns False); after close() only is_running() is allowed.

Levels (all DMLab-30 levels as `contributed/dmlab30/<name>`, plus
`tests/empty_room_test` and `seekavoid_arena_01`) are tiny deterministic games:
episodes last `episode_frames(level)` frames (32 to 48), and each frame where the
action does the level's rewarded thing earns `reward_per_frame(level)`:

    level index k (its DMLab-30 position)   rewarded when
    k % 4 == 0                             MOVE_BACK_FORWARD == 1 (forward)
    k % 4 == 1                             LOOK_LEFT_RIGHT < 0 (looking left)
    k % 4 == 2                             STRAFE_LEFT_RIGHT == 1 (strafing right)
    k % 4 == 3                             FIRE == 1

Language levels (`language_*`) give an instruction (INSTR) drawn per episode from
the seed, and the instruction picks the rewarded thing instead, so an agent has to
read it. The RGB frame shows the level index, the frame count and the seed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib

import numpy as np

__all__ = ["Lab", "version", "runfiles_path", "set_runfiles_path"]

_ACTION_SPEC = (
    {"name": "LOOK_LEFT_RIGHT_PIXELS_PER_FRAME", "min": -512, "max": 512},
    {"name": "LOOK_DOWN_UP_PIXELS_PER_FRAME", "min": -512, "max": 512},
    {"name": "STRAFE_LEFT_RIGHT", "min": -1, "max": 1},
    {"name": "MOVE_BACK_FORWARD", "min": -1, "max": 1},
    {"name": "FIRE", "min": 0, "max": 1},
    {"name": "JUMP", "min": 0, "max": 1},
    {"name": "CROUCH", "min": 0, "max": 1},
)

# In DMLab-30 order (as scalable_agent's dmlab30.py lists them).
DMLAB30 = (
    ("rooms_collect_good_objects_train", "rooms_collect_good_objects_test"),
    ("rooms_exploit_deferred_effects_train", "rooms_exploit_deferred_effects_test"),
    ("rooms_select_nonmatching_object",),
    ("rooms_watermaze",),
    ("rooms_keys_doors_puzzle",),
    ("language_select_described_object",),
    ("language_select_located_object",),
    ("language_execute_random_task",),
    ("language_answer_quantitative_question",),
    ("lasertag_one_opponent_small",),
    ("lasertag_three_opponents_small",),
    ("lasertag_one_opponent_large",),
    ("lasertag_three_opponents_large",),
    ("natlab_fixed_large_map",),
    ("natlab_varying_map_regrowth",),
    ("natlab_varying_map_randomized",),
    ("skymaze_irreversible_path_hard",),
    ("skymaze_irreversible_path_varied",),
    ("psychlab_arbitrary_visuomotor_mapping",),
    ("psychlab_continuous_recognition",),
    ("psychlab_sequential_comparison",),
    ("psychlab_visual_search",),
    ("explore_object_locations_small",),
    ("explore_object_locations_large",),
    ("explore_obstructed_goals_small",),
    ("explore_obstructed_goals_large",),
    ("explore_goal_locations_small",),
    ("explore_goal_locations_large",),
    ("explore_object_rewards_few",),
    ("explore_object_rewards_many",),
)
LEVELS: dict[str, int] = {"tests/empty_room_test": 30, "seekavoid_arena_01": 31}
for _index, _names in enumerate(DMLAB30):
    for _name in _names:
        LEVELS["contributed/dmlab30/" + _name] = _index
HELD_OUT = frozenset(
    {"contributed/dmlab30/rooms_collect_good_objects_test", "contributed/dmlab30/rooms_exploit_deferred_effects_test"}
)
INSTRUCTIONS = ("Pick the red hat", "Go to the blue balloon", "Strafe to the green key", "Shoot the yellow cake")

_runfiles_path = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    return "stand-in"


def runfiles_path() -> str:
    return _runfiles_path


def set_runfiles_path(path: str) -> None:
    global _runfiles_path
    if not isinstance(path, str):
        raise TypeError(f"runfiles path must be a str, got {type(path).__name__}")
    _runfiles_path = path


def level_index(level: str) -> int:
    return LEVELS[level]


def is_language_level(level: str) -> bool:
    return os.path.basename(level).startswith("language_")


def episode_frames(level: str) -> int:
    return 4 * (8 + level_index(level) % 5)


def reward_per_frame(level: str) -> float:
    return float(1 + level_index(level) % 3)


def rewarded(rule: int, action: np.ndarray) -> bool:
    if rule == 0:
        return action[3] == 1
    if rule == 1:
        return action[0] < 0
    if rule == 2:
        return action[2] == 1
    return action[4] == 1


_OBSERVATION_SPEC = (
    ("RGB_INTERLEAVED", np.uint8, "hwc"),
    ("RGB", np.uint8, "chw"),
    ("INSTR", str, ()),
    ("MAP_FRAME_NUMBER", np.float64, (1,)),
)


class Lab:
    """One environment; see the module docstring for the rules it enforces."""

    def __init__(self, level, observations, config=None, renderer="software", level_cache=None):
        if not isinstance(level, str):
            raise TypeError(f"level must be a str, got {type(level).__name__}")
        if not isinstance(observations, (list, tuple)):
            raise TypeError("observations must be a list of observation names")
        names = [name for name, _, _ in _OBSERVATION_SPEC]
        for name in observations:
            if not isinstance(name, str):
                raise TypeError(f"observation names must be str, got {type(name).__name__}")
            if name not in names:
                raise ValueError(f"Unknown observation '{name}'")
        config = {} if config is None else config
        if not isinstance(config, dict):
            raise TypeError("config must be a dict of str to str")
        for key, value in config.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"config keys and values must be str, got {key!r}: {value!r}")
        if renderer not in ("software", "hardware"):
            raise ValueError(f"renderer must be 'software' or 'hardware', got {renderer!r}")
        if level_cache is not None and not (
            callable(getattr(level_cache, "fetch", None)) and callable(getattr(level_cache, "write", None))
        ):
            raise TypeError("level_cache must have fetch(key, pk3_path) and write(key, pk3_path)")
        if level not in LEVELS:
            raise RuntimeError(f"Failed to find level '{level}'")
        if level in HELD_OUT and config.get("allowHoldOutLevels") != "true":
            raise RuntimeError(f"Level '{level}' is held out; set allowHoldOutLevels to 'true'")
        self.width = int(config.get("width", "320"))
        self.height = int(config.get("height", "240"))
        self._fps = int(config.get("fps", "60"))
        self.mixer_seed = int(config.get("mixerSeed", "0"))
        self.level = level
        self.config = dict(config)
        self.renderer = renderer
        self._observations = list(observations)
        self._level_cache = level_cache
        self._index = level_index(level)
        self._running = False
        self._closed = False
        self._frames = 0
        self._seed = 0
        self._instruction = ""
        self._rule = self._index % 4
        self.episodes = 0
        self.cache_hits = 0

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise RuntimeError(f"Environment is closed; {method}() is not allowed")

    def _check_running(self, method: str) -> None:
        self._check_open(method)
        if not self._running:
            raise RuntimeError(f"Environment in wrong status for call to {method}()")

    def reset(self, episode=-1, seed=None):
        self._check_open("reset")
        if not isinstance(episode, (int, np.integer)) or isinstance(episode, bool):
            raise TypeError(f"episode must be an int, got {type(episode).__name__}")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        self._seed = (int(seed) ^ self.mixer_seed) & 0xFFFFFFFF
        self._load_map()
        random = np.random.RandomState(self._seed)
        if is_language_level(self.level):
            choice = int(random.randint(len(INSTRUCTIONS)))
            self._instruction, self._rule = INSTRUCTIONS[choice], choice
        self._frames = 0
        self._running = True
        self.episodes += 1
        return True

    def _load_map(self) -> None:
        """Maps are 'compiled' per (level, seed % 4), going through the level cache."""
        if self._level_cache is None:
            return
        key = hashlib.sha1(f"{self.level}:{self._seed % 4}".encode()).hexdigest()
        with tempfile.TemporaryDirectory() as tmp:
            pk3_path = os.path.join(tmp, key + ".pk3")
            if self._level_cache.fetch(key, pk3_path):
                with open(pk3_path, "rb") as f:
                    if f.read() != _map_bytes(key):
                        raise RuntimeError(f"level cache returned a corrupt map for {key}")
                self.cache_hits += 1
                return
            with open(pk3_path, "wb") as f:
                f.write(_map_bytes(key))
            self._level_cache.write(key, pk3_path)

    def num_steps(self) -> int:
        self._check_open("num_steps")
        return self._frames

    def is_running(self) -> bool:
        return self._running and not self._closed

    def step(self, action, num_steps=1):
        self._check_running("step")
        if not isinstance(action, np.ndarray) or action.dtype != np.intc or action.shape != (7,):
            raise TypeError(
                f"action must be a numpy array of dtype intc and shape (7,), got "
                f"{type(action).__name__} {getattr(action, 'dtype', '')} {getattr(action, 'shape', '')}"
            )
        for value, spec in zip(action, _ACTION_SPEC):
            if not spec["min"] <= value <= spec["max"]:
                raise ValueError(f"{spec['name']} = {value} outside [{spec['min']}, {spec['max']}]")
        if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        reward = 0.0
        for _ in range(int(num_steps)):
            if rewarded(self._rule, action):
                reward += reward_per_frame(self.level)
            self._frames += 1
            if self._frames >= episode_frames(self.level):
                self._running = False
                break
        return reward

    def observations(self):
        self._check_running("observations")
        out = {}
        for name in self._observations:
            if name in ("RGB_INTERLEAVED", "RGB"):
                frame = np.empty((self.height, self.width, 3), np.uint8)
                frame[..., 0] = 8 * self._index
                frame[..., 1] = self._frames % 256
                frame[..., 2] = self._seed % 256
                out[name] = frame if name == "RGB_INTERLEAVED" else np.ascontiguousarray(frame.transpose(2, 0, 1))
            elif name == "INSTR":
                out[name] = self._instruction
            else:
                out[name] = np.array([float(self._frames)])
        return out

    def observation_spec(self):
        self._check_open("observation_spec")
        spec = []
        for name, dtype, shape in _OBSERVATION_SPEC:
            if shape == "hwc":
                shape = (self.height, self.width, 3)
            elif shape == "chw":
                shape = (3, self.height, self.width)
            spec.append({"name": name, "dtype": dtype, "shape": shape})
        return spec

    def action_spec(self):
        self._check_open("action_spec")
        return [dict(spec) for spec in _ACTION_SPEC]

    def fps(self) -> int:
        self._check_open("fps")
        return self._fps

    def events(self):
        self._check_open("events")
        return []

    def close(self) -> bool:
        self._check_open("close")
        self._closed = True
        self._running = False
        return True


def _map_bytes(key: str) -> bytes:
    return b"PK3 stand-in " + key.encode() + zlib.crc32(key.encode()).to_bytes(4, "little")
