"""IMPALA loss terms against hand computations in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impala import losses

# A tiny T=2, B=1, A=3 batch.
TARGET_LOGITS = np.array([[[1.0, 0.0, -1.0]], [[0.5, 2.0, 0.0]]])
BEHAVIOUR_LOGITS = np.array([[[0.0, 0.0, 0.0]], [[2.0, 0.0, -0.5]]])
ACTIONS = np.array([[0], [1]])
REWARDS = np.array([[1.0], [-0.5]])
DISCOUNTS = np.array([[0.9], [0.9]])
BASELINE = np.array([[0.3], [-0.2]])
BOOTSTRAP = np.array([0.7])


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _hand_loss(baseline_cost, entropy_cost, clip_rho=1.0, clip_pg_rho=1.0, lam=1.0):
    """Everything spelled out for T=2, B=1 (no recursion, no vtrace module); `lam`
    scales the trace c and mixes the policy gradient's bootstrap (rlax's V-trace(lambda))."""
    pi, mu = _softmax(TARGET_LOGITS[:, 0]), _softmax(BEHAVIOUR_LOGITS[:, 0])
    a = ACTIONS[:, 0]
    ratio = np.array([pi[0, a[0]] / mu[0, a[0]], pi[1, a[1]] / mu[1, a[1]]])
    rho = np.minimum(clip_rho, ratio)
    c = lam * np.minimum(1.0, ratio)
    pg_rho = np.minimum(clip_pg_rho, ratio)
    r, g, v, vb = REWARDS[:, 0], DISCOUNTS[:, 0], BASELINE[:, 0], BOOTSTRAP[0]
    delta0 = r[0] + g[0] * v[1] - v[0]
    delta1 = r[1] + g[1] * vb - v[1]
    vs1 = v[1] + rho[1] * delta1
    vs0 = v[0] + rho[0] * delta0 + g[0] * c[0] * rho[1] * delta1
    adv0 = pg_rho[0] * (r[0] + g[0] * (lam * vs1 + (1 - lam) * v[1]) - v[0])
    adv1 = pg_rho[1] * (r[1] + g[1] * vb - v[1])
    pg = -np.log(pi[0, a[0]]) * adv0 - np.log(pi[1, a[1]]) * adv1
    bl = 0.5 * ((vs0 - v[0]) ** 2 + (vs1 - v[1]) ** 2)
    ent = np.sum(pi * np.log(pi))
    total = pg + baseline_cost * bl + entropy_cost * ent
    # Analytic gradients: d(-log pi_a)/dz = pi - onehot(a); d(sum p log p)/dz_j = p_j (log p_j - sum p log p).
    onehot = np.eye(3)[a]
    ent_rows = np.sum(pi * np.log(pi), axis=-1, keepdims=True)
    d_logits = (pi - onehot) * np.array([[adv0], [adv1]]) + entropy_cost * pi * (np.log(pi) - ent_rows)
    d_baseline = -baseline_cost * np.array([vs0 - v[0], vs1 - v[1]])
    return dict(
        total=total,
        pg=pg,
        bl=bl,
        ent=ent,
        vs=np.array([vs0, vs1]),
        adv=np.array([adv0, adv1]),
        d_logits=d_logits,
        d_baseline=d_baseline,
    )


def _inputs():
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return dict(
        target_logits=t(TARGET_LOGITS).requires_grad_(),
        baseline=t(BASELINE).requires_grad_(),
        bootstrap_value=t(BOOTSTRAP).requires_grad_(),
        behaviour_logits=t(BEHAVIOUR_LOGITS).requires_grad_(),
        actions=torch.tensor(ACTIONS),
        rewards=t(REWARDS),
        discounts=t(DISCOUNTS),
    )


@pytest.mark.parametrize(
    "clip_rho,clip_pg_rho,lam", [(1.0, 1.0, 1.0), (5.0, 5.0, 1.0), (0.5, 2.0, 1.0), (1.0, 1.0, 0.6), (5.0, 5.0, 0.0)]
)
def test_impala_loss_matches_hand_computation(clip_rho, clip_pg_rho, lam):
    want = _hand_loss(baseline_cost=0.5, entropy_cost=0.01, clip_rho=clip_rho, clip_pg_rho=clip_pg_rho, lam=lam)
    x = _inputs()
    out = losses.impala_loss(
        **x,
        baseline_cost=0.5,
        entropy_cost=0.01,
        clip_rho_threshold=clip_rho,
        clip_pg_rho_threshold=clip_pg_rho,
        vtrace_lambda=lam,
    )
    assert isinstance(out, losses.LossOutput)
    np.testing.assert_allclose(out.vtrace_returns.vs[:, 0].detach().numpy(), want["vs"], rtol=1e-12)
    np.testing.assert_allclose(out.vtrace_returns.pg_advantages[:, 0].detach().numpy(), want["adv"], rtol=1e-12)
    np.testing.assert_allclose(out.policy_gradient.item(), want["pg"], rtol=1e-12)
    np.testing.assert_allclose(out.baseline.item(), want["bl"], rtol=1e-12)
    np.testing.assert_allclose(out.entropy.item(), want["ent"], rtol=1e-12)
    np.testing.assert_allclose(out.total.item(), want["total"], rtol=1e-12)

    out.total.backward()
    np.testing.assert_allclose(x["target_logits"].grad[:, 0].numpy(), want["d_logits"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x["baseline"].grad[:, 0].numpy(), want["d_baseline"], rtol=1e-10)
    # vs and pg advantages are constants: nothing flows to the bootstrap or the actor logits.
    assert x["bootstrap_value"].grad is None
    assert x["behaviour_logits"].grad is None


def test_baseline_loss_gradient_is_minus_advantage():
    x = _inputs()
    out = losses.impala_loss(**x, baseline_cost=1.0, entropy_cost=0.0)
    (grad,) = torch.autograd.grad(out.baseline, x["baseline"])
    vs = out.vtrace_returns.vs
    torch.testing.assert_close(grad, -(vs - x["baseline"].detach()))

    adv = torch.tensor([[0.5, -2.0], [3.0, 0.0]], dtype=torch.float64)
    b = torch.zeros_like(adv, requires_grad=True)
    loss = losses.baseline_loss(adv - b)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 4.0 + 9.0))
    loss.backward()
    torch.testing.assert_close(b.grad, -adv)


def test_individual_terms():
    logits = torch.tensor(TARGET_LOGITS, requires_grad=True)
    actions = torch.tensor(ACTIONS)
    adv = torch.tensor([[2.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    pi = _softmax(TARGET_LOGITS)
    want_pg = -np.log(pi[0, 0, 0]) * 2.0 - np.log(pi[1, 0, 1]) * -1.0
    pg = losses.policy_gradient_loss(logits, actions, adv)
    assert pg.item() == pytest.approx(want_pg, rel=1e-12)
    pg.backward()
    assert adv.grad is None  # advantages are stop-gradient'ed
    assert losses.entropy_loss(logits).item() == pytest.approx(np.sum(pi * np.log(pi)), rel=1e-12)
    # Uniform policy: loss = -T*B*log(A).
    assert losses.entropy_loss(torch.zeros(2, 3, 4)).item() == pytest.approx(-6 * np.log(4), rel=1e-6)


def test_clip_rewards_abs_one():
    r = np.array([-7.0, -1.0, -0.3, 0.0, 0.4, 1.0, 2.5])
    got = losses.clip_rewards(torch.tensor(r), "abs_one").numpy()
    np.testing.assert_array_equal(got, np.clip(r, -1.0, 1.0))


def test_clip_rewards_soft_asymmetric():
    r = np.array([-20.0, -3.0, -0.5, 0.0, 0.5, 3.0, 20.0])
    got = losses.clip_rewards(torch.tensor(r), "soft_asymmetric").numpy()
    squeezed = np.tanh(r / 5.0)
    want = np.where(r < 0, 0.3 * squeezed, squeezed) * 5.0
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == pytest.approx(-1.5 * np.tanh(4.0))  # negatives bounded by -1.5
    assert got[-1] == pytest.approx(5.0 * np.tanh(4.0))


def test_clip_rewards_none_and_unknown():
    r = torch.tensor([-3.0, 0.0, 9.0])
    torch.testing.assert_close(losses.clip_rewards(r, "none"), r)
    assert losses.REWARD_CLIPPING_MODES == ("abs_one", "soft_asymmetric", "none")
    with pytest.raises(ValueError, match="soft_asymmetric"):
        losses.clip_rewards(r, "tanh")
