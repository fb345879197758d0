"""mmcv 1.x's learning-rate schedule and DDB's two AdamW parameter groups, in torch."""

from __future__ import annotations

import torch


def mmcv_lr(it, base, max_iters, warmup_iters, ratio, power=1.0, min_lr=0.0) -> float:
    """mmcv 1.x PolyLrUpdaterHook + linear warmup, written from its documented formula."""
    regular = (base - min_lr) * (1 - it / max_iters) ** power + min_lr
    if it < warmup_iters:
        k = (1 - it / warmup_iters) * (1 - ratio)
        return regular * (1 - k)
    return regular


def make_optimizer(student: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW with two groups (backbone, decode head) as mmcv's paramwise config builds."""
    head = [p for n, p in student.named_parameters() if n.startswith("decode_head")]
    body = [p for n, p in student.named_parameters() if not n.startswith("decode_head")]
    return torch.optim.AdamW(
        [{"params": body}, {"params": head}],
        lr=optim_cfg.lr,
        betas=(optim_cfg.b1, optim_cfg.b2),
        weight_decay=optim_cfg.weight_decay,
    )


def set_learning_rates(opt: torch.optim.Optimizer, it: int, optim_cfg, num_steps: int) -> None:
    """The rate of iteration ``it`` for both groups (the head at ``head_lr_mult`` x)."""
    for group, mult in zip(opt.param_groups, (1.0, optim_cfg.head_lr_mult), strict=True):
        group["lr"] = mmcv_lr(
            it,
            optim_cfg.lr * mult,
            num_steps,
            optim_cfg.warmup_iters,
            optim_cfg.warmup_ratio,
            optim_cfg.poly_power,
            optim_cfg.min_lr,
        )
