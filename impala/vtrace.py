"""V-trace off-policy actor-critic targets (Espeholt et al. 2018, section 4.1).

A port of scalable_agent's ``vtrace.py`` to torch with the original's public API:
the names ``log_probs_from_logits_and_actions``, ``from_logits`` and
``from_importance_weights``, their keyword arguments (``name=`` is accepted and
ignored: torch has no name scopes), the returned namedtuples with the original's
fields, and its input rules:

- Lists and NumPy arrays are converted as the original's ``tf.convert_to_tensor``
  converts them: floats to float32, actions to integers. Torch tensors keep their
  dtype (float16/bfloat16/float32/float64; half precision is accumulated in float32).
- Only ranks are checked up front, as in the original: ``log_rhos``, ``discounts``,
  ``rewards`` and ``values`` of one rank R, ``bootstrap_value`` of rank R - 1. Their
  shapes then only have to broadcast, so ``log_rhos``/``discounts`` of [T, B, 1]
  work against ``rewards``/``values`` of [T, B, C] (the original's
  ``test_higher_rank_inputs_for_importance_weights``). Shapes that the original's
  ops (concat, broadcasting, the scan over T) would reject raise ValueError here too.

All tensors are time-major. For a trajectory of length T, with rho_t =
min(rho_bar, pi(a_t|x_t)/mu(a_t|x_t)), c_i = lambda min(1, pi/mu) and
delta_t = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)):

    v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i c_i) delta_t

computed by the equivalent backward recursion (the original's reverse tf.scan)
v_s - V(x_s) = delta_s + gamma_s c_s (v_{s+1} - V(x_{s+1})).

Beyond the original: ``lambda_`` (keyword only in practice: it comes after
``name``, so the original's positional order stands). The original is lambda = 1,
the default. Below 1 it shortens the traces as Retrace(lambda)'s lambda does,
trading bias towards the baseline for less variance, and the policy gradient's
target bootstraps from lambda v_{s+1} + (1 - lambda) V(x_{s+1}): DeepMind's later
rlax.vtrace_td_error_and_advantage defines both so.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "VTraceFromLogitsReturns",
    "VTraceReturns",
    "from_importance_weights",
    "from_logits",
    "log_probs_from_logits_and_actions",
]

# The original's namedtuples, field for field: vs and pg_advantages [T, B] carry no
# gradient; log_rhos and target_action_log_probs keep the graph to the target logits.
VTraceFromLogitsReturns = collections.namedtuple(
    "VTraceFromLogitsReturns",
    ["vs", "pg_advantages", "log_rhos", "behaviour_action_log_probs", "target_action_log_probs"],
)
VTraceReturns = collections.namedtuple("VTraceReturns", "vs pg_advantages")

ArrayLike = Any  # a torch.Tensor, a NumPy array, a (nested) list or a Python number


def _device_of(*xs: ArrayLike) -> torch.device | None:
    return next((x.device for x in xs if isinstance(x, torch.Tensor)), None)


def _as_float(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    """A torch tensor stays as it is; anything else becomes float32, as the original's
    tf.convert_to_tensor(x, dtype=tf.float32)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)


def _as_actions(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    """Integer actions, as the original's tf.convert_to_tensor(x, dtype=tf.int32): a NumPy
    array is cast (astype, as TensorFlow does), a list must hold integers, a tensor must
    be of an integer dtype."""
    if isinstance(x, (np.ndarray, np.generic)):
        return torch.as_tensor(np.asarray(x).astype(np.int32), device=device)
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"actions must be integers, got {t.dtype}")
    return t


def _assert_rank(name: str, x: torch.Tensor, rank: int) -> None:
    # The original's x.shape.assert_has_rank(rank); its message says "must have rank".
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


