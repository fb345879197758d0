"""SegFormer heads (DAFormer repo's and mmseg 0.x's) and the DAFormer head, in Flax.

All take the four MiT maps (strides 4..32), embed each (a linear layer, or for
mmseg's SegformerHead a 1x1 conv + BN + ReLU), upsample to stride 4, concatenate
and fuse. They return ``(logits, feature)``:
``feature`` is the fused map feeding the final 1x1 classifier (the DDB
prototype feature) and ``logits`` that classifier's float32 output at 1/4
resolution. Module names are mmseg's with ``.`` before an index written ``_``
(``fuse_layer/aspp_modules_2/depthwise_conv/bn`` is
``fuse_layer.aspp_modules.2.depthwise_conv.bn``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddb_jax.models.batch_norm import make_norm
from ddb_jax.ops import resize_bilinear, upcast

Dtype = Any


class ConvModule(nn.Module):
    """mmcv ConvModule with BN and ReLU: bias-free conv, BatchNorm, ReLU.

    ``depthwise`` makes the conv one group per input channel (and as many outputs). The
    BatchNorm is torch's (``batch_norm.make_norm``: unbiased running variance, float32
    statistics), with flax's variable names.
    """

    features: int
    kernel_size: int = 1
    dilation: int = 1
    depthwise: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = self.dilation * (self.kernel_size // 2)
        in_channels = x.shape[-1]
        x = nn.Conv(
            in_channels if self.depthwise else self.features,
            (self.kernel_size, self.kernel_size),
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=(self.dilation, self.dilation),
            feature_group_count=in_channels if self.depthwise else 1,
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        return nn.relu(make_norm(train, self.dtype, "bn")(x))


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv's: depthwise 3x3 ConvModule (BN, ReLU) then pointwise 1x1 ConvModule."""

    features: int
    dilation: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvModule(
            x.shape[-1], 3, self.dilation, depthwise=True, dtype=self.dtype, name="depthwise_conv"
        )(x, train)
        return ConvModule(self.features, 1, dtype=self.dtype, name="pointwise_conv")(x, train)


