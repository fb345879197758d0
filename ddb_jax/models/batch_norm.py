"""torch's ``BatchNorm2d`` with flax's variable names, and how its batch statistics are reduced.

In training mode the statistics are over the global batch: with the batch split over a mesh's
'data' axis, every reduction over it is an all-reduce (the reference's SyncBN). torch's
statistics are the mean, then the mean squared deviation from it: two dependent reductions,
so two all-reduces per layer and forward, and two reads of the activations
(``config.model.bn_statistics = 'two_pass'``, the default, the reference's numerics).
``'one_pass'`` reduces the first and second moments together (one all-reduce of a (2, C)
array, one read), each taken about the running mean (a constant of the step), so float32
loses little to cancellation; the same statistics in exact arithmetic, float32 rounding
aside. :func:`with_batch_statistics` picks the way for every forward of a step (the
training stages wrap their segmentor's ``apply`` with it); evaluation uses the running
statistics either way.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddb_jax.ops import upcast

BN_STATISTICS = ("two_pass", "one_pass")
_STATISTICS = contextvars.ContextVar("bn_statistics", default="two_pass")


def with_batch_statistics(apply_fn: Callable, statistics: str) -> Callable:
    """``apply_fn`` whose BatchNorm layers reduce their batch statistics ``statistics``'s way
    (:data:`BN_STATISTICS`) while it is traced."""
    if statistics not in BN_STATISTICS:
        raise ValueError(f"config.model.bn_statistics={statistics!r}; known: {list(BN_STATISTICS)}")

    @functools.wraps(apply_fn)
    def apply(*args, **kwargs):
        token = _STATISTICS.set(statistics)
        try:
            return apply_fn(*args, **kwargs)
        finally:
            _STATISTICS.reset(token)

    return apply


def batch_moments(
    x: jax.Array, axes: tuple[int, ...], shift: jax.Array, statistics: str
) -> tuple[jax.Array, jax.Array]:
    """The batch mean and biased variance of ``x`` over ``axes``; ``shift`` (the running
    mean) centres the one-pass moments and changes nothing in exact arithmetic."""
    if statistics == "two_pass":
        mean = jnp.mean(x, axes)
        return mean, jnp.mean(jnp.square(x - mean), axes)
    centred = x - jax.lax.stop_gradient(shift).astype(x.dtype)
    first, second = jnp.mean(centred, axes), jnp.mean(jnp.square(centred), axes)
    return shift + first, jnp.maximum(second - jnp.square(first), 0.0)


class BatchNorm(nn.Module):
    """torch ``BatchNorm2d`` on NHWC, with flax.linen.BatchNorm's variable names.

    flax's BatchNorm feeds the biased batch variance into the running average;
    torch feeds the unbiased one (n/(n-1)). The EMA teacher runs BN in training
    mode and its running stats are what evaluation uses, so we follow torch.
    Statistics and normalisation are computed in float32 (or float64) whatever ``dtype`` is.
    """

    use_running_average: bool
    momentum: float = 0.9  # flax convention: running = momentum*running + (1-momentum)*batch
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        x32 = upcast(x)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean, var = batch_moments(x32, axes, ra_mean.value, _STATISTICS.get())
            if not self.is_initializing():
                count = x.size // features
                unbiased = var * (count / max(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        multiplier = upcast(scale) * jax.lax.rsqrt(var + self.epsilon)
        shift = upcast(bias) - mean * multiplier
        return (x32 * multiplier + shift).astype(self.dtype)


def make_norm(
    train: bool, dtype, name: str, zero_init: bool = False, scale_init: Callable | None = None
) -> BatchNorm:
    """torch BatchNorm2d defaults (momentum 0.1 == flax 0.9, eps 1e-5); scale 1 (0 for
    ``zero_init``) unless ``scale_init`` gives the module's reference init."""
    if scale_init is None:
        scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    return BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=scale_init,
        name=name,
    )
