"""mmseg's ResNetV1c (deep stem) at output stride 8, as DeepLabV2 in DDB uses it
(docs/method.md §1.7).

Submodule names follow the mmseg state dict so that conversion is mechanical:
``stem_{0,1,3,4,6,7}`` are ``backbone.stem.{0,1,3,4,6,7}``, ``layer{i}_{j}`` is
``backbone.layer{i}.{j}`` with ``conv{k}``, ``bn{k}`` and ``downsample_{0,1}``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddb_jax.models.batch_norm import make_norm
from ddb_jax.models.layers import make_conv

# depth -> (bottleneck?, blocks per stage); mmseg's arch_settings.
ARCH_SETTINGS = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
# DeepLabV2 in the reference configs: output stride 8.
STAGE_STRIDES = (1, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 2, 4)
BASE_CHANNELS = 64


class BasicBlock(nn.Module):
    """mmseg BasicBlock: only the first 3x3 conv is strided and dilated."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = block_conv(self, self.planes, 3, self.stride, self.dilation, "conv1")(x)
        out = nn.relu(make_norm(train, self.dtype, "bn1")(out))
        out = block_conv(self, self.planes, 3, 1, 1, "conv2")(out)
        out = make_norm(train, self.dtype, "bn2", zero_init=True)(out)
        return nn.relu(out + shortcut(self, x, train))


class Bottleneck(nn.Module):
    """mmseg Bottleneck, 'pytorch' style: the stride sits in the 3x3 conv."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = block_conv(self, self.planes, 1, 1, 1, "conv1")(x)
        out = nn.relu(make_norm(train, self.dtype, "bn1")(out))
        out = block_conv(self, self.planes, 3, self.stride, self.dilation, "conv2")(out)
        out = nn.relu(make_norm(train, self.dtype, "bn2")(out))
        out = block_conv(self, self.planes * 4, 1, 1, 1, "conv3")(out)
        out = make_norm(train, self.dtype, "bn3", zero_init=True)(out)
        return nn.relu(out + shortcut(self, x, train))


def block_conv(block, features: int, kernel: int, stride: int, dilation: int, name: str):
    """A conv inside a residual block, with the block's dtype and conv implementation."""
    return make_conv(features, kernel, stride, dilation, block.dtype, name, block.conv_impl)


def shortcut(block: BasicBlock | Bottleneck, x: jax.Array, train: bool) -> jax.Array:
    """Identity, or mmseg's ``downsample`` (strided 1x1 conv + BN; ResNetV1c has no avg-pool)."""
    if not block.downsample:
        return x
    features = block.planes * block.expansion
    x = block_conv(block, features, 1, block.stride, 1, "downsample_0")(x)
    return make_norm(train, block.dtype, "downsample_1")(x)


def block_dilations(num_blocks: int, dilation: int) -> list[int]:
    """contract_dilation=True: the first block of a dilated stage uses half the dilation."""
    first = dilation // 2 if dilation > 1 else dilation
    return [first] + [dilation] * (num_blocks - 1)


class ResNetV1c(nn.Module):
    """ResNetV1c-{18,34,50,101,152}, strides (1,2,1,1), dilations (1,1,2,4): output stride 8.

    Returns the four stage outputs (NHWC), like mmseg with out_indices (0, 1, 2, 3).
    """

    depth: int
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "lax"  # "im2col" is ~2x faster on CPU (docs/performance_notes.md §3.1)
    # mmseg's stem_channels = base_channels (64 in every published model); smaller widths
    # make the tiny models of the tests and the toy demo.
    base_channels: int = BASE_CHANNELS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        if self.depth not in ARCH_SETTINGS:
            raise ValueError(f"ResNetV1c depth={self.depth}; known: {sorted(ARCH_SETTINGS)}")
        bottleneck, stage_blocks = ARCH_SETTINGS[self.depth]
        block_cls: Callable = Bottleneck if bottleneck else BasicBlock
        if self.remat:
            # self is argument 0, x is 1, train (a Python bool) is 2.
            block_cls = nn.remat(block_cls, static_argnums=(2,))
        x = self.stem(x, train)
        in_channels = self.base_channels
        outputs = []
        for stage, num_blocks in enumerate(stage_blocks):
            planes = self.base_channels * 2**stage
            stride = STAGE_STRIDES[stage]
            out_channels = planes * block_cls_expansion(bottleneck)
            for index, dilation in enumerate(block_dilations(num_blocks, STAGE_DILATIONS[stage])):
                first = index == 0
                block = block_cls(
                    planes=planes,
                    stride=stride if first else 1,
                    dilation=dilation,
                    downsample=first and (stride != 1 or in_channels != out_channels),
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name=f"layer{stage + 1}_{index}",
                )
                x = block(x, train)
            in_channels = out_channels
            outputs.append(x)
        return outputs

    def stem(self, x: jax.Array, train: bool) -> jax.Array:
        """Three 3x3 convs (32, 32, 64 at width 64; the first strided), then a 3x3/2 max-pool."""
        conv = functools.partial(
            make_conv, kernel=3, dilation=1, dtype=self.dtype, impl=self.conv_impl
        )
        widths = (self.base_channels // 2, self.base_channels // 2, self.base_channels)
        for i, (width, stride) in enumerate(zip(widths, (2, 1, 1), strict=True)):
            x = conv(width, stride=stride, name=f"stem_{3 * i}")(x)
            x = nn.relu(make_norm(train, self.dtype, f"stem_{3 * i + 1}")(x))
        # torch MaxPool2d(3, 2, padding=1) pads with -inf, as reduce_window's max does.
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def block_cls_expansion(bottleneck: bool) -> int:
    return Bottleneck.expansion if bottleneck else BasicBlock.expansion
