"""Optimisers from the config: AdamW (DDB, DAFormer), Adam or SGD (ADVENT and its family),
with the decode head at 10x learning rate, on mmcv's warmup + poly schedule.

The reference (mmcv 1.x ``PolyLrUpdaterHook`` with linear warmup) computes, at
iteration ``it`` (0-based, one optimiser step per iteration):

    poly(it)   = (base - min_lr) * (1 - it / max_iters) ** power + min_lr
    lr(it)     = poly(it) * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))  if it < warmup
               = poly(it)                                                     otherwise

i.e. warmup scales the already-decayed rate. mmcv's ``paramwise_cfg`` custom key
'head' multiplies base lr by 10 for every parameter whose name contains 'head'
(all of ``decode_head``); in DDB weight decay applies to all parameters.

DAFormer adds custom keys with ``decay_mult=0`` ('norm', 'pos_block': no weight decay on
normalisation layers): ``optim.no_decay_keys``. mmcv gives each parameter the rule of the
*first* custom key contained in its name, keys tried longest first, then alphabetically;
the names here are the Flax paths joined by '.', which contain a key exactly when the
torch names do (tests/test_optim.py checks this on MiT and ResNet).
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


HEAD_KEY = "head"
OPTIMIZERS = ("adamw", "adam", "sgd")


def is_head_param(path: tuple) -> bool:
    """mmcv's custom key 'head' matches parameter names containing 'head'."""
    return any("head" in str(getattr(p, "key", p)) for p in path)


def param_name(path: tuple) -> str:
    """A leaf path as a dotted name ('decode_head.conv_seg.kernel')."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


def custom_key_order(no_decay_keys: tuple[str, ...] = (), head_keys=(HEAD_KEY,), frozen_keys=()):
    """mmcv's matching order of the custom keys: by length, longest first, then alphabetical."""
    return sorted(sorted({*head_keys, *no_decay_keys, *frozen_keys}), key=len, reverse=True)


def param_label(
    path: tuple,
    no_decay_keys: tuple[str, ...] = (),
    head_keys: tuple[str, ...] = (HEAD_KEY,),
    frozen_keys: tuple[str, ...] = (),
) -> str:
    """'head' (lr x head_lr_mult), 'no_decay' (weight decay 0), 'frozen' (never updated: the
    reference's ``requires_grad=False``) or 'backbone' (none of these): the rule of the
    first custom key in the parameter's name."""
    if not no_decay_keys and not frozen_keys and tuple(head_keys) == (HEAD_KEY,):
        return "head" if is_head_param(path) else "backbone"
    name = param_name(path)
    for key in custom_key_order(tuple(no_decay_keys), tuple(head_keys), tuple(frozen_keys)):
        if key in name:
            if key in frozen_keys:
                return "frozen"
            return "head" if key in head_keys else "no_decay"
    return "backbone"


def param_groups(
    params, no_decay_keys: tuple[str, ...] = (), head_keys=(HEAD_KEY,), frozen_keys=()
):
    """The group label of each leaf of ``params`` (for optax.multi_transform)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_label(path, no_decay_keys, head_keys, frozen_keys), params
    )


def base_transform(optim_cfg: ml_collections.ConfigDict, schedule, weight_decay: float):
    """``optim_cfg.kind``: 'adamw' (decoupled decay, mmcv/DDB), 'adam' (torch's Adam: L2 decay
    added to the gradient) or 'sgd' (torch's SGD: L2 decay, then heavy-ball momentum)."""
    kind = optim_cfg.get("kind", "adamw")
    if kind == "adamw":
        return optax.adamw(
            schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=1e-8, weight_decay=weight_decay
        )
    if kind == "adam":
        adam = optax.adam(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=1e-8)
    elif kind == "sgd":
        adam = optax.sgd(schedule, momentum=optim_cfg.momentum or None)
    else:
        raise ValueError(f"optim.kind={kind!r}; use one of {list(OPTIMIZERS)}")
    if not weight_decay:
        return adam
    return optax.chain(optax.add_decayed_weights(weight_decay), adam)


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """One tree's optimiser per parameter group; returns (transform, 1x schedule for logging).

    Groups: 'backbone' (1x), 'head' (``head_lr_mult``x: parameters named by a key of
    ``head_keys``, mmcv's 'head' by default), with ``no_decay_keys`` also 'no_decay' (1x, no
    weight decay), with ``frozen_keys`` also 'frozen' (never updated). Without those keys
    the optimiser state has the same structure as before they existed, so older
    checkpoints restore. ``max_iters`` (0: ``num_steps``) is the schedule's length, which
    a reference may set beyond the iterations it trains (ADVENT: 250k, stopped at 120k).
    """
    max_iters = optim_cfg.get("max_iters", 0) or num_steps

    def transform(mult: float, weight_decay: float):
        schedule = mmcv_poly_warmup_schedule(
            optim_cfg.lr * mult,
            max_iters,
            optim_cfg.warmup_iters,
            optim_cfg.warmup_ratio,
            optim_cfg.poly_power,
            optim_cfg.min_lr * mult,
        )
        return base_transform(optim_cfg, schedule, weight_decay), schedule

    no_decay_keys = tuple(optim_cfg.get("no_decay_keys", ()))
    head_keys = tuple(optim_cfg.get("head_keys", (HEAD_KEY,)))
    frozen_keys = tuple(optim_cfg.get("frozen_keys", ()))
    backbone_tx, backbone_schedule = transform(1.0, optim_cfg.weight_decay)
    transforms = {
        "backbone": backbone_tx,
        "head": transform(optim_cfg.head_lr_mult, optim_cfg.weight_decay)[0],
    }
    if no_decay_keys:
        transforms["no_decay"] = transform(1.0, 0.0)[0]
    if frozen_keys:
        transforms["frozen"] = optax.set_to_zero()
    tx = optax.multi_transform(
        transforms, lambda params: param_groups(params, no_decay_keys, head_keys, frozen_keys)
    )
    return tx, backbone_schedule


def without_frozen(grads, optim_cfg: ml_collections.ConfigDict):
    """``grads`` with the leaves of frozen parameters (``optim_cfg.frozen_keys``) zeroed: the
    gradient the optimiser uses, as a norm over the reference's trained parameters sees it."""
    labels = param_groups(
        grads,
        tuple(optim_cfg.get("no_decay_keys", ())),
        tuple(optim_cfg.get("head_keys", (HEAD_KEY,))),
        tuple(optim_cfg.get("frozen_keys", ())),
    )
    return jax.tree_util.tree_map(
        lambda g, label: jnp.zeros_like(g) if label == "frozen" else g, grads, labels
    )
