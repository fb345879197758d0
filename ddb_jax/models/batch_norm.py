"""torch's ``BatchNorm2d`` with flax's variable names, and how its batch statistics are reduced.

In training mode the statistics are over the global batch: with the batch split over a mesh's
'data' axis, every reduction over it is an all-reduce (the reference's SyncBN). torch's
statistics, ``config.model.bn_statistics='two_pass'`` (the default, the reference's numerics),
are the mean, then the mean squared deviation from it: two dependent reductions, so two
all-reduces per layer and forward, and autodiff's backward through both. ``'one_pass'``
(:func:`one_pass_batch_norm`) takes the first and second moments together, about the running
mean (a constant of the step, so float32 loses little to cancellation), and has BatchNorm's
closed-form gradient, whose two sums are again one pass: one all-reduce per layer and
direction. The same statistics in exact arithmetic, float32 rounding aside. On DDB's R101
step for a v5e-8 it cuts the all-reduces from 837 to 325 but the compiler then holds more
at once (temporaries 2.29 -> 3.07 GiB, bytes 56.9 -> 63.5 GiB; benchmarks/RESULTS.md), so it
is a switch, not the default. :func:`with_batch_statistics` picks the way for every forward
of a step (the methods wrap their segmentor's ``apply`` with it); evaluation uses the
running statistics either way.
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
    if statistics == "two_pass":  # the context's default
        return apply_fn  # the bound ``model.apply`` itself: callers look at its ``__self__``

    @functools.wraps(apply_fn)
    def apply(*args, **kwargs):
        token = _STATISTICS.set(statistics)
        try:
            return apply_fn(*args, **kwargs)
        finally:
            _STATISTICS.reset(token)

    if hasattr(apply_fn, "__self__"):
        apply.__self__ = apply_fn.__self__  # the segmentor, as a bound method shows it
    return apply


def batch_moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """torch's batch mean and biased variance of ``x`` over ``axes``: two dependent passes."""
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(jnp.square(x - mean), axes)


def _one_pass_forward(x, scale, bias, shift, epsilon):
    """(y float32, mean, var, invstd): moments about ``shift`` in one pass, then the affine."""
    axes = tuple(range(x.ndim - 1))
    centred = upcast(x) - shift
    first, second = jnp.mean(centred, axes), jnp.mean(jnp.square(centred), axes)
    mean, var = shift + first, jnp.maximum(second - jnp.square(first), 0.0)
    invstd = jax.lax.rsqrt(var + epsilon)
    multiplier = upcast(scale) * invstd
    y = upcast(x) * multiplier + (upcast(bias) - mean * multiplier)
    return y, mean, var, invstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def one_pass_batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, shift: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(normalised ``x`` in float32, batch mean, biased batch variance), the moments taken
    about ``shift`` (a constant: no gradient) in one pass. Its gradient is BatchNorm's
    closed form from ``x`` as it came (bfloat16 stays bfloat16 in memory), the mean and
    1/std: the sums of dy and dy * xhat are the backward's only reductions, again one pass."""
    return _one_pass_forward(x, scale, bias, shift, epsilon)[:3]


def _one_pass_fwd(x, scale, bias, shift, epsilon):
    y, mean, var, invstd = _one_pass_forward(x, scale, bias, shift, epsilon)
    return (y, mean, var), (x, scale, bias, shift, mean, invstd)


def _one_pass_bwd(epsilon, residuals, cotangents):
    x, scale, bias, shift, mean, invstd = residuals
    d_y, d_mean, d_var = (upcast(c) for c in cotangents)
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    centred = upcast(x) - mean
    xhat = centred * invstd
    d_bias, d_scale = jnp.sum(d_y, axes), jnp.sum(d_y * xhat, axes)
    d_x = (upcast(scale) * invstd) * (d_y - (d_bias + xhat * d_scale) / count)
    d_x = d_x + (d_mean + 2.0 * d_var * centred) / count  # the statistics' own uses, if any
    return (
        d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype),
        jnp.zeros_like(shift),
    )  # fmt: skip


one_pass_batch_norm.defvjp(_one_pass_fwd, _one_pass_bwd)


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
        one_pass = _STATISTICS.get() == "one_pass" and not self.use_running_average
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        elif one_pass:
            y, mean, var = one_pass_batch_norm(x, scale, bias, ra_mean.value, self.epsilon)
        else:
            mean, var = batch_moments(x32, tuple(range(x.ndim - 1)))
        if not self.use_running_average and not self.is_initializing():
            count = x.size // features
            unbiased = var * (count / max(count - 1, 1))
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        if one_pass:
            return y.astype(self.dtype)
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
