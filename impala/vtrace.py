"""V-trace off-policy actor-critic targets (Espeholt et al. 2018, section 4.1).

Port of scalable_agent's ``vtrace.py`` to torch, keeping its function names,
keyword arguments and return tuples. All tensors are time-major: ``[T, B, ...]``.

For a trajectory of length T, with rho_t = min(rho_bar, pi(a_t|x_t)/mu(a_t|x_t)),
c_i = min(1, pi/mu) and delta_t = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)):

    v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i c_i) delta_t

computed here by the equivalent backward recursion
v_s - V(x_s) = delta_s + gamma_s c_s (v_{s+1} - V(x_{s+1})).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "VTraceReturns",
    "VTraceFromLogitsReturns",
    "action_log_probs",
    "from_logits",
    "from_importance_weights",
]


class VTraceReturns(NamedTuple):
    vs: torch.Tensor  # [T, B] V-trace value targets, no gradient.
    pg_advantages: torch.Tensor  # [T, B] policy-gradient advantages, no gradient.


class VTraceFromLogitsReturns(NamedTuple):
    vs: torch.Tensor  # [T, B], no gradient.
    pg_advantages: torch.Tensor  # [T, B], no gradient.
    log_rhos: torch.Tensor  # [T, B] log(pi/mu) of the taken actions.
    behaviour_action_log_probs: torch.Tensor  # [T, B]
    target_action_log_probs: torch.Tensor  # [T, B], differentiable w.r.t. target logits.


def action_log_probs(policy_logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-probability of each taken action.

    Args:
      policy_logits: [..., A] unnormalised log-probabilities (usually [T, B, A]).
      actions: [...] integer action indices (usually [T, B]).

    Returns:
      [...] log pi(actions), in the dtype of ``policy_logits`` and differentiable
      w.r.t. it.
    """
    if policy_logits.dim() < 1 or actions.dim() != policy_logits.dim() - 1:
        raise ValueError(
            f"actions must have rank policy_logits.dim() - 1; got logits shape "
            f"{tuple(policy_logits.shape)} and actions shape {tuple(actions.shape)}"
        )
    if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
        raise ValueError(f"actions must be an integer tensor, got {actions.dtype}")
    log_probs = F.log_softmax(policy_logits, dim=-1)
    return log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def from_logits(
    behaviour_policy_logits: torch.Tensor,
    target_policy_logits: torch.Tensor,
    actions: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: Optional[float] = 1.0,
    clip_pg_rho_threshold: Optional[float] = 1.0,
) -> VTraceFromLogitsReturns:
    """V-trace for softmax policies given as logits.

    Args:
      behaviour_policy_logits: [T, B, A] logits of the actor (mu) policy.
      target_policy_logits: [T, B, A] logits of the learner (pi) policy.
      actions: [T, B] integer actions sampled from mu.
      discounts: [T, B] per-step discount (0 where the episode ended).
      rewards: [T, B] (clipped) rewards.
      values: [T, B] learner baseline V(x_t).
      bootstrap_value: [B] V(x_T).
      clip_rho_threshold: rho_bar for the value targets; None disables clipping.
      clip_pg_rho_threshold: clipping of rho in the pg advantages; None disables.

    Returns:
      VTraceFromLogitsReturns; ``vs`` and ``pg_advantages`` carry no gradient,
      ``target_action_log_probs`` (and ``log_rhos``) keep the graph to
      ``target_policy_logits``.
    """
    if behaviour_policy_logits.dim() != 3:
        raise ValueError(
            f"behaviour_policy_logits must have rank 3 [T, B, A], got shape "
            f"{tuple(behaviour_policy_logits.shape)}"
        )
    if target_policy_logits.dim() != 3:
        raise ValueError(
            f"target_policy_logits must have rank 3 [T, B, A], got shape "
            f"{tuple(target_policy_logits.shape)}"
        )
    if actions.dim() != 2:
        raise ValueError(f"actions must have rank 2 [T, B], got shape {tuple(actions.shape)}")
    if behaviour_policy_logits.shape != target_policy_logits.shape:
        raise ValueError(
            f"behaviour and target logits shapes differ: {tuple(behaviour_policy_logits.shape)} "
            f"vs {tuple(target_policy_logits.shape)}"
        )

    target_action_log_probs = action_log_probs(target_policy_logits, actions)
    behaviour_action_log_probs = action_log_probs(behaviour_policy_logits, actions)
    log_rhos = target_action_log_probs - behaviour_action_log_probs
    vtrace_returns = from_importance_weights(
        log_rhos=log_rhos,
        discounts=discounts,
        rewards=rewards,
        values=values,
        bootstrap_value=bootstrap_value,
        clip_rho_threshold=clip_rho_threshold,
        clip_pg_rho_threshold=clip_pg_rho_threshold,
    )
    return VTraceFromLogitsReturns(
        log_rhos=log_rhos,
        behaviour_action_log_probs=behaviour_action_log_probs,
        target_action_log_probs=target_action_log_probs,
        **vtrace_returns._asdict(),
    )


