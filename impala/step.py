"""One time step: the fields it has, where each comes from, and their layout.

Every place that holds steps derives its arrays from `fields()`: the unroll an
actor ships (impala/unroll.py), the env workers' shared memory
(impala/env_worker.py), the actor host, the lock-step actor, evaluation and the
benchmarks. Adding a field is a change here (and, for an environment field, in
`impala.envs.StepOutput`, which the environments fill).

  field           dtype      per env   from         meaning at step t
  observation     obs dtype  obs shape environment  env output t (after auto-reset on done)
  reward          f32        ()        environment  the reward that came with it
  done            bool       ()        environment  the step that produced it ended an episode
  episode_return  f32        ()        environment  running return (the finished episode's at done)
  episode_step    i32        ()        environment  running agent steps (likewise)
  instruction     i32        (L,)      environment  word ids of the instruction that came with it
                                                    (only on levels with instructions, L > 0)
  action          i64        ()        agent        the action that led to env output t
  policy_logits   f32        (A,)      agent        the behaviour logits of that action

The environment fields are exactly `impala.envs.StepOutput`'s (`write` copies one
into step arrays). The agent reads observation, reward, done, instruction and, as
its last action, `action` (AGENT_INPUTS; impala/policy.py calls it). Like
scalable_agent's StepOutput/AgentOutput pair, in one table.

This module does not import torch: the env workers use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from impala.envs import StepOutput, instruction_length

ENVIRONMENT, AGENT = "environment", "agent"
# The fields the agent reads at step t; `action` is its last action (the one that
# led to env output t). 'instruction' only where the step has it.
AGENT_INPUTS = ("observation", "reward", "done", "instruction", "action")


class Field(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]  # of one environment's value at one step
    source: str  # ENVIRONMENT or AGENT


@dataclass(frozen=True)
class EnvSpec:
    """What the step layout needs to know of an environment (picklable: env workers
    send it to their owner)."""

    observation_shape: tuple[int, ...]
    observation_dtype: np.dtype
    num_actions: int
    instruction_length: int = 0  # > 0: levels with instructions (DMLab)

    @classmethod
    def of(cls, env: Any) -> EnvSpec:
        return cls(
            tuple(env.observation_shape), np.dtype(env.observation_dtype), int(env.num_actions), instruction_length(env)
        )


def fields(spec: EnvSpec) -> dict[str, Field]:
    """The fields of a step on environments like `spec`, in the table's order."""
    out = {
        "observation": Field(np.dtype(spec.observation_dtype), tuple(spec.observation_shape), ENVIRONMENT),
        "reward": Field(np.dtype(np.float32), (), ENVIRONMENT),
        "done": Field(np.dtype(np.bool_), (), ENVIRONMENT),
        "episode_return": Field(np.dtype(np.float32), (), ENVIRONMENT),
        "episode_step": Field(np.dtype(np.int32), (), ENVIRONMENT),
    }
    if spec.instruction_length > 0:
        out["instruction"] = Field(np.dtype(np.int32), (spec.instruction_length,), ENVIRONMENT)
    out["action"] = Field(np.dtype(np.int64), (), AGENT)
    out["policy_logits"] = Field(np.dtype(np.float32), (spec.num_actions,), AGENT)
    return out


def environment_fields(spec: EnvSpec) -> tuple[str, ...]:
    """The names of the fields that come from the environment (StepOutput's)."""
    return tuple(name for name, field in fields(spec).items() if field.source == ENVIRONMENT)


def new_arrays(named: Mapping[str, Field], leading: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Zeroed arrays [*leading, *shape] for the given fields."""
    return {name: np.zeros((*leading, *f.shape), f.dtype) for name, f in named.items()}


def write(arrays: Mapping[str, np.ndarray], index: Any, output: StepOutput) -> None:
    """Copies an environment's output into `arrays[name][index]` for each of its
    fields that `arrays` has (no 'instruction' array: a level without them)."""
    for name in StepOutput._fields:
        if name in arrays:
            arrays[name][index] = getattr(output, name)
