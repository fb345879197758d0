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

from ddb_jax.ops import upcast

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

# mmseg's kaiming init (fan_out, relu) for random initialisation.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


CONV_IMPLS = ("lax", "im2col")


class Im2colConv(nn.Module):
    """A bias-free 2-D conv as shifted slices concatenated + one matmul.

    Same parameter ('kernel', HWIO) and result as ``nn.Conv``; on CPU XLA runs this
    about twice as fast as ``lax.conv`` (docs/performance_notes.md §3.1). Keep ``lax`` on GPU/TPU.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = conv_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, d = self.kernel_size, self.stride, self.dilation
        shape = (k, k, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        pad = d * (k // 2)
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        out_h = (x.shape[1] - d * (k - 1) - 1) // s + 1
        out_w = (x.shape[2] - d * (k - 1) - 1) // s + 1
        patches = [
            x[:, i * d : i * d + (out_h - 1) * s + 1 : s, j * d : j * d + (out_w - 1) * s + 1 : s]
            for i in range(k)
            for j in range(k)
        ]
        columns = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
        weights = kernel.astype(self.dtype).reshape(-1, self.features)
        return jnp.dot(columns, weights)


def make_conv(
    features: int,
    kernel: int,
    stride: int,
    dilation: int,
    dtype,
    name: str,
    impl: str = "lax",
    kernel_init: Callable = conv_init,
) -> nn.Module:
    """A bias-free conv with torch padding ``dilation*(kernel//2)`` on each side; mmseg's
    kaiming init unless the module's reference init differs (``kernel_init``)."""
    if impl == "im2col":
        return Im2colConv(features, kernel, stride, dilation, dtype, kernel_init, name=name)
    if impl != "lax":
        raise ValueError(f"conv_impl={impl!r}; known: {list(CONV_IMPLS)}")
    pad = dilation * (kernel // 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=False,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


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
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)
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
