"""DDB's DeepLabV2 "adapter" decode head (DLV2AdapterHead, docs/method.md §1.7).

Two ASPP branches on the last backbone stage, concatenated, a 3x3 bottleneck whose
output is the prototype feature, channel dropout, and a 1x1 classifier. Names
follow the mmseg state dict: ``aspp_modules_{b}/{conv,bn}``, ``bottleneck/{conv,bn}``,
``conv_seg``.

Random initialisation follows the reference's mmcv init: the head's
``init_cfg=dict(type='Normal', std=0.01, override=dict(name='aspp_modules'))`` draws
N(0, 0.01) for every weight of the ASPP branches, BN scales included (BN biases 0);
the bottleneck keeps ConvModule.init_weights (kaiming-normal fan_out conv, BN scale 1);
``conv_seg``, outside both, keeps PyTorch's Conv2d default.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddb_jax.models.layers import conv_init, make_conv, make_norm
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