def log_probs_from_logits_and_actions(policy_logits: ArrayLike, actions: ArrayLike) -> torch.Tensor:
    """Log-probability of each taken action under a softmax policy.

    Args:
      policy_logits: [T, B, NUM_ACTIONS] unnormalised log-probabilities.
      actions: [T, B] integer actions.

    Returns:
      [T, B] log pi(actions), in the dtype of ``policy_logits`` and differentiable
      w.r.t. it.
    """
    device = _device_of(policy_logits, actions)
    policy_logits = _as_float(policy_logits, device)
    actions = _as_actions(actions, device)
    _assert_rank("policy_logits", policy_logits, 3)
    _assert_rank("actions", actions, 2)
    if policy_logits.shape[:2] != actions.shape:  # sparse_softmax_cross_entropy's own check
        raise ValueError(
            f"policy_logits [T, B, A] of shape {tuple(policy_logits.shape)} do not match "
            f"actions [T, B] of shape {tuple(actions.shape)}"
        )
    log_probs = F.log_softmax(policy_logits, dim=-1)
    return log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def from_logits(
    behaviour_policy_logits: ArrayLike,
    target_policy_logits: ArrayLike,
    actions: ArrayLike,
    discounts: ArrayLike,
    rewards: ArrayLike,
    values: ArrayLike,
    bootstrap_value: ArrayLike,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    name: str = "vtrace_from_logits",
    lambda_: float = 1.0,
) -> VTraceFromLogitsReturns:
    """V-trace for softmax policies given as logits.

    Args:
      behaviour_policy_logits: [T, B, NUM_ACTIONS] logits of the actor (mu) policy.
      target_policy_logits: [T, B, NUM_ACTIONS] logits of the learner (pi) policy.
      actions: [T, B] integer actions sampled from mu.
      discounts: [T, B] per-step discount (0 where the episode ended).
      rewards: [T, B] (clipped) rewards.
      values: [T, B] learner baseline V(x_t).
      bootstrap_value: [B] V(x_T).
      clip_rho_threshold: rho_bar for the value targets; None disables clipping.
      clip_pg_rho_threshold: clipping of rho in the pg advantages; None disables.
      name: accepted for the original's signature and ignored.
      lambda_: the traces' lambda in [0, 1] (not in the original; 1 is the original).

    Returns:
      VTraceFromLogitsReturns(vs, pg_advantages, log_rhos, behaviour_action_log_probs,
      target_action_log_probs), each [T, B]; ``vs`` and ``pg_advantages`` carry no
      gradient, ``target_action_log_probs`` (and ``log_rhos``) keep the graph to
      ``target_policy_logits``.
    """
    del name
    device = _device_of(
        behaviour_policy_logits, target_policy_logits, actions, discounts, rewards, values, bootstrap_value
    )
    behaviour_policy_logits = _as_float(behaviour_policy_logits, device)
    target_policy_logits = _as_float(target_policy_logits, device)
    actions = _as_actions(actions, device)
    # Ranks checked here, the rest by from_importance_weights (as the original does).
    _assert_rank("behaviour_policy_logits", behaviour_policy_logits, 3)
    _assert_rank("target_policy_logits", target_policy_logits, 3)
    _assert_rank("actions", actions, 2)

    target_action_log_probs = log_probs_from_logits_and_actions(target_policy_logits, actions)
    behaviour_action_log_probs = log_probs_from_logits_and_actions(behaviour_policy_logits, actions)
    log_rhos = target_action_log_probs - behaviour_action_log_probs
    vtrace_returns = from_importance_weights(
        log_rhos=log_rhos,
        discounts=discounts,
        rewards=rewards,
        values=values,
        bootstrap_value=bootstrap_value,
        clip_rho_threshold=clip_rho_threshold,
        clip_pg_rho_threshold=clip_pg_rho_threshold,
        lambda_=lambda_,
    )
    return VTraceFromLogitsReturns(
        log_rhos=log_rhos,
        behaviour_action_log_probs=behaviour_action_log_probs,
        target_action_log_probs=target_action_log_probs,
        **vtrace_returns._asdict(),
    )


def _threshold(name: str, threshold: Any) -> torch.Tensor | float | None:
    """None, a Python number, or a rank-0 tensor (the original asserts rank 0)."""
    if threshold is None or isinstance(threshold, (int, float)):
        return threshold
    t = threshold if isinstance(threshold, torch.Tensor) else torch.as_tensor(np.asarray(threshold, np.float32))
    _assert_rank(name, t, 0)
    return t


def _clip(rhos: torch.Tensor, threshold: torch.Tensor | float | None) -> torch.Tensor:
    if threshold is None:
        return rhos
    if isinstance(threshold, torch.Tensor):
        return torch.minimum(threshold.to(rhos), rhos)
    return torch.clamp(rhos, max=float(threshold))


