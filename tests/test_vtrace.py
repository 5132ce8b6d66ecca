"""V-trace checked against an independent float64 numpy reading of the paper's definition,
and the original's own tests (scalable_agent vtrace_test.py) ported call for call."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from impala import vtrace


def _np_clip(x: np.ndarray, threshold):
    return x if threshold is None else np.minimum(threshold, x)


def reference_vtrace(log_rhos, discounts, rewards, values, bootstrap, clip_rho, clip_pg_rho, lam=1.0):
    """Direct (non-recursive) evaluation of Espeholt et al. eq. (1), plain loops.

    v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i c_i) rho_t delta_t,
    delta_t = r_t + gamma_t V(x_{t+1}) - V(x_t), V(x_T) = bootstrap; with `lam`
    (rlax's lambda_) c_i = lam min(1, pi/mu) and the policy gradient's target
    r_s + gamma_s (lam v_{s+1} + (1 - lam) V(x_{s+1})).
    """
    log_rhos, discounts, rewards, values, bootstrap = (
        np.asarray(x, dtype=np.float64) for x in (log_rhos, discounts, rewards, values, bootstrap)
    )
    T, B = log_rhos.shape
    is_ratio = np.exp(log_rhos)
    rho = _np_clip(is_ratio, clip_rho)
    c = lam * np.minimum(1.0, is_ratio)
    pg_rho = _np_clip(is_ratio, clip_pg_rho)
    v_ext = np.concatenate([values, bootstrap[None]], axis=0)  # V(x_0..x_T)

    vs = np.zeros((T, B))
    for b in range(B):
        for s in range(T):
            total = v_ext[s, b]
            for t in range(s, T):
                trace = 1.0
                for i in range(s, t):
                    trace *= discounts[i, b] * c[i, b]
                delta = rewards[t, b] + discounts[t, b] * v_ext[t + 1, b] - v_ext[t, b]
                total += trace * rho[t, b] * delta
            vs[s, b] = total

    vs_ext = np.concatenate([vs, bootstrap[None]], axis=0)
    pg_adv = np.zeros((T, B))
    for b in range(B):
        for s in range(T):
            target = lam * vs_ext[s + 1, b] + (1 - lam) * v_ext[s + 1, b]
            pg_adv[s, b] = pg_rho[s, b] * (rewards[s, b] + discounts[s, b] * target - values[s, b])
    return vs, pg_adv


def _random_inputs(rng: np.random.Generator, T: int, B: int, episode_ends: bool = False):
    # log_rhos spread over [-2.5, 2.5] so many rhos exceed 1 and clipping matters.
    log_rhos = rng.uniform(-2.5, 2.5, size=(T, B))
    discounts = rng.uniform(0.8, 1.0, size=(T, B))
    if episode_ends:
        discounts[rng.random(size=(T, B)) < 0.3] = 0.0
        discounts[T // 2, 0] = 0.0  # at least one episode end mid-unroll
    rewards = rng.normal(size=(T, B))
    values = rng.normal(size=(T, B))
    bootstrap = rng.normal(size=(B,))
    return log_rhos, discounts, rewards, values, bootstrap


def _t(x, dtype=torch.float64):
    return torch.as_tensor(np.asarray(x), dtype=dtype)


THRESHOLDS = [(1.0, 1.0), (None, None), (2.0, 0.5), (0.7, None), (None, 3.0)]


@pytest.mark.parametrize("T,B", [(1, 1), (1, 4), (5, 3), (9, 2)])
@pytest.mark.parametrize("clip_rho,clip_pg_rho", THRESHOLDS)
@pytest.mark.parametrize("episode_ends", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_from_importance_weights_matches_definition(T, B, clip_rho, clip_pg_rho, episode_ends, lam):
    rng = np.random.default_rng(zlib.crc32(repr((T, B, clip_rho, clip_pg_rho, episode_ends)).encode()))
    inputs = _random_inputs(rng, T, B, episode_ends)
    want_vs, want_pg = reference_vtrace(*inputs, clip_rho, clip_pg_rho, lam)

    got = vtrace.from_importance_weights(
        *(_t(x) for x in inputs),
        clip_rho_threshold=clip_rho,
        clip_pg_rho_threshold=clip_pg_rho,
        lambda_=lam,
    )
    assert isinstance(got, vtrace.VTraceReturns)
    np.testing.assert_allclose(got.vs.numpy(), want_vs, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.pg_advantages.numpy(), want_pg, rtol=1e-10, atol=1e-10)


def test_clipping_changes_the_result():
    # Guards against a test-data regime where thresholds are never active.
    rng = np.random.default_rng(0)
    inputs = _random_inputs(rng, 5, 3)
    args = [_t(x) for x in inputs]
    clipped = vtrace.from_importance_weights(*args)
    unclipped = vtrace.from_importance_weights(*args, clip_rho_threshold=None, clip_pg_rho_threshold=None)
    assert not torch.allclose(clipped.vs, unclipped.vs)
    assert not torch.allclose(clipped.pg_advantages, unclipped.pg_advantages)


def test_episode_end_cuts_the_trace():
    # With discount 0 at step k, v_s for s <= k must not depend on anything after k.
    rng = np.random.default_rng(1)
    log_rhos, discounts, rewards, values, bootstrap = _random_inputs(rng, 6, 2)
    discounts[2, :] = 0.0
    base = vtrace.from_importance_weights(*(_t(x) for x in (log_rhos, discounts, rewards, values, bootstrap)))
    rewards2, values2 = rewards.copy(), values.copy()
    rewards2[3:] += 10.0
    values2[3:] -= 7.0
    moved = vtrace.from_importance_weights(*(_t(x) for x in (log_rhos, discounts, rewards2, values2, bootstrap + 5.0)))
    torch.testing.assert_close(base.vs[:3], moved.vs[:3])
    torch.testing.assert_close(base.pg_advantages[:3], moved.pg_advantages[:3])


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 6),
    B=st.integers(1, 3),
    clip_rho=st.one_of(st.none(), st.floats(0.1, 5.0)),
    clip_pg_rho=st.one_of(st.none(), st.floats(0.1, 5.0)),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_from_importance_weights_property(T, B, clip_rho, clip_pg_rho, lam, seed):
    inputs = _random_inputs(np.random.default_rng(seed), T, B, episode_ends=seed % 2 == 0)
    want_vs, want_pg = reference_vtrace(*inputs, clip_rho, clip_pg_rho, lam)
    got = vtrace.from_importance_weights(
        *(_t(x) for x in inputs), clip_rho_threshold=clip_rho, clip_pg_rho_threshold=clip_pg_rho, lambda_=lam
    )
    np.testing.assert_allclose(got.vs.numpy(), want_vs, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.pg_advantages.numpy(), want_pg, rtol=1e-9, atol=1e-9)


def _on_policy(rewards, values, bootstrap, gamma, **kwargs) -> vtrace.VTraceReturns:
    """V-trace with pi = mu (every log rho 0) and a constant discount."""
    return vtrace.from_importance_weights(
        log_rhos=_t(np.zeros(rewards.shape)),
        discounts=_t(np.full(rewards.shape, gamma)),
        rewards=_t(rewards),
        values=_t(values),
        bootstrap_value=_t(bootstrap),
        **kwargs,
    )


def test_on_policy_vs_is_n_step_return():
    T, B, gamma = 5, 3, 0.9
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=(T, B))
    values = rng.normal(size=(T, B))
    bootstrap = rng.normal(size=(B,))
    # n-step return: sum_{t=s}^{T-1} gamma^(t-s) r_t + gamma^(T-s) V(x_T).
    want = np.zeros((T, B))
    for s in range(T):
        want[s] = sum(gamma ** (t - s) * rewards[t] for t in range(s, T)) + gamma ** (T - s) * bootstrap
    got = _on_policy(rewards, values, bootstrap, gamma)
    np.testing.assert_allclose(got.vs.numpy(), want, rtol=1e-12)
    next_vs = np.concatenate([want[1:], bootstrap[None]])
    np.testing.assert_allclose(got.pg_advantages.numpy(), rewards + gamma * next_vs - values, rtol=1e-12, atol=1e-12)


def test_lambda_zero_on_policy_is_the_one_step_target():
    # lambda_=0 cuts every trace: v_s = r_s + gamma V(x_{s+1}), and the policy
    # gradient's advantage is the one-step TD error (rlax's V-trace(lambda) at 0).
    T, B, gamma = 4, 2, 0.9
    rng = np.random.default_rng(3)
    rewards, values, bootstrap = rng.normal(size=(T, B)), rng.normal(size=(T, B)), rng.normal(size=(B,))
    next_values = np.concatenate([values[1:], bootstrap[None]])
    got = _on_policy(rewards, values, bootstrap, gamma, lambda_=0.0)
    one_step = rewards + gamma * next_values
    np.testing.assert_allclose(got.vs.numpy(), one_step, rtol=1e-12)
    np.testing.assert_allclose(got.pg_advantages.numpy(), one_step - values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam", [-0.1, 1.5])
def test_lambda_outside_zero_to_one_is_rejected(lam):
    args = [_t(np.zeros((2, 1)))] * 4 + [_t(np.zeros(1))]
    with pytest.raises(ValueError, match="lambda_ must be in"):
        vtrace.from_importance_weights(*args, lambda_=lam)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        m = max(row)
        out[idx] = row - (m + np.log(sum(np.exp(v - m) for v in row)))
    return out


@pytest.mark.parametrize("clip_rho,clip_pg_rho", [(1.0, 1.0), (None, None), (2.0, 0.5)])
def test_from_logits_matches_importance_weights(clip_rho, clip_pg_rho):
    T, B, A = 4, 3, 5
    rng = np.random.default_rng(3)
    behaviour_logits = rng.normal(scale=2.0, size=(T, B, A))
    target_logits = rng.normal(scale=2.0, size=(T, B, A))
    actions = rng.integers(0, A, size=(T, B))
    _, discounts, rewards, values, bootstrap = _random_inputs(rng, T, B, episode_ends=True)

    tb = np.arange(T)[:, None], np.arange(B)[None, :]
    want_target_lp = _np_log_softmax(target_logits)[tb[0], tb[1], actions]
    want_behaviour_lp = _np_log_softmax(behaviour_logits)[tb[0], tb[1], actions]
    want_log_rhos = want_target_lp - want_behaviour_lp
    want_vs, want_pg = reference_vtrace(want_log_rhos, discounts, rewards, values, bootstrap, clip_rho, clip_pg_rho)

    got = vtrace.from_logits(
        behaviour_policy_logits=_t(behaviour_logits),
        target_policy_logits=_t(target_logits),
        actions=torch.as_tensor(actions),
        discounts=_t(discounts),
        rewards=_t(rewards),
        values=_t(values),
        bootstrap_value=_t(bootstrap),
        clip_rho_threshold=clip_rho,
        clip_pg_rho_threshold=clip_pg_rho,
    )
    assert isinstance(got, vtrace.VTraceFromLogitsReturns)
    np.testing.assert_allclose(got.target_action_log_probs.numpy(), want_target_lp, rtol=1e-10)
    np.testing.assert_allclose(got.behaviour_action_log_probs.numpy(), want_behaviour_lp, rtol=1e-10)
    np.testing.assert_allclose(got.log_rhos.numpy(), want_log_rhos, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.vs.numpy(), want_vs, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got.pg_advantages.numpy(), want_pg, rtol=1e-9, atol=1e-10)


def test_log_probs_from_logits_and_actions():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 2, 4))
    actions = rng.integers(0, 4, size=(3, 2))
    got = vtrace.log_probs_from_logits_and_actions(_t(logits), torch.as_tensor(actions))
    lsm = _np_log_softmax(logits)
    want = np.array([[lsm[t, b, actions[t, b]] for b in range(2)] for t in range(3)])
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_outputs_carry_no_gradient():
    T, B, A = 3, 2, 4
    rng = np.random.default_rng(5)
    log_rhos, discounts, rewards, values, bootstrap = (_t(x).requires_grad_() for x in _random_inputs(rng, T, B))
    out = vtrace.from_importance_weights(log_rhos, discounts, rewards, values, bootstrap)
    assert not out.vs.requires_grad and not out.pg_advantages.requires_grad

    target = _t(rng.normal(size=(T, B, A))).requires_grad_()
    behaviour = _t(rng.normal(size=(T, B, A))).requires_grad_()
    out = vtrace.from_logits(
        behaviour,
        target,
        torch.as_tensor(rng.integers(0, A, size=(T, B))),
        discounts,
        rewards,
        values,
        bootstrap,
    )
    assert not out.vs.requires_grad and not out.pg_advantages.requires_grad
    # The target log-probs stay differentiable for the learner.
    assert out.target_action_log_probs.requires_grad
    out.target_action_log_probs.sum().backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    T, B, A = 5, 3, 4
    rng = np.random.default_rng(6)
    inputs = _random_inputs(rng, T, B, episode_ends=True)
    out = vtrace.from_importance_weights(*(_t(x, dtype) for x in inputs))
    assert out.vs.dtype == dtype and out.pg_advantages.dtype == dtype
    # Values agree with the float64 definition, up to the input rounding.
    rounded = [_t(x, dtype).double().numpy() for x in inputs]
    want_vs, want_pg = reference_vtrace(*rounded, 1.0, 1.0)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    np.testing.assert_allclose(out.vs.double().numpy(), want_vs, rtol=tol, atol=tol * 5)
    np.testing.assert_allclose(out.pg_advantages.double().numpy(), want_pg, rtol=tol, atol=tol * 5)

    _, discounts, rewards, values, bootstrap = (_t(x, dtype) for x in inputs)
    out = vtrace.from_logits(
        _t(rng.normal(size=(T, B, A)), dtype),
        _t(rng.normal(size=(T, B, A)), dtype),
        torch.as_tensor(rng.integers(0, A, size=(T, B))),
        discounts,
        rewards,
        values,
        bootstrap,
    )
    for x in out:
        assert x.dtype == dtype


def test_rank_validation():
    z = torch.zeros(4, 2)
    b = torch.zeros(2)
    with pytest.raises(ValueError, match="values"):
        vtrace.from_importance_weights(z, z, z, torch.zeros(4), b)
    with pytest.raises(ValueError, match="bootstrap_value"):
        vtrace.from_importance_weights(z, z, z, z, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="discounts"):
        vtrace.from_importance_weights(z, torch.zeros(4, 2, 1), z, z, b)
    with pytest.raises(ValueError, match="rewards"):
        vtrace.from_importance_weights(z, z, torch.zeros(3, 2), z, b)
    with pytest.raises(ValueError, match="log_rhos"):
        vtrace.from_importance_weights(torch.tensor(0.0), z, z, z, b)
    logits = torch.zeros(4, 2, 3)
    actions = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="behaviour_policy_logits"):
        vtrace.from_logits(z, logits, actions, z, z, z, b)
    with pytest.raises(ValueError, match="target_policy_logits"):
        vtrace.from_logits(logits, z, actions, z, z, z, b)
    with pytest.raises(ValueError, match="actions"):
        vtrace.from_logits(logits, logits, torch.zeros(4, dtype=torch.long), z, z, z, b)
    with pytest.raises(ValueError, match="integer"):
        vtrace.from_logits(logits, logits, z, z, z, z, b)
    with pytest.raises(ValueError, match="actions"):  # leading dims of logits and actions differ
        vtrace.log_probs_from_logits_and_actions(logits, torch.zeros(4, 3, dtype=torch.long))


# ---------------------------------------------------------------------------
# The original's tests (vtrace_test.py at scalable_agent 6c0c8a7), with the same calls:
# NumPy inputs, the original's names and keyword arguments, its ground truth.


def _shaped_arange(*shape):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(*shape)


def _softmax(logits):
    return np.exp(logits) / np.sum(np.exp(logits), axis=-1, keepdims=True)


def _ground_truth_calculation(
    discounts, log_rhos, rewards, values, bootstrap_value, clip_rho_threshold, clip_pg_rho_threshold
):
    """The original test's NumPy ground truth (it broadcasts, like the original)."""
    vs = []
    seq_len = len(discounts)
    rhos = np.exp(log_rhos)
    cs = np.minimum(rhos, 1.0)
    clipped_rhos = np.minimum(rhos, clip_rho_threshold) if clip_rho_threshold else rhos
    clipped_pg_rhos = np.minimum(rhos, clip_pg_rho_threshold) if clip_pg_rho_threshold else rhos
    values_t_plus_1 = np.concatenate([values, bootstrap_value[None, :]], axis=0)
    for s in range(seq_len):
        v_s = np.copy(values[s])
        for t in range(s, seq_len):
            v_s = v_s + (
                np.prod(discounts[s:t], axis=0)
                * np.prod(cs[s:t], axis=0)
                * clipped_rhos[t]
                * (rewards[t] + discounts[t] * values_t_plus_1[t + 1] - values[t])
            )
        vs.append(v_s)
    vs = np.stack(vs, axis=0)
    pg_advantages = clipped_pg_rhos * (
        rewards + discounts * np.concatenate([vs[1:], bootstrap_value[None, :]], axis=0) - values
    )
    return vtrace.VTraceReturns(vs=vs, pg_advantages=pg_advantages)


def test_returned_tuples_are_the_originals():
    assert vtrace.VTraceReturns._fields == ("vs", "pg_advantages")
    assert vtrace.VTraceFromLogitsReturns._fields == (
        "vs",
        "pg_advantages",
        "log_rhos",
        "behaviour_action_log_probs",
        "target_action_log_probs",
    )


@pytest.mark.parametrize("batch_size", [1, 2])
def test_original_log_probs_from_logits_and_actions(batch_size):
    seq_len, num_actions = 7, 3
    policy_logits = _shaped_arange(seq_len, batch_size, num_actions) + 10
    actions = np.random.default_rng(batch_size).integers(0, num_actions, size=(seq_len, batch_size), dtype=np.int32)
    got = vtrace.log_probs_from_logits_and_actions(policy_logits, actions)  # NumPy in, as the original
    action_index_mask = actions[..., None] == np.arange(num_actions)
    want = np.log(_softmax(policy_logits))[action_index_mask].reshape(seq_len, batch_size)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_original_vtrace(batch_size):
    seq_len = 5
    log_rhos = _shaped_arange(seq_len, batch_size) / (batch_size * seq_len)
    log_rhos = 5 * (log_rhos - 0.5)  # rho in about [0.08, 12.2): both thresholds clip
    values = {
        "log_rhos": log_rhos,
        "discounts": np.array([[0.9 / (b + 1) for b in range(batch_size)] for _ in range(seq_len)]),  # float64
        "rewards": _shaped_arange(seq_len, batch_size),
        "values": _shaped_arange(seq_len, batch_size) / batch_size,
        "bootstrap_value": _shaped_arange(batch_size) + 1.0,
        "clip_rho_threshold": 3.7,
        "clip_pg_rho_threshold": 2.2,
    }
    output = vtrace.from_importance_weights(**values, name="vtrace_test")
    assert isinstance(output, vtrace.VTraceReturns)
    assert output.vs.dtype == torch.float32  # converted as tf.convert_to_tensor(x, tf.float32)
    for want, got in zip(_ground_truth_calculation(**values), output):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_original_vtrace_from_logits(batch_size):
    seq_len, num_actions = 5, 3
    rng = np.random.default_rng(batch_size)
    values = {
        "behaviour_policy_logits": _shaped_arange(seq_len, batch_size, num_actions),
        "target_policy_logits": _shaped_arange(seq_len, batch_size, num_actions),
        "actions": rng.integers(0, num_actions - 1, size=(seq_len, batch_size)),
        "discounts": np.array([[0.9 / (b + 1) for b in range(batch_size)] for _ in range(seq_len)]),
        "rewards": _shaped_arange(seq_len, batch_size),
        "values": _shaped_arange(seq_len, batch_size) / batch_size,
        "bootstrap_value": _shaped_arange(batch_size) + 1.0,
    }
    output = vtrace.from_logits(clip_rho_threshold=None, clip_pg_rho_threshold=None, name="x", **values)
    assert isinstance(output, vtrace.VTraceFromLogitsReturns)

    target_log_probs = vtrace.log_probs_from_logits_and_actions(values["target_policy_logits"], values["actions"])
    behaviour_log_probs = vtrace.log_probs_from_logits_and_actions(values["behaviour_policy_logits"], values["actions"])
    log_rhos = target_log_probs - behaviour_log_probs
    from_iw = vtrace.from_importance_weights(
        log_rhos=log_rhos.numpy(),
        discounts=values["discounts"],
        rewards=values["rewards"],
        values=values["values"],
        bootstrap_value=values["bootstrap_value"],
        clip_rho_threshold=None,
        clip_pg_rho_threshold=None,
    )
    torch.testing.assert_close(output.vs, from_iw.vs)
    torch.testing.assert_close(output.pg_advantages, from_iw.pg_advantages)
    torch.testing.assert_close(output.behaviour_action_log_probs, behaviour_log_probs)
    torch.testing.assert_close(output.target_action_log_probs, target_log_probs)
    torch.testing.assert_close(output.log_rhos, log_rhos)


def test_original_higher_rank_inputs_for_importance_weights():
    """[T, B, 1] log_rhos and discounts broadcast against [T, B, 42] rewards and values."""
    rng = np.random.default_rng(7)
    T, B, C = 4, 3, 42
    inputs = {
        "log_rhos": rng.uniform(-2.5, 2.5, size=(T, B, 1)).astype(np.float32),
        "discounts": rng.uniform(0.8, 1.0, size=(T, B, 1)).astype(np.float32),
        "rewards": rng.normal(size=(T, B, C)).astype(np.float32),
        "values": rng.normal(size=(T, B, C)).astype(np.float32),
        "bootstrap_value": rng.normal(size=(B, C)).astype(np.float32),
    }
    output = vtrace.from_importance_weights(**inputs)
    assert output.vs.shape[-1] == 42 and output.vs.shape == output.pg_advantages.shape == (T, B, C)
    want = _ground_truth_calculation(**inputs, clip_rho_threshold=1.0, clip_pg_rho_threshold=1.0)
    np.testing.assert_allclose(output.vs.numpy(), want.vs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(output.pg_advantages.numpy(), want.pg_advantages, rtol=1e-5, atol=1e-5)
    # Each of the 42 columns is V-trace on its own rewards and values with the shared rhos.
    column = vtrace.from_importance_weights(
        inputs["log_rhos"][..., 0],
        inputs["discounts"][..., 0],
        inputs["rewards"][..., 5],
        inputs["values"][..., 5],
        inputs["bootstrap_value"][:, 5],
    )
    torch.testing.assert_close(output.vs[..., 5], column.vs)


def test_original_inconsistent_rank_inputs_for_importance_weights():
    inputs = {
        "log_rhos": np.zeros((4, 3, 1)),
        "discounts": np.zeros((4, 3, 1)),
        "rewards": np.zeros((4, 3, 42)),
        "values": np.zeros((4, 3, 42)),
        "bootstrap_value": np.zeros(3),  # should be [3, 42]
    }
    with pytest.raises(ValueError, match="must have rank 2"):
        vtrace.from_importance_weights(**inputs)


def test_shapes_the_original_would_reject():
    z, b = np.zeros((4, 3)), np.zeros(3)
    with pytest.raises(ValueError, match="broadcast"):  # T differs
        vtrace.from_importance_weights(z, z, np.zeros((5, 3)), z, b)
    with pytest.raises(ValueError, match="bootstrap_value"):  # B differs from the others
        vtrace.from_importance_weights(z, z, z, z, np.zeros(2))
    with pytest.raises(ValueError, match="bootstrap_value"):  # [T, B, 42] values need a [B, 42] bootstrap
        vtrace.from_importance_weights(
            np.zeros((4, 3, 1)), np.zeros((4, 3, 1)), np.zeros((4, 3, 42)), np.zeros((4, 3, 1)), np.zeros((3, 1))
        )
    with pytest.raises(ValueError, match="rank 0"):
        vtrace.from_importance_weights(z, z, z, z, b, clip_rho_threshold=[1.0])


def test_actions_convert_as_the_original_converts_them():
    logits = _shaped_arange(2, 3, 4)
    want = vtrace.log_probs_from_logits_and_actions(logits, np.array([[0, 1, 2], [3, 0, 1]], np.int64))
    # NumPy arrays are cast to int32 as tf.convert_to_tensor casts them (float ones included) ...
    torch.testing.assert_close(
        vtrace.log_probs_from_logits_and_actions(logits, np.array([[0, 1, 2], [3, 0, 1]], np.float64)), want
    )
    torch.testing.assert_close(vtrace.log_probs_from_logits_and_actions(logits, [[0, 1, 2], [3, 0, 1]]), want)
    # ... while a list of floats and a float tensor are errors there too.
    with pytest.raises(ValueError, match="integer"):
        vtrace.log_probs_from_logits_and_actions(logits, [[0.0, 1.0, 2.0], [3.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="integer"):
        vtrace.log_probs_from_logits_and_actions(torch.as_tensor(logits), torch.zeros(2, 3))
