"""RMSPropTF against a numpy transcription of TF1's ApplyRMSProp kernel."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from impala.optim import RMSPropTF

# Quadratic f(x) = 0.5 * sum(h * (x - target)^2); grad = h * (x - target).
H = np.array([3.0, 0.5, -1.0, 10.0])
TARGET = np.array([1.0, -2.0, 0.5, 0.0])
X0 = np.array([0.0, 1.0, -1.0, 2.0])


def _grad(x):
    return H * (x - TARGET)


def numpy_tf1_rmsprop(x0, steps, lrs, decay, momentum, epsilon):
    x = x0.copy()
    ms = np.ones_like(x)  # TF1 rms slot: ones_initializer
    mom = np.zeros_like(x)
    trajectory = []
    for k in range(steps):
        g = _grad(x)
        ms = decay * ms + (1.0 - decay) * g * g
        mom = momentum * mom + lrs[k] * g / np.sqrt(ms + epsilon)
        x = x - mom
        trajectory.append(x.copy())
    return np.array(trajectory)


def _torch_run(opt, x, steps, scheduler=None):
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * torch.sum(torch.tensor(H) * (x - torch.tensor(TARGET)) ** 2)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        trajectory.append(x.detach().numpy().copy())
    return np.array(trajectory)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("lr,decay,epsilon", [(0.00048, 0.99, 0.1), (0.05, 0.9, 1e-3)])
def test_matches_tf1_update(momentum, lr, decay, epsilon):
    steps = 8
    x = torch.tensor(X0, requires_grad=True)
    opt = RMSPropTF([x], lr=lr, decay=decay, momentum=momentum, epsilon=epsilon)
    got = _torch_run(opt, x, steps)
    want = numpy_tf1_rmsprop(X0, steps, [lr] * steps, decay, momentum, epsilon)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_differs_from_torch_rmsprop():
    # The point of the class: torch's RMSprop (eps outside sqrt, ms from 0) takes other steps.
    x1 = torch.tensor(X0, requires_grad=True)
    x2 = torch.tensor(X0, requires_grad=True)
    got = _torch_run(RMSPropTF([x1], lr=0.01), x1, 3)
    ref = _torch_run(torch.optim.RMSprop([x2], lr=0.01, alpha=0.99, eps=0.1), x2, 3)
    assert not np.allclose(got, ref)


def test_defaults_are_scalable_agent_flags():
    opt = RMSPropTF([torch.zeros(1, requires_grad=True)])
    group = opt.param_groups[0]
    assert (group["lr"], group["decay"], group["momentum"], group["epsilon"]) == (0.00048, 0.99, 0.0, 0.1)


def test_lambda_lr_linear_decay():
    steps, lr = 6, 0.05
    x = torch.tensor(X0, requires_grad=True)
    opt = RMSPropTF([x], lr=lr, decay=0.9, momentum=0.5, epsilon=0.1)
    # The original anneals linearly to 0 over total_environment_frames.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
    got = _torch_run(opt, x, steps, scheduler=sched)
    lrs = [lr * (1.0 - k / steps) for k in range(steps)]
    want = numpy_tf1_rmsprop(X0, steps, lrs, 0.9, 0.5, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    constant = numpy_tf1_rmsprop(X0, steps, [lr] * steps, 0.9, 0.5, 0.1)
    assert not np.allclose(want, constant)


def test_state_dict_round_trip():
    kwargs = dict(lr=0.05, decay=0.9, momentum=0.9, epsilon=0.01)
    x = torch.tensor(X0, requires_grad=True)
    opt = RMSPropTF([x], **kwargs)
    _torch_run(opt, x, 4)
    # state_dict() aliases the live buffers, so snapshot it.
    saved_x, saved_state = x.detach().clone(), copy.deepcopy(opt.state_dict())

    continued = _torch_run(opt, x, 4)

    y = saved_x.clone().requires_grad_()
    fresh = RMSPropTF([y], **kwargs)
    fresh.load_state_dict(saved_state)
    resumed = _torch_run(fresh, y, 4)
    np.testing.assert_array_equal(resumed, continued)

    # Without the state (ms back to 1, mom to 0) the trajectory differs.
    z = saved_x.clone().requires_grad_()
    restarted = _torch_run(RMSPropTF([z], **kwargs), z, 4)
    assert not np.allclose(restarted, continued)


def test_invalid_hyperparameters():
    p = [torch.zeros(1, requires_grad=True)]
    for kwargs in (dict(lr=-1.0), dict(decay=1.5), dict(momentum=-0.1), dict(epsilon=-1.0)):
        with pytest.raises(ValueError):
            RMSPropTF(p, **kwargs)


def test_make_optimizer_by_name():
    from impala.optim import make_optimizer

    params = [torch.nn.Parameter(torch.ones(3))]
    rmsprop = make_optimizer("rmsprop", params, lr=0.1, decay=0.9, momentum=0.0, epsilon=0.01)
    assert isinstance(rmsprop, RMSPropTF) and rmsprop.param_groups[0]["epsilon"] == 0.01
    adam = make_optimizer("adam", params, lr=0.1, decay=0.95, momentum=0.0, epsilon=1e-5)
    assert isinstance(adam, torch.optim.Adam)
    assert adam.param_groups[0]["betas"] == (0.9, 0.95) and adam.param_groups[0]["eps"] == 1e-5
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", params, lr=0.1, decay=0.9, momentum=0.0, epsilon=0.01)
