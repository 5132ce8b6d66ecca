"""Unrolls: what an actor sends and the learner trains on.

An unroll of length T holds T + 1 time steps of n environments, time-major:

  observation     [T+1, n, *obs]  env output at step t (after auto-reset on done)
  reward          [T+1, n] f32    reward that came with that env output
  done            [T+1, n] bool   the step that produced it ended an episode
  episode_return  [T+1, n] f32    running return (the finished episode's at done)
  episode_step    [T+1, n] i32    running agent steps (likewise)
  action          [T+1, n] i64    action that led to that env output
  policy_logits   [T+1, n, A] f32 behaviour logits of that action
  core_state_k    [n, H]          agent core state before step 0 (LSTM h, c)
  instruction     [T+1, n, L] i32 word ids of the instruction that came with that
                                  env output (only for levels with instructions, L > 0)

As in the original, step 0 repeats the last step of the previous unroll, so the
learner sees every transition once: it runs the network over all T + 1 env
outputs from the initial core state, learns from transitions 0..T-1 and
bootstraps from the value at step T.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

Unroll = dict[str, np.ndarray]


class UnrollError(ValueError):
    """An unroll whose arrays do not match the expected layout."""


def unroll_spec(
    unroll_length: int,
    observation_shape: Sequence[int],
    observation_dtype: np.dtype | str,
    num_actions: int,
    state_sizes: Sequence[int] = (),
    instruction_length: int = 0,
) -> dict[str, tuple[np.dtype, tuple[int, ...], bool]]:
    """Layout of one unroll: name -> (dtype, shape without the env axis, time-major?).

    `instruction_length` > 0 adds the 'instruction' array (DMLab); 0 leaves it out."""
    steps = unroll_length + 1
    spec = {
        "observation": (np.dtype(observation_dtype), (steps, *observation_shape), True),
        "reward": (np.dtype(np.float32), (steps,), True),
        "done": (np.dtype(np.bool_), (steps,), True),
        "episode_return": (np.dtype(np.float32), (steps,), True),
        "episode_step": (np.dtype(np.int32), (steps,), True),
        "action": (np.dtype(np.int64), (steps,), True),
        "policy_logits": (np.dtype(np.float32), (steps, num_actions), True),
    }
    for k, size in enumerate(state_sizes):
        spec[f"core_state_{k}"] = (np.dtype(np.float32), (size,), False)
    if instruction_length > 0:
        spec["instruction"] = (np.dtype(np.int32), (steps, instruction_length), True)
    return spec


def new_unroll(spec: Mapping, num_envs: int) -> Unroll:
    """Zeroed arrays for `num_envs` environments."""
    out = {}
    for name, (dtype, shape, time_major) in spec.items():
        full = (shape[0], num_envs, *shape[1:]) if time_major else (num_envs, *shape)
        out[name] = np.zeros(full, dtype)
    return out


def next_unroll(spec: Mapping, previous: Unroll) -> Unroll:
    """Fresh arrays whose step 0 is the previous unroll's last step (the overlap).

    Fresh rather than reused, so the previous unroll can still be in flight on a
    zero-copy socket while the next one is written."""
    num_envs = previous["reward"].shape[1]
    out = new_unroll(spec, num_envs)
    for name, (_, _, time_major) in spec.items():
        if time_major:
            out[name][0] = previous[name][-1]
    return out


def validate(arrays: Mapping[str, np.ndarray], spec: Mapping) -> int:
    """Checks names, dtypes and shapes against `spec`; returns the number of envs."""
    if set(arrays) != set(spec):
        missing, extra = sorted(set(spec) - set(arrays)), sorted(set(arrays) - set(spec))
        raise UnrollError(f"unroll arrays differ from the expected ones: missing {missing}, unexpected {extra}")
    num_envs = arrays["reward"].shape[1] if arrays["reward"].ndim == 2 else -1
    if num_envs < 1:
        raise UnrollError(f"unroll 'reward' has shape {arrays['reward'].shape}, expected [T+1, n>=1]")
    for name, (dtype, shape, time_major) in spec.items():
        array = arrays[name]
        expected = (shape[0], num_envs, *shape[1:]) if time_major else (num_envs, *shape)
        if array.dtype != dtype or array.shape != expected:
            raise UnrollError(
                f"unroll '{name}' is {array.dtype}{list(array.shape)}, expected {dtype}{list(expected)}"
            )
    return num_envs
