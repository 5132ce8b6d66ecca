"""RMSProp with TensorFlow 1.x ``tf.train.RMSPropOptimizer`` semantics.

torch.optim.RMSprop adds epsilon outside the square root and starts the
mean-square accumulator at zero, whereas TF1 uses sqrt(ms + epsilon) and starts
ms at one; with the paper's large epsilon (0.1) these give very different step
sizes, so the published hyperparameters only transfer with the TF1 update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["RMSPropTF", "make_optimizer"]

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def make_optimizer(
    name: str, params: Params, lr: float, decay: float, momentum: float, epsilon: float
) -> torch.optim.Optimizer:
    """The learner's optimizer by --optimizer name (choices: config.OPTIMIZERS).

    rmsprop is the paper's (RMSPropTF below). adam goes beyond the original: Adam
    with betas (0.9, decay) and epsilon outside the square root (torch's); it is
    invariant to the scale of the gradient, so the summed losses' batch size does
    not change its step (configs/pong_fast.cfg, docs/results.md)."""
    if name == "rmsprop":
        return RMSPropTF(params, lr=lr, decay=decay, momentum=momentum, epsilon=epsilon)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, decay), eps=epsilon)
    raise ValueError(f"unknown optimizer {name!r}")


class RMSPropTF(torch.optim.Optimizer):
    """TF1 RMSProp (non-centered), per parameter:

        ms  <- decay * ms + (1 - decay) * g^2          (ms starts at 1)
        mom <- momentum * mom + lr * g / sqrt(ms + epsilon)
        p   <- p - mom

    Defaults are scalable_agent's flags. The learning rate is read from
    ``param_groups[i]['lr']`` every step, so lr schedulers work.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.00048,
        decay: float = 0.99,
        momentum: float = 0.0,
        epsilon: float = 0.1,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"Invalid decay: {decay}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if epsilon < 0.0:
            raise ValueError(f"Invalid epsilon: {epsilon}")
        defaults = dict(lr=lr, decay=decay, momentum=momentum, epsilon=epsilon)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, decay = group["lr"], group["decay"]
            momentum, epsilon = group["momentum"], group["epsilon"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("RMSPropTF does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    # TF1 initialises the 'rms' slot with ones, not zeros.
                    state["ms"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    state["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ms, mom = state["ms"], state["mom"]
                state["step"] += 1

                ms.mul_(decay).addcmul_(grad, grad, value=1.0 - decay)
                mom.mul_(momentum).addcdiv_(grad, ms.add(epsilon).sqrt_(), value=lr)
                p.sub_(mom)
        return loss