class MLPEmbed(nn.Module):
    """SegFormer's ``MLP``: a Linear over channels (named ``proj``)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, dtype=self.dtype, name="proj")(x)


class SepASPP(nn.Module):
    """DAFormer's ``ASPPWrapper`` with sep=True, pool=False: the context-aware fusion.

    Dilation 1 is a plain 1x1 ConvModule; larger dilations are depthwise-separable 3x3.
    """

    channels: int
    dilations: tuple[int, ...] = (1, 6, 12, 18)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        branches = []
        for index, dilation in enumerate(self.dilations):
            name = f"aspp_modules_{index}"
            if dilation == 1:
                branch = ConvModule(self.channels, 1, dtype=self.dtype, name=name)
            else:
                branch = DepthwiseSeparableConvModule(
                    self.channels, dilation, dtype=self.dtype, name=name
                )
            branches.append(branch(x, train))
        x = jnp.concatenate(branches, axis=-1)
        return ConvModule(self.channels, 3, dtype=self.dtype, name="bottleneck")(x, train)


def embed_and_upsample(features: list, embed_dim: int, prefix: str, dtype: Dtype) -> jax.Array:
    """Per-level Linear embedding (submodule ``{prefix}_{i}``), resized to level 0, concatenated.

    Must be called inside a compact method (it creates the submodules there).
    """
    size = features[0].shape[1:3]
    embedded = [
        resize_bilinear(MLPEmbed(embed_dim, dtype, name=f"{prefix}_{i}")(f), size)
        for i, f in enumerate(features)
    ]
    return jnp.concatenate(embedded, axis=-1)


def classify(
    feature: jax.Array, num_classes: int, rate: float, train: bool, name: str
) -> jax.Array:
    """mmseg ``cls_seg``: Dropout2d (whole channels) then a 1x1 conv, in float32."""
    x = nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)(feature)
    return nn.Conv(num_classes, (1, 1), dtype=None, name=name)(upcast(x))


class SegFormerHead(nn.Module):
    """DAFormer repo's ``SegFormerHead``: MLP embeddings, 1x1 ConvModule fusion, linear_pred.

    ``channels`` is the embedding dim (``decoder_params.embed_dim``: 256 for B0..B1, 768
    in the B5 config), also the width of the fused feature. The reference's own
    ``conv_seg`` is built but never called; its checkpoint keys are ignored on conversion.
    """

    num_classes: int = 19
    channels: int = 256
    dropout_ratio: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: list, train: bool) -> tuple[jax.Array, jax.Array]:
        x = embed_and_upsample(features, self.channels, "linear_c", self.dtype)
        feature = ConvModule(self.channels, 1, dtype=self.dtype, name="linear_fuse")(x, train)
        logits = classify(feature, self.num_classes, self.dropout_ratio, train, "linear_pred")
        return logits, feature


# DAFormerHead.fusion: the separable ASPP of the daformer_sepaspp config, or HRDA's scale
# attention's 1x1 ConvModule (hrda_head.py swaps the ASPP fusion for fusion_cfg type 'conv').
DAFORMER_FUSIONS = ("sep_aspp", "conv")


class DAFormerHead(nn.Module):
    """DAFormer head (daformer_sepaspp config): MLP embeddings to ``embed_dim`` each,
    fused by a depthwise-separable ASPP (dilations 1, 6, 12, 18, no pooling branch), or
    with ``fusion='conv'`` by a 1x1 ConvModule (HRDA's scale-attention head)."""

    num_classes: int = 19
    channels: int = 256
    dropout_ratio: float = 0.1
    dtype: Dtype = jnp.float32
    embed_dim: int | None = None  # decoder_params.embed_dims; None = channels (as configured)
    dilations: tuple[int, ...] = (1, 6, 12, 18)
    fusion: str = "sep_aspp"

    @nn.compact
    def __call__(self, features: list, train: bool) -> tuple[jax.Array, jax.Array]:
        if self.fusion not in DAFORMER_FUSIONS:
            raise ValueError(f"DAFormerHead fusion={self.fusion!r}; known: {DAFORMER_FUSIONS}")
        embed_dim = self.channels if self.embed_dim is None else self.embed_dim
        x = embed_and_upsample(features, embed_dim, "embed_layers", self.dtype)
        if self.fusion == "conv":
            fuse = ConvModule(self.channels, 1, dtype=self.dtype, name="fuse_layer")
        else:
            fuse = SepASPP(self.channels, self.dilations, self.dtype, name="fuse_layer")
        feature = fuse(x, train)
        logits = classify(feature, self.num_classes, self.dropout_ratio, train, "conv_seg")
        return logits, feature


class MMSegSegformerHead(nn.Module):
    """mmseg 0.x ``SegformerHead``: per level a 1x1 ConvModule (conv, BN, ReLU) to
    ``channels``, resized to level 0, concatenated, fused by the 1x1 ConvModule
    ``fusion_conv`` and classified by ``conv_seg``.

    Unlike the DAFormer repo's head the per-level embedding is normalised and
    rectified, so its checkpoints (``decode_head.convs.N.conv/bn``) need this head.
    BN follows torch (unbiased running variance) as the checkpoints were trained so.
    """

    num_classes: int = 19
    channels: int = 256
    dropout_ratio: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: list, train: bool) -> tuple[jax.Array, jax.Array]:
        size = features[0].shape[1:3]
        levels = []
        for i, level in enumerate(features):
            conv = ConvModule(self.channels, 1, dtype=self.dtype, name=f"convs_{i}")
            levels.append(resize_bilinear(conv(level, train), size))
        x = jnp.concatenate(levels, axis=-1)
        fusion = ConvModule(self.channels, 1, dtype=self.dtype, name="fusion_conv")
        feature = fusion(x, train)
        logits = classify(feature, self.num_classes, self.dropout_ratio, train, "conv_seg")
        return logits, feature
