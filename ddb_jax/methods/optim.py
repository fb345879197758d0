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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddb_jax.config_rules import BELOW_ONE, NON_NEGATIVE, RATIO, integer, one_of, real


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
OPTIMIZERS = ("adamw", "adam", "adam041", "sgd")


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


# config.optim.listed_times: how often a reference's parameter groups list each parameter.
LISTINGS = ("", "advent_1x", "proda_1x")
# The PyTorch whose SGD stepped each listing: 0.4.1 added weight decay to the gradient in
# place (ADVENT), 1.x to a copy (ProDA's stages 2/3, --finetune).
DECAY_IN_PLACE = {"advent_1x": True, "proda_1x": False}


class ListedSGDState(NamedTuple):
    count: jax.Array
    momentum: optax.Params


def listed_sgd(
    schedule: optax.Schedule,
    momentum: float,
    weight_decay: float,
    times,
    decay_in_place: bool = True,
) -> optax.GradientTransformation:
    """PyTorch 0.4.1's ``SGD.step`` when a parameter is listed ``times(path)`` times in its
    group (ADVENT's 1x group, :func:`ddb_jax.models.advent_deeplabv2.listed_times`): each
    listing steps it again, with the same learning rate, on a gradient to which weight decay
    is added in place each time, through the one momentum buffer. Listed once, this is
    ``add_decayed_weights`` then ``sgd`` with momentum, as PyTorch's SGD.
    ``decay_in_place=False``: PyTorch 1.x's, where each listing adds weight decay (of the
    parameter as the earlier listings left it) to the gradient itself, not to the last
    listing's sum (ProDA's 1x group, :func:`ddb_jax.models.proda_deeplabv2.listed_times`)."""

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return ListedSGDState(jnp.zeros([], jnp.int32), zeros)

    def update(grads, state, params):
        lr = schedule(state.count)

        def step(path, grad, buf, param):
            start, decayed = param, grad
            for _ in range(times(path)):
                # 0.4.1: d_p.add_(weight_decay, p.data); 1.x: d_p = d_p.add(p, alpha=wd)
                decayed = (decayed if decay_in_place else grad) + weight_decay * param
                buf = momentum * buf + decayed
                param = param - lr * buf
            return param - start, buf

        out = jax.tree_util.tree_map_with_path(step, grads, state.momentum, params)
        treedef = jax.tree_util.tree_structure(grads)
        flat = treedef.flatten_up_to(out)
        updates = treedef.unflatten([u for u, _ in flat])
        bufs = treedef.unflatten([b for _, b in flat])
        return updates, ListedSGDState(optax.safe_increment(state.count), bufs)

    return optax.GradientTransformation(init, update)


class Adam041State(NamedTuple):
    count: jax.Array
    mu: optax.Params
    nu: optax.Params


def adam041(schedule: optax.Schedule, b1: float, b2: float, eps: float):
    """PyTorch 0.4.1's Adam (ADVENT's discriminators): ``eps`` is added to sqrt(v) before the
    bias corrections, which scale the step size, i.e. today's Adam with
    ``eps / sqrt(1 - b2^t)`` (a larger eps in the first steps, where it matters most)."""

    def init(params):
        # Two trees of zeros, not one twice: a donated state must not hold a buffer twice.
        mu = jax.tree_util.tree_map(jnp.zeros_like, params)
        nu = jax.tree_util.tree_map(jnp.zeros_like, params)
        return Adam041State(jnp.zeros([], jnp.int32), mu, nu)

    def update(grads, state, params=None):
        count = optax.safe_increment(state.count)
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        t = count.astype(jnp.result_type(float))
        step_size = schedule(state.count) * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree_util.tree_map(lambda m, v: -step_size * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, Adam041State(count, mu, nu)

    return optax.GradientTransformation(init, update)


def listing(name: str):
    """``path -> times listed`` of ``config.optim.listed_times``."""
    if name == "advent_1x":
        from ddb_jax.models.advent_deeplabv2 import listed_times

        return listed_times
    if name == "proda_1x":
        from ddb_jax.models.proda_deeplabv2 import listed_times

        return listed_times
    raise ValueError(f"optim.listed_times={name!r}; known: {list(LISTINGS)}")


# The rules of an optimiser section's values (config.optim, a method's own: advent.optim_d).
OPTIM_RULES = {
    "kind": one_of(OPTIMIZERS), "listed_times": one_of(LISTINGS),
    "lr": real(0.0, low_open=True), "b1": BELOW_ONE, "b2": BELOW_ONE, "momentum": BELOW_ONE,
    "weight_decay": NON_NEGATIVE, "head_lr_mult": NON_NEGATIVE, "poly_power": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE, "warmup_ratio": RATIO,
    "warmup_iters": integer(0, "0 = no warmup"),
    "max_iters": integer(0, "0 = config.num_steps"),
}  # fmt: skip


def base_transform(optim_cfg: ml_collections.ConfigDict, schedule, weight_decay: float):
    """``optim_cfg.kind``: 'adamw' (decoupled decay, mmcv/DDB), 'adam' (torch's Adam: L2 decay
    added to the gradient), 'adam041' (PyTorch 0.4.1's Adam, no weight decay) or 'sgd'
    (torch's SGD: L2 decay, then heavy-ball momentum)."""
    kind = optim_cfg.get("kind", "adamw")
    if kind == "adam041":
        if weight_decay:
            raise ValueError("optim.kind='adam041' takes no weight decay")
        return adam041(schedule, optim_cfg.b1, optim_cfg.b2, 1e-8)
    if kind == "adamw":
        return optax.adamw(
            schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=1e-8, weight_decay=weight_decay
        )
    if kind == "adam":
        adam = optax.adam(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=1e-8)
    elif kind == "sgd":
        listed = optim_cfg.get("listed_times", "")
        if listed:
            return listed_sgd(
                schedule, optim_cfg.momentum, weight_decay, listing(listed), DECAY_IN_PLACE[listed]
            )
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

    def transform(mult: float, weight_decay: float, cfg: ml_collections.ConfigDict = optim_cfg):
        schedule = mmcv_poly_warmup_schedule(
            optim_cfg.lr * mult,
            max_iters,
            optim_cfg.warmup_iters,
            optim_cfg.warmup_ratio,
            optim_cfg.poly_power,
            optim_cfg.min_lr * mult,
        )
        return base_transform(cfg, schedule, weight_decay), schedule

    no_decay_keys = tuple(optim_cfg.get("no_decay_keys", ()))
    head_keys = tuple(optim_cfg.get("head_keys", (HEAD_KEY,)))
    frozen_keys = tuple(optim_cfg.get("frozen_keys", ()))
    backbone_tx, backbone_schedule = transform(1.0, optim_cfg.weight_decay)
    head_cfg = optim_cfg
    if optim_cfg.get("listed_times", ""):  # only the reference's 1x group repeats parameters
        head_cfg = ml_collections.ConfigDict(optim_cfg.to_dict())
        head_cfg.listed_times = ""
    transforms = {
        "backbone": backbone_tx,
        "head": transform(optim_cfg.head_lr_mult, optim_cfg.weight_decay, head_cfg)[0],
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
