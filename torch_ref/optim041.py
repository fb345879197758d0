"""PyTorch 0.4.1's SGD and Adam steps, which the ADVENT family trained with.

Two things differ from today's SGD when a parameter is listed more than once in a group
(ADVENT's 1x group lists a bottleneck conv 3 times): weight decay is added to ``p.grad``
*in place* at each listing, and the momentum buffer starts at zero and is shared by every
listing. Each listing steps the parameter again. Listed once, it equals today's SGD.
"""

from __future__ import annotations

import torch


class SGD041(torch.optim.Optimizer):
    """SGD with momentum and L2 weight decay as PyTorch 0.4.1 steps it (no nesterov)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if group["weight_decay"]:
                    d_p.add_(p, alpha=group["weight_decay"])  # in place, as 0.4.1
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-group["lr"])


class Adam041(torch.optim.Optimizer):
    """Adam as PyTorch 0.4.1 steps it: eps added to sqrt(v) before the bias corrections,
    which are folded into the step size (today's Adam adds eps to the corrected sqrt)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                correction1 = 1 - beta1 ** state["step"]
                correction2 = 1 - beta2 ** state["step"]
                step_size = group["lr"] * correction2**0.5 / correction1
                p.addcdiv_(exp_avg, denom, value=-step_size)
