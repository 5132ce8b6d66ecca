"""IMPALA learner loss terms, as in scalable_agent's experiment.py.

Every term is a sum over time and batch (not a mean), so ``baseline_cost`` and
``entropy_cost`` keep the meaning and scale they have in the paper's configs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from impala import vtrace
from impala.config import REWARD_CLIPPING_MODES

__all__ = [
    "REWARD_CLIPPING_MODES",
    "LossOutput",
    "baseline_loss",
    "clip_rewards",
    "entropy_loss",
    "impala_loss",
    "policy_gradient_loss",
    "vtrace_diagnostics",
]


def policy_gradient_loss(logits: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """sum_t,b -log pi(a_t|x_t) * A_t, with the advantages treated as constants.

    Args:
      logits: [T, B, A] target policy logits.
      actions: [T, B] integer actions.
      advantages: [T, B] (V-trace pg advantages).

    Returns:
      Scalar loss.
    """
    cross_entropy = -vtrace.log_probs_from_logits_and_actions(logits, actions)
    return torch.sum(cross_entropy * advantages.detach())


def baseline_loss(advantages: torch.Tensor) -> torch.Tensor:
    """0.5 * sum(advantages**2), so d loss / d baseline = -(vs - baseline).

    Args:
      advantages: [T, B] value-target errors ``vs - baseline``.

    Returns:
      Scalar loss.
    """
    return 0.5 * torch.sum(advantages**2)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Negative total policy entropy: sum_t,b sum_a pi log pi.

    Args:
      logits: [T, B, A] policy logits.

    Returns:
      Scalar loss (minimising it maximises entropy).
    """
    policy = F.softmax(logits, dim=-1)
    log_policy = F.log_softmax(logits, dim=-1)
    return torch.sum(policy * log_policy)


def clip_rewards(rewards: torch.Tensor, mode: str) -> torch.Tensor:
    """Reward clipping as in experiment.py's --reward_clipping flag.

    Args:
      rewards: tensor of any shape.
      mode: one of REWARD_CLIPPING_MODES. 'soft_asymmetric' squashes with
        5*tanh(r/5) and scales negative rewards by 0.3 (the paper's DMLab setting).

    Returns:
      Tensor of the same shape and dtype.
    """
    if mode == "abs_one":
        return torch.clamp(rewards, -1.0, 1.0)
    if mode == "soft_asymmetric":
        squeezed = torch.tanh(rewards / 5.0)
        # Negative rewards are given less weight than positive rewards.
        return torch.where(rewards < 0, 0.3 * squeezed, squeezed) * 5.0
    if mode == "none":
        return rewards
    raise ValueError(f"Unknown reward clipping mode {mode!r}; valid modes: {REWARD_CLIPPING_MODES}")


class LossOutput(NamedTuple):
    total: torch.Tensor  # scalar, the quantity to backpropagate.
    policy_gradient: torch.Tensor  # scalar
    baseline: torch.Tensor  # scalar, before baseline_cost.
    entropy: torch.Tensor  # scalar, before entropy_cost.
    vtrace_returns: vtrace.VTraceFromLogitsReturns
    diagnostics: dict | None = None  # vtrace_diagnostics(...), scalars without gradient


def vtrace_diagnostics(
    vtrace_returns: vtrace.VTraceFromLogitsReturns,
    values: torch.Tensor,
    clip_rho_threshold: float | None,
    clip_pg_rho_threshold: float | None,
) -> dict[str, torch.Tensor]:
    """How far off-policy a batch is (not in the original; for the metrics).

    Args:
      vtrace_returns: from vtrace, for [T, B] steps.
      values: [T, B] the baseline the targets are compared with.
      clip_rho_threshold, clip_pg_rho_threshold: as given to V-trace (None: no clipping).

    Returns:
      Scalars: the mean importance weight pi/mu of the taken actions, the fraction
      of them clipped by rho-bar and by the policy gradient's rho-bar, and the mean
      |vs - value|.
    """
    with torch.no_grad():
        rhos = torch.exp(vtrace_returns.log_rhos)

        def clipped(threshold: float | None) -> torch.Tensor:
            return (rhos > threshold).float().mean() if threshold is not None else torch.zeros((), device=rhos.device)

        rho_clipped = clipped(clip_rho_threshold)
        return {
            "vtrace/mean_rho": rhos.mean(),
            "vtrace/rho_clipped": rho_clipped,
            "vtrace/pg_rho_clipped": (
                rho_clipped if clip_pg_rho_threshold == clip_rho_threshold else clipped(clip_pg_rho_threshold)
            ),
            "vtrace/mean_abs_vs_minus_value": (vtrace_returns.vs - values).abs().mean(),
        }


def impala_loss(
    *,
    target_logits: torch.Tensor,
    baseline: torch.Tensor,
    bootstrap_value: torch.Tensor,
    behaviour_logits: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    baseline_cost: float,
    entropy_cost: float,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    vtrace_lambda: float = 1.0,
) -> LossOutput:
    """Full IMPALA learner loss.

    Args:
      target_logits: [T, B, A] learner policy logits (receives gradient).
      baseline: [T, B] learner values V(x_t) (receives gradient).
      bootstrap_value: [B] V(x_T); only used inside the (constant) V-trace targets.
      behaviour_logits: [T, B, A] actor policy logits.
      actions: [T, B] integer actions taken by the actors.
      rewards: [T, B] rewards, already clipped.
      discounts: [T, B] per-step discount (0 at episode ends).
      baseline_cost, entropy_cost: weights of the baseline and entropy terms.
      clip_rho_threshold, clip_pg_rho_threshold: V-trace clipping; None disables.
      vtrace_lambda: V-trace's lambda (1: the original's V-trace).

    Returns:
      LossOutput with the weighted total and the unweighted terms.
    """
    vtrace_returns = vtrace.from_logits(
        behaviour_policy_logits=behaviour_logits,
        target_policy_logits=target_logits,
        actions=actions,
        discounts=discounts,
        rewards=rewards,
        values=baseline,
        bootstrap_value=bootstrap_value,
        clip_rho_threshold=clip_rho_threshold,
        clip_pg_rho_threshold=clip_pg_rho_threshold,
        lambda_=vtrace_lambda,
    )
    pg = policy_gradient_loss(target_logits, actions, vtrace_returns.pg_advantages)
    # vs is a constant target (from_importance_weights returns it detached).
    bl = baseline_loss(vtrace_returns.vs - baseline)
    ent = entropy_loss(target_logits)
    total = pg + baseline_cost * bl + entropy_cost * ent
    return LossOutput(
        total=total,
        policy_gradient=pg,
        baseline=bl,
        entropy=ent,
        vtrace_returns=vtrace_returns,
        diagnostics={
            **vtrace_diagnostics(vtrace_returns, baseline, clip_rho_threshold, clip_pg_rho_threshold),
            # The policy's mean entropy per step in nats (ent sums over T x B): how far
            # from uniform it is, whatever the batch size (log |A| is uniform).
            "entropy": -ent.detach() / actions.numel(),
        },
    )
