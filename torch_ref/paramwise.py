"""mmcv 1.x's ``DefaultOptimizerConstructor`` param groups (``paramwise_cfg.custom_keys``).

Written from mmcv's documented rule: each parameter, named by its module path and own
name, takes the ``lr_mult`` / ``decay_mult`` of the first custom key its name contains,
keys tried by decreasing length, then alphabetically; others keep the base rate and decay.
One group per parameter, as mmcv builds them. DAFormer's keys: ``head`` (lr x10),
``norm`` and ``pos_block`` (no weight decay).
"""

from __future__ import annotations

import torch

from torch_ref.optim import mmcv_lr

DAFORMER_KEYS = {
    "head": {"lr_mult": 10.0},
    "pos_block": {"decay_mult": 0.0},
    "norm": {"decay_mult": 0.0},
}


def key_order(custom_keys: dict) -> list[str]:
    return sorted(sorted(custom_keys), key=len, reverse=True)


def multipliers(name: str, custom_keys: dict) -> tuple[float, float]:
    """(lr_mult, decay_mult) of the parameter ``name`` (e.g. 'model.backbone.norm1.weight')."""
    for key in key_order(custom_keys):
        if key in name:
            rule = custom_keys[key]
            return rule.get("lr_mult", 1.0), rule.get("decay_mult", 1.0)
    return 1.0, 1.0


def adamw(
    model: torch.nn.Module, optim_cfg, custom_keys: dict, prefix: str = "model"
) -> torch.optim.AdamW:
    """torch AdamW with mmcv's groups; ``prefix`` is the segmentor's attribute in the UDA
    model ('model.'), part of the names mmcv matches (it contains no key)."""
    groups = []
    for name, param in model.named_parameters():
        lr_mult, decay_mult = multipliers(f"{prefix}.{name}", custom_keys)
        groups.append(
            {
                "params": [param],
                "name": name,
                "lr": optim_cfg.lr * lr_mult,
                "initial_lr": optim_cfg.lr * lr_mult,
                "weight_decay": optim_cfg.weight_decay * decay_mult,
            }
        )
    return torch.optim.AdamW(
        groups, lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=1e-8,
        weight_decay=optim_cfg.weight_decay,
    )  # fmt: skip


def set_learning_rates(opt: torch.optim.Optimizer, it: int, optim_cfg, num_steps: int) -> None:
    """mmcv's poly + warm-up rate of iteration ``it`` for every group, from its initial rate."""
    for group in opt.param_groups:
        group["lr"] = mmcv_lr(
            it,
            group["initial_lr"],
            num_steps,
            optim_cfg.warmup_iters,
            optim_cfg.warmup_ratio,
            optim_cfg.poly_power,
            optim_cfg.min_lr,
        )
