"""DAF's depth losses and depth-aware maps (dg_ljw utils/util.py, train.py; DADA's
dada/utils/func.py): pure functions of arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp

BERHU_FRACTION = 0.2  # c = 0.2 max |pred - label| over the batch


def berhu_loss(pred: jax.Array, label: jax.Array) -> jax.Array:
    """DADA's ``loss_calc_depth``: reverse Huber of ``pred - label`` with c = 0.2 x the
    batch's largest absolute difference (a constant: the reference takes ``.item()``),
    |d| where |d| <= c, (d^2 + c^2) / 2c beyond; summed and divided by the element count.
    A batch predicted exactly (c = 0) gives 0 (the reference: NaN)."""
    diff = jnp.abs(pred - label)
    c = jax.lax.stop_gradient(BERHU_FRACTION * jnp.max(diff))
    safe_c = jnp.where(c > 0, c, 1.0)
    quadratic = (diff * diff + c * c) / (2 * safe_c)
    return jnp.sum(jnp.where(diff <= c, diff, quadratic)) / diff.size


def depth_aware_map(self_information: jax.Array, depth: jax.Array, power: int) -> jax.Array:
    """The discriminator's input: the per-class self-information (N, H, W, C) times the
    predicted depth (N, H, W) to ``power`` (dg_ljw: 1 for the source, 2 for the target)."""
    weight = depth[..., None]
    out = self_information
    for _ in range(power):
        out = out * weight
    return out
