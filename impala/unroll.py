"""Unrolls: what an actor sends and the learner trains on.

An unroll of length T holds T + 1 time steps of n environments, time-major: one
array [T+1, n, ...] per field of a step (impala/step.py says which fields there
are, their dtypes and shapes, and which come from the environment and which from
the agent), plus the agent's core state before step 0:

  <step field>    [T+1, n, *shape]  see impala/step.py
  core_state_k    [n, H] f32        agent core state before step 0 (LSTM h, c)

As in the original, step 0 repeats the last step of the previous unroll, so the
learner sees every transition once: it runs the network over all T + 1 env
outputs from the initial core state, learns from transitions 0..T-1 and
bootstraps from the value at step T.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from impala import step

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

    The time-major arrays are impala/step.py's fields; `instruction_length` > 0
    adds the 'instruction' array (DMLab), 0 leaves it out."""
    steps = unroll_length + 1
    layout = step.EnvSpec(tuple(observation_shape), np.dtype(observation_dtype), num_actions, instruction_length)
    spec = {name: (f.dtype, (steps, *f.shape), True) for name, f in step.fields(layout).items()}
    for k, size in enumerate(state_sizes):
        spec[f"core_state_{k}"] = (np.dtype(np.float32), (size,), False)
    return spec


def spec_of(unroll_length: int, env: step.EnvSpec, state_sizes: Sequence[int] = ()) -> dict:
    """`unroll_spec` for environments like `env`."""
    return unroll_spec(
        unroll_length,
        env.observation_shape,
        env.observation_dtype,
        env.num_actions,
        state_sizes,
        instruction_length=env.instruction_length,
    )


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
            raise UnrollError(f"unroll '{name}' is {array.dtype}{list(array.shape)}, expected {dtype}{list(expected)}")
    return num_envs
