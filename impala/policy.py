"""The one way to call the agent on steps (impala/step.py names their fields).

Actors (lock-step and the actor host), evaluation and the learner all feed the
agent through `call_agent`, so which fields the agent reads, and that the step's
`action` is its last action, is said here only.

  - acting on step t of numpy step arrays (an unroll [T+1, n, ...], or any
    arrays indexed alike): `call_agent(agent, inputs_at(arrays, t), state)`,
    where `t` may be any numpy index (the actor host gathers rows with
    `(steps, envs)`), giving [1, n, ...] tensors;
  - learning on a batch of unrolls ([T+1, B, ...] tensors, named as in the
    unroll): `call_agent(agent, batch, initial_state)`; extra entries of the
    mapping (policy_logits, core states, ...) are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from impala.nets import Agent, AgentOutput, CoreState
from impala.step import AGENT_INPUTS


def inputs_at(arrays: Mapping[str, np.ndarray], index: Any) -> dict[str, torch.Tensor]:
    """The agent's inputs at `index` of numpy step arrays, as [1, ...] tensors
    (views where the index is a basic one, one gather where it is an array)."""
    return {name: torch.from_numpy(arrays[name][index])[None] for name in AGENT_INPUTS if name in arrays}


def call_agent(
    agent: Agent, steps: Mapping[str, torch.Tensor], core_state: CoreState | None
) -> tuple[AgentOutput, CoreState]:
    """Runs `agent` over time-major steps ([T, B, ...] tensors named as in
    impala/step.py: observation, reward, done, action = the last action, and
    instruction where the level has one) from `core_state` ([B, H] tensors)."""
    return agent(
        steps["observation"],
        steps["action"],
        steps["reward"],
        steps["done"],
        core_state,
        instruction=steps.get("instruction"),
    )
