"""DeepMind Lab levels through the `deepmind_lab` Python API, set up as the original.

As in scalable_agent's `PyProcessDmLab`: the 9-action set below, RGB_INTERLEAVED
observations of 96x72 pixels (--width, --height), the INSTR observation (requested on
every level, as the original does; a level whose engine does not know it is built
without it), config logLevel 'WARN', `num_action_repeats` frames per agent step (4), a new episode seeded from the
environment's own random stream (seeded with `seed`) whenever one ends, and an
optional level cache. `training=False` selects the evaluation settings of the
original's test mode: held-out levels allowed and its mixer seed, so test episodes
are drawn from a different set of seeds than training ones.

The API contract is followed to the letter (docs/users/python_api.md of
google-deepmind/lab): config keys and values are strings, an action is a numpy
array of dtype intc and shape (7,), and observations() is only read while an episode
is running, so a finished episode is reset before the next observation is taken.

Observations reach the agent as [3, H, W] uint8 (converted from the engine's
[H, W, 3]); the instruction as `StepOutput.instruction`, int32 token ids of its
words (see `tokenize`), padded with zeros to `MAX_INSTRUCTION_WORDS`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import numpy as np

from impala import dmlab30, files
from impala.envs import EngineMissingError, EpisodicEnvironment, UnknownLevelError

# The original's action set (environments.py, DEFAULT_ACTION_SET). Each row is one
# native action: look left/right (pixels per frame), look down/up, strafe left/right,
# move back/forward, fire, jump, crouch.
ACTION_SET = (
    (0, 0, 0, 1, 0, 0, 0),  # Forward
    (0, 0, 0, -1, 0, 0, 0),  # Backward
    (0, 0, -1, 0, 0, 0, 0),  # Strafe Left
    (0, 0, 1, 0, 0, 0, 0),  # Strafe Right
    (-20, 0, 0, 0, 0, 0, 0),  # Look Left
    (20, 0, 0, 0, 0, 0, 0),  # Look Right
    (-20, 0, 0, 1, 0, 0, 0),  # Look Left + Forward
    (20, 0, 0, 1, 0, 0, 0),  # Look Right + Forward
    (0, 0, 0, 0, 1, 0, 0),  # Fire
)
WIDTH, HEIGHT = 96, 72
TEST_MIXER_SEED = 0x600D5EED  # the original's mixer seed for evaluation
NUM_HASH_BUCKETS = 1000  # words hash to ids 1..1000 (0 pads), as the original's 1000 buckets
MAX_INSTRUCTION_WORDS = 32  # longer instructions keep their first 32 words
RENDERERS = ("software", "hardware")

INSTALL_HINT = (
    "DeepMind Lab is not installed (no module named 'deepmind_lab'): build it from source with "
    "bazel, or use the Docker image's dmlab stage (docker build --target dmlab -t impala:dmlab .); "
    "see docs/dmlab.md"
)


def import_engine() -> Any:
    """The `deepmind_lab` module, or a one-line EngineMissingError saying how to get it."""
    try:
        import deepmind_lab
    except ImportError as e:
        if e.name not in (None, "deepmind_lab"):  # installed, but something it needs is not
            raise EngineMissingError(f"DeepMind Lab is installed but cannot be imported: {e}")
        raise EngineMissingError(INSTALL_HINT) from None
    return deepmind_lab


def level_path(level_name: str) -> str:
    """The engine's level script for an impala DMLab level name: 'dmlab:' is dropped,
    and a DMLab-30 name becomes 'contributed/dmlab30/<name>' (as the original did)."""
    name = level_name[len("dmlab:") :] if level_name.startswith("dmlab:") else level_name
    return dmlab30.LEVEL_PREFIX + name if name in dmlab30.ALL_LEVELS else name


def word_id(word: str) -> int:
    """A word's token id in 1..NUM_HASH_BUCKETS: a stable hash bucket, as the original
    hashed words into 1000 buckets (collisions are possible and harmless)."""
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % NUM_HASH_BUCKETS


def tokenize(instruction: str | bytes, max_words: int = MAX_INSTRUCTION_WORDS) -> np.ndarray:
    """Instruction text -> int32 [max_words]: word ids, then zeros."""
    if isinstance(instruction, bytes):
        instruction = instruction.decode("utf-8", errors="replace")
    tokens = np.zeros(max_words, np.int32)
    words = instruction.split()[:max_words]
    tokens[: len(words)] = [word_id(w) for w in words]
    return tokens


class LevelCache:
    """A level cache in a directory, with the two methods DeepMind Lab calls: compiled
    maps are reused across episodes, actors and runs instead of being rebuilt. Writes
    are atomic (copy to a temporary file, then rename), so actors sharing the
    directory never read a half-written map."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        os.makedirs(cache_dir, exist_ok=True)

    def _path(self, key: str) -> str | None:
        if not key or os.path.basename(key) != key or key.startswith("."):
            return None  # not a plain file name: never cache outside the directory
        return os.path.join(self.cache_dir, key)

    def fetch(self, key: str, pk3_path: str) -> bool:
        path = self._path(key)
        if path is None or not os.path.isfile(path):
            return False
        shutil.copyfile(path, pk3_path)
        return True

    def write(self, key: str, pk3_path: str) -> None:
        path = self._path(key)
        if path is None or os.path.isfile(path):
            return
        with open(pk3_path, "rb") as src:
            files.write_atomically(path, lambda out: shutil.copyfileobj(src, out), binary=True)


