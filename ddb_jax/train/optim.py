"""AdamW with the decode head at 10x learning rate, on mmcv's warmup + poly schedule.

The reference (mmcv 1.x ``PolyLrUpdaterHook`` with linear warmup) computes, at
iteration ``it`` (0-based, one optimiser step per iteration):

    poly(it)   = (base - min_lr) * (1 - it / max_iters) ** power + min_lr
    lr(it)     = poly(it) * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))  if it < warmup
               = poly(it)                                                     otherwise

i.e. warmup scales the already-decayed rate. mmcv's ``paramwise_cfg`` custom key
'head' multiplies base lr by 10 for every parameter whose name contains 'head'
(all of ``decode_head``); weight decay applies to all parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def mmcv_poly_warmup_schedule(
    base_lr: float,
    max_iters: int,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr: float = 0.0,
) -> optax.Schedule:
    """The learning rate at optimiser step ``count`` exactly as mmcv computes it."""

    def schedule(count):
        it = jnp.asarray(count).astype(jnp.result_type(float))  # float64 under x64
        # Written to avoid float32 cancellation (1 - it/max near the end, ratio 1e-6 at start).
        remaining = jnp.clip((max_iters - it) / max_iters, 0.0, 1.0)
        poly = (base_lr - min_lr) * remaining**power + min_lr
        if warmup_iters <= 0:
            return poly
        warm = warmup_ratio + (1.0 - warmup_ratio) * it / warmup_iters
        return jnp.where(it < warmup_iters, poly * warm, poly)

    return schedule


def is_head_param(path: tuple) -> bool:
    """mmcv's custom key 'head' matches parameter names containing 'head'."""
    return any("head" in str(getattr(p, "key", p)) for p in path)


def param_groups(params) -> dict:
    """'head' / 'backbone' label for each leaf of ``params`` (for optax.multi_transform)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "head" if is_head_param(path) else "backbone", params
    )


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW per parameter group; returns (transform, backbone schedule for logging)."""

    def adamw(mult: float):
        schedule = mmcv_poly_warmup_schedule(
            optim_cfg.lr * mult,
            num_steps,
            optim_cfg.warmup_iters,
            optim_cfg.warmup_ratio,
            optim_cfg.poly_power,
            optim_cfg.min_lr * mult,
        )
        tx = optax.adamw(
            schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=1e-8,
            weight_decay=optim_cfg.weight_decay,
        )  # fmt: skip
        return tx, schedule

    backbone_tx, backbone_schedule = adamw(1.0)
    head_tx, _ = adamw(optim_cfg.head_lr_mult)
    tx = optax.multi_transform({"backbone": backbone_tx, "head": head_tx}, param_groups)
    return tx, backbone_schedule
