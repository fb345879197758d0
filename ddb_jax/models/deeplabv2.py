"""DeepLabV2 decode heads: DDB's "adapter" head (DLV2AdapterHead, docs/method.md §1.7) and
DAFormer/HRDA's ``DLV2Head`` (:class:`DLV2SumHead`, config.model.head 'dlv2_sum').

Two ASPP branches on the last backbone stage, concatenated, a 3x3 bottleneck whose
output is the prototype feature, channel dropout, and a 1x1 classifier. Names
follow the mmseg state dict: ``aspp_modules_{b}/{conv,bn}``, ``bottleneck/{conv,bn}``,
``conv_seg``.

Random initialisation follows the reference's mmcv init: the head's
``init_cfg=dict(type='Normal', std=0.01, override=dict(name='aspp_modules'))`` draws
N(0, 0.01) for every weight of the ASPP branches, BN scales included (BN biases 0);
the bottleneck keeps ConvModule.init_weights (kaiming-normal fan_out conv, BN scale 1);
``conv_seg``, outside both, keeps PyTorch's Conv2d default.

DAFormer's ``DLV2Head`` is the original DeepLabV2 classifier: each ASPP branch a dilated
3x3 conv with bias straight to the classes, the branches summed; no norm, dropout or
bottleneck. ``aspp_modules_{b}/conv`` is ``aspp_modules.{b}.conv`` of its state dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddb_jax.models.batch_norm import make_norm
from ddb_jax.models.layers import conv_init, lax_conv, make_conv, matmul_grad_conv
from ddb_jax.ops import upcast

# mmcv normal_init(std=0.01) on the ASPP branches.
ASPP_INIT = nn.initializers.normal(0.01)
# PyTorch Conv2d.reset_parameters: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
TORCH_CONV_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> Callable:
    """PyTorch Conv2d's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ConvModule(nn.Module):
    """mmcv ConvModule: bias-free conv, BN, ReLU (children named as in the state dict).

    ``weight_init`` (mmcv's override init of a parent) replaces ConvModule's own init,
    the kaiming conv and BN scale 1, for the conv kernel and the BN scale alike.
    """

    features: int
    kernel: int
    dilation: int = 1
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"
    weight_init: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kernel_init = conv_init if self.weight_init is None else self.weight_init
        conv = make_conv(
            self.features,
            self.kernel,
            1,
            self.dilation,
            self.dtype,
            "conv",
            self.conv_impl,
            kernel_init=kernel_init,
        )
        x = conv(x)
        norm = make_norm(train, self.dtype, "bn", scale_init=self.weight_init)
        return nn.relu(norm(x))


class DLV2Head(nn.Module):
    """Returns ``(logits, feature)``: float32 logits at the input's resolution (1/8 image)
    and the bottleneck output before dropout (DDB's prototype feature)."""

    num_classes: int = 19
    channels: int = 256
    dilations: tuple = (6, 12)
    dropout_ratio: float = 0.1
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"  # "im2col" is ~2x faster on CPU (docs/performance_notes.md §3.1)

    @nn.compact
    def __call__(self, features: list, train: bool) -> tuple[jax.Array, jax.Array]:
        if self.channels % len(self.dilations):
            raise ValueError(
                f"DLV2Head channels={self.channels} is not divisible by "
                f"len(dilations)={len(self.dilations)}"
            )
        x = features[-1]
        branch_channels = self.channels // len(self.dilations)
        # A dilation of 1 is a 1x1 conv in mmseg's ASPPModule.
        branches = [
            ConvModule(
                branch_channels,
                1 if dilation == 1 else 3,
                dilation,
                self.dtype,
                self.conv_impl,
                weight_init=ASPP_INIT,
                name=f"aspp_modules_{b}",
            )(x, train)
            for b, dilation in enumerate(self.dilations)
        ]
        x = jnp.concatenate(branches, axis=-1)
        bottleneck = ConvModule(self.channels, 3, 1, self.dtype, self.conv_impl, name="bottleneck")
        feature = bottleneck(x, train)
        feature = upcast(feature)
        # nn.Dropout2d: whole channels dropped, so the mask broadcasts over H and W.
        x = nn.Dropout(self.dropout_ratio, broadcast_dims=(1, 2), deterministic=not train)(feature)
        logits = nn.Conv(
            self.num_classes,
            (1, 1),
            kernel_init=TORCH_CONV_KERNEL_INIT,
            bias_init=torch_conv_bias_init(x.shape[-1]),
            dtype=None,  # float32 (float64 in the parity tests), whatever self.dtype is
            param_dtype=jnp.float32,
            name="conv_seg",
        )(x)
        return logits, feature


class BiasedConv(nn.Module):
    """A stride-1 conv with bias (mmcv ConvModule without norm: ``bias='auto'``), torch
    padding ``dilation*(kernel//2)``; ``conv_impl`` 'lax' is XLA's conv, the CPU paths
    ('im2col', 'matmul') take the matmul-gradient conv (same values)."""

    features: int
    kernel: int
    dilation: int = 1
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel, self.kernel, x.shape[-1], self.features)
        kernel = self.param("kernel", ASPP_INIT, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        conv = lax_conv if self.conv_impl == "lax" else matmul_grad_conv
        y = conv(x.astype(self.dtype), kernel.astype(self.dtype), 1, self.dilation)
        return upcast(y) + upcast(bias)


class DLV2SumHead(nn.Module):
    """DAFormer's ``DLV2Head`` (HRDA's DeepLabV2 head and scale attention): the sum of
    dilated 3x3 convs (dilation 1: 1x1) of the last backbone map, each to the classes.

    Returns ``(logits, feature)``: float32 logits at 1/8 and, as it has no layer before its
    classifier, the last backbone map itself as the feature. Init: mmcv normal(0.01) on
    the branches (``init_cfg`` override 'aspp_modules'), zero biases.
    """

    num_classes: int = 19
    dilations: tuple = (6, 12)
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, features: list, train: bool) -> tuple[jax.Array, jax.Array]:
        del train  # no BN, no dropout
        x = features[-1]
        logits = None
        for b, dilation in enumerate(self.dilations):
            kernel = 1 if dilation == 1 else 3
            branch = _ASPPBranch(
                self.num_classes, kernel, dilation, self.dtype, self.conv_impl,
                name=f"aspp_modules_{b}",
            )  # fmt: skip
            out = branch(x)
            logits = out if logits is None else logits + out  # the reference's order
        return logits, upcast(x)


class _ASPPBranch(nn.Module):
    """One branch (mmcv ConvModule ``aspp_modules.{b}``): its conv is the child ``conv``."""

    features: int
    kernel: int
    dilation: int
    dtype: jnp.dtype
    conv_impl: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = BiasedConv(
            self.features, self.kernel, self.dilation, self.dtype, self.conv_impl, name="conv"
        )
        return conv(x)