def from_importance_weights(
    log_rhos: ArrayLike,
    discounts: ArrayLike,
    rewards: ArrayLike,
    values: ArrayLike,
    bootstrap_value: ArrayLike,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    name: str = "vtrace_from_importance_weights",
    lambda_: float = 1.0,
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
      name: accepted for the original's signature and ignored.
      lambda_: the traces' lambda in [0, 1] (not in the original; 1 is the original).

    As in the original, all inputs may carry the same number of extra trailing
    dimensions ([T, B, C] with bootstrap_value [B, C]), and inputs whose shapes
    broadcast are accepted (log_rhos and discounts [T, B, 1] with rewards and values
    [T, B, C]).

    Returns:
      VTraceReturns(vs, pg_advantages) of the inputs' broadcast shape ([T, B]),
      without gradient, in the promoted floating dtype of the inputs.
    """
    del name
    device = _device_of(log_rhos, discounts, rewards, values, bootstrap_value)
    log_rhos, discounts, rewards, values, bootstrap_value = (
        _as_float(x, device) for x in (log_rhos, discounts, rewards, values, bootstrap_value)
    )
    clip_rho_threshold = _threshold("clip_rho_threshold", clip_rho_threshold)
    clip_pg_rho_threshold = _threshold("clip_pg_rho_threshold", clip_pg_rho_threshold)
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")

    # The original's rank checks.
    rho_rank = log_rhos.dim()  # usually 2
    if rho_rank < 1:
        raise ValueError(f"log_rhos must have rank >= 1 ([T, B]), got shape {tuple(log_rhos.shape)}")
    _assert_rank("values", values, rho_rank)
    _assert_rank("bootstrap_value", bootstrap_value, rho_rank - 1)
    _assert_rank("discounts", discounts, rho_rank)
    _assert_rank("rewards", rewards, rho_rank)
    # Shapes the original's ops reject (it checks them when the graph runs).
    shapes = {
        n: tuple(x.shape)
        for n, x in (("log_rhos", log_rhos), ("discounts", discounts), ("rewards", rewards), ("values", values))
    }
    try:
        full = tuple(torch.broadcast_shapes(*shapes.values()))
    except RuntimeError:
        raise ValueError(f"V-trace input shapes do not broadcast: {shapes}") from None
    if tuple(bootstrap_value.shape) != full[1:] or tuple(values.shape[1:]) != full[1:]:
        # concat([values[1:], bootstrap_value[None]]) and concat([vs[1:], ...]).
        raise ValueError(
            f"bootstrap_value of shape {tuple(bootstrap_value.shape)} and values of shape "
            f"{shapes['values']} must match the inputs' broadcast shape {full} after T"
        )
    if not log_rhos.shape[0] == discounts.shape[0] == full[0]:  # the scan runs over T in all three
        raise ValueError(f"log_rhos and discounts must have the full T = {full[0]}, got {shapes}")

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
            x.to(work_dtype) for x in (log_rhos, discounts, rewards, values, bootstrap_value)
        )
        rhos = torch.exp(log_rhos)
        clipped_rhos = _clip(rhos, clip_rho_threshold)
        cs = torch.clamp(rhos, max=1.0) * lambda_
        values_t_plus_1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)

        # Backward scan, as tf.scan(reverse=True) in the original.
        acc = torch.zeros_like(bootstrap_value)
        vs_minus_v_xs = []
        for t in reversed(range(full[0])):
            acc = deltas[t] + discounts[t] * cs[t] * acc
            vs_minus_v_xs.append(acc)
        vs_minus_v_xs.reverse()
        vs = torch.stack(vs_minus_v_xs, dim=0) + values if vs_minus_v_xs else values.expand(full).clone()

        vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        if lambda_ != 1.0:  # both end in V(x_T): the last step bootstraps as before
            vs_t_plus_1 = lambda_ * vs_t_plus_1 + (1.0 - lambda_) * values_t_plus_1
        clipped_pg_rhos = _clip(rhos, clip_pg_rho_threshold)
        pg_advantages = clipped_pg_rhos * (rewards + discounts * vs_t_plus_1 - values)

    return VTraceReturns(vs=vs.to(out_dtype), pg_advantages=pg_advantages.to(out_dtype))