class DmLabEnvironment(EpisodicEnvironment):
    """Auto-resetting DeepMind Lab environment (see impala.envs.StepOutput)."""

    num_actions = len(ACTION_SET)
    observation_dtype = np.dtype(np.uint8)
    instruction_length = MAX_INSTRUCTION_WORDS

    def __init__(
        self,
        level_name: str,
        *,
        seed: int,
        num_action_repeats: int = 4,
        training: bool = True,
        width: int = WIDTH,
        height: int = HEIGHT,
        level_cache_dir: str = "",
        dataset_path: str = "",
        renderer: str = "software",
    ) -> None:
        if num_action_repeats < 1:
            raise ValueError(f"num_action_repeats must be >= 1, got {num_action_repeats}")
        if width < 1 or height < 1:
            raise ValueError(f"DeepMind Lab observations need a positive size, got {width}x{height}")
        if renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
        deepmind_lab = import_engine()
        self.level = level_path(level_name)
        self.observation_shape = (3, int(height), int(width))
        self._repeats = int(num_action_repeats)
        self._random = np.random.RandomState(seed)  # draws each episode's seed
        config = {"width": str(int(width)), "height": str(int(height)), "logLevel": "WARN"}
        if dataset_path:
            config["datasetPath"] = str(dataset_path)
        if not training:
            config["allowHoldOutLevels"] = "true"
            config["mixerSeed"] = str(TEST_MIXER_SEED)
        cache = LevelCache(level_cache_dir) if level_cache_dir else None
        try:
            self._lab, self._observation_names = _open(deepmind_lab, self.level, config, renderer, cache)
        except (RuntimeError, ValueError) as e:  # the engine's error for an unknown level or option
            raise UnknownLevelError(
                f"DeepMind Lab cannot load level {self.level!r} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no message'}){_close_matches(level_name)}"
            )
        self._actions = [np.array(a, dtype=np.intc) for a in ACTION_SET]
        self._empty_instruction = np.zeros(self.instruction_length, np.int32)
        self._closed = False

    def _reset(self) -> None:
        self._lab.reset(seed=int(self._random.randint(0, 2**31 - 1)))

    def _observe(self) -> tuple[np.ndarray, np.ndarray]:
        observations = self._lab.observations()  # only valid while running: callers ensure it
        frame = np.asarray(observations["RGB_INTERLEAVED"])
        if frame.shape != (self.observation_shape[1], self.observation_shape[2], 3):
            raise RuntimeError(
                f"DeepMind Lab gave RGB_INTERLEAVED of shape {frame.shape}, expected "
                f"{(self.observation_shape[1], self.observation_shape[2], 3)}"
            )
        image = np.ascontiguousarray(frame.transpose(2, 0, 1), dtype=np.uint8)  # HWC -> CHW, a copy
        if "INSTR" in self._observation_names:  # empty text on levels without instructions
            instruction = tokenize(observations["INSTR"], self.instruction_length)
        else:
            instruction = self._empty_instruction.copy()
        return image, instruction

    def _begin(self) -> tuple[np.ndarray, np.ndarray]:
        if self._closed:
            raise RuntimeError("the environment is closed")
        self._reset()
        return self._observe()

    def _advance(self, action: int) -> tuple[float, bool, np.ndarray, np.ndarray]:
        reward = float(self._lab.step(self._actions[action], num_steps=self._repeats))
        done = not self._lab.is_running()
        if done:
            self._reset()  # the episode ended: observations() is valid again only after a reset
        return (reward, done, *self._observe())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._started = False  # step() now refuses, as before initial()
            self._lab.close()


def _open(
    deepmind_lab: Any, level: str, config: dict[str, str], renderer: str, cache: LevelCache | None
) -> tuple[Any, list[str]]:
    """The engine's Lab for `level` and the observations it was given: RGB_INTERLEAVED
    and INSTR, as the original requests on every level (DeepMind Lab provides INSTR on
    all of them, empty where a level gives no instruction). Should an engine not know
    INSTR for a level (Lab raises ValueError naming an unknown observation), the level
    is opened without it and its instructions are empty."""
    names = ["RGB_INTERLEAVED", "INSTR"]
    try:
        return deepmind_lab.Lab(level, list(names), config=config, renderer=renderer, level_cache=cache), names
    except ValueError as e:
        if "INSTR" not in str(e):
            raise
    names.remove("INSTR")
    return deepmind_lab.Lab(level, list(names), config=config, renderer=renderer, level_cache=cache), names


def _close_matches(level_name: str) -> str:
    import difflib

    name = dmlab30.short_name(level_name[len("dmlab:") :] if level_name.startswith("dmlab:") else level_name)
    matches = difflib.get_close_matches(name, sorted(dmlab30.ALL_LEVELS), n=3)
    return f"; did you mean {', '.join(matches)}?" if matches else ""