def _check_rank(name: str, x: torch.Tensor, rank: int) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


def _check_threshold(name: str, threshold: Optional[float]) -> None:
    if threshold is None:
        return
    if isinstance(threshold, torch.Tensor) and threshold.dim() != 0:
        raise ValueError(f"{name} must be a scalar or None, got shape {tuple(threshold.shape)}")


def _clip(rhos: torch.Tensor, threshold: Optional[float]) -> torch.Tensor:
    if threshold is None:
        return rhos
    if isinstance(threshold, torch.Tensor):
        return torch.minimum(threshold.to(rhos), rhos)
    return torch.clamp(rhos, max=float(threshold))


def from_importance_weights(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: Optional[float] = 1.0,
    clip_pg_rho_threshold: Optional[float] = 1.0,
) -> VTraceReturns:
    """V-trace targets from log importance weights log(pi(a_t|x_t) / mu(a_t|x_t)).

    Args:
      log_rhos: [T, B] log importance weights of the taken actions.
      discounts: [T, B] per-step discount (0 where the episode ended).
      rewards: [T, B] rewards.
      values: [T, B] baseline V(x_t).
      bootstrap_value: [B] V(x_T).
      clip_rho_threshold: rho_bar; None disables clipping.
      clip_pg_rho_threshold: clipping for the pg advantage rhos; None disables.

    Trailing batch dimensions beyond B are allowed, as in the original
    ([T, B, ...] with bootstrap_value [B, ...]).

    Returns:
      VTraceReturns(vs [T, B], pg_advantages [T, B]) without gradient, in the
      promoted floating dtype of the inputs (the input dtype when they agree).
    """
    rho_rank = log_rhos.dim()
    if rho_rank < 1:
        raise ValueError(f"log_rhos must have rank >= 1 ([T, B]), got shape {tuple(log_rhos.shape)}")
    _check_rank("values", values, rho_rank)
    _check_rank("bootstrap_value", bootstrap_value, rho_rank - 1)
    _check_rank("discounts", discounts, rho_rank)
    _check_rank("rewards", rewards, rho_rank)
    _check_threshold("clip_rho_threshold", clip_rho_threshold)
    _check_threshold("clip_pg_rho_threshold", clip_pg_rho_threshold)
    for name, x in (("discounts", discounts), ("rewards", rewards), ("values", values)):
        if x.shape != log_rhos.shape:
            raise ValueError(
                f"{name} shape {tuple(x.shape)} must equal log_rhos shape {tuple(log_rhos.shape)}"
            )
    if bootstrap_value.shape != log_rhos.shape[1:]:
        raise ValueError(
            f"bootstrap_value shape {tuple(bootstrap_value.shape)} must equal log_rhos.shape[1:] "
            f"= {tuple(log_rhos.shape[1:])}"
        )

    out_dtype = log_rhos.dtype
    for x in (discounts, rewards, values, bootstrap_value):
        out_dtype = torch.promote_types(out_dtype, x.dtype)
    if not out_dtype.is_floating_point:
        raise ValueError(f"V-trace inputs must be floating point, got promoted dtype {out_dtype}")
    # Accumulate half precision in float32: the T-step recursion loses too
    # many bits in float16/bfloat16.
    work_dtype = torch.float32 if torch.finfo(out_dtype).bits < 32 else out_dtype

    with torch.no_grad():
        log_rhos, discounts, rewards, values, bootstrap_value = (
            x.to(work_dtype)
            for x in (log_rhos, discounts, rewards, values, bootstrap_value)
        )
        rhos = torch.exp(log_rhos)
        clipped_rhos = _clip(rhos, clip_rho_threshold)
        cs = torch.clamp(rhos, max=1.0)
        values_t_plus_1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)

        # Backward scan, as tf.scan(reverse=True) in the original.
        acc = torch.zeros_like(bootstrap_value)
        vs_minus_v_xs = []
        for t in reversed(range(log_rhos.shape[0])):
            acc = deltas[t] + discounts[t] * cs[t] * acc
            vs_minus_v_xs.append(acc)
        vs_minus_v_xs.reverse()
        vs = torch.stack(vs_minus_v_xs, dim=0) + values if vs_minus_v_xs else values.clone()

        vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        clipped_pg_rhos = _clip(rhos, clip_pg_rho_threshold)
        pg_advantages = clipped_pg_rhos * (rewards + discounts * vs_t_plus_1 - values)

    return VTraceReturns(vs=vs.to(out_dtype), pg_advantages=pg_advantages.to(out_dtype))
