"""DAF's depth-aware DeepLabV2 (dg_ljw model/deeplabv2_depth.py ``ResNetMultiDepth``) in Flax.

DADA's depth DeepLabV2 (valeoai/DADA dada/model/deeplabv2_depth.py) with dg_ljw's depth
head: ADVENT's Caffe ResNet-101 (:mod:`ddb_jax.models.advent_deeplabv2`, the same names,
init and frozen BN affines) whose four stage outputs each go through

* a channel attention (global average pool, 1x1 conv to C/16, ReLU, 1x1 conv back,
  sigmoid; no biases) that re-weights the stage's maps,
* an up-projection (5x5 conv to 16 channels, BN, ReLU, bilinear with align_corners=True
  to layer 2's size: layer 1 is at 1/4, the others already at 1/8);

the 4 x 16 maps are concatenated and fused (5x5 conv, BN, ReLU: ``mff``), and regress a
one-channel depth (5x5 conv, BN, ReLU, 5x5 conv with bias: ``convR0/bnR0/convR2``), which
the reference upsamples to a fixed 228 x 304 (align_corners=True) before its training loop
upsamples it again to the input size (``depth_size``; () returns it at 1/8). The
cross-task interaction: ``dec4`` (1x1 conv with bias, 64 -> layer 4's width, ReLU) of the
fused depth features multiplies layer 4's output before the main classifier ``layer6``.

Reference quirk (``ResNetMultiDepth.forward``): with ``multi_level`` the auxiliary
classifier is applied to the stem's output (``self.layer5(x)``, x before layer 1), which
cannot run (64 channels into a 1024-channel classifier); the reference's configs never set
it. Here ``multi_level`` puts ``layer5`` on layer 3's output, as ADVENT's network does.

Every depth-head module sits under ``depth_head`` (the reference's 10x group with
``layer5``/``layer6``; its BNs train, unlike the backbone's). Outputs: 'logits' (main),
'aux_logits' (multi-level only), 'depth' (N, h, w, 1) and 'depth_features' (the fused
maps at 1/8, what ``dec4`` reads), all float32 (float64 under x64).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddb_jax.models.advent_deeplabv2 import (
    ADVENT_BLOCKS,
    ADVENT_CONV_INIT,
    ClassifierModule,
    bottleneck_stage,
    ceil_mode_max_pool,
    to_advent_input,
)
from ddb_jax.models.batch_norm import make_norm
from ddb_jax.models.deeplabv2 import torch_conv_bias_init
from ddb_jax.models.layers import CONV_IMPLS, make_conv
from ddb_jax.ops import resize_bilinear_corners, upcast

DEPTH_SIZE = (228, 304)  # the reference's fixed depth upsampling (NYU's size)
DEPTH_FEATURES = 16  # num_output_features of each up-projection
ATTENTION_REDUCTION = 16
DEPTH_HEAD = "depth_head"


def _conv(features: int, kernel: int, dtype, name: str, bias: bool = False) -> nn.Module:
    """A stride-1 conv with 'same' torch padding, weights N(0, 0.01) (the reference's init
    loop); a bias keeps PyTorch's default U(+-1/sqrt(fan_in)), set at call time."""
    pad = kernel // 2
    return nn.Conv(
        features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=bias,
        kernel_init=ADVENT_CONV_INIT, dtype=dtype, param_dtype=jnp.float32, name=name,
    )  # fmt: skip


class DepthHead(nn.Module):
    """Attention, up-projections, fusion, depth regression and ``dec4`` (see the module
    docstring); returns (depth at 1/8, fused features, dec4's multiplier for layer 4)."""

    layer4_channels: int
    features: int = DEPTH_FEATURES
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, blocks: list[jax.Array], train: bool):
        size = blocks[1].shape[1:3]
        projected = []
        for i, x in enumerate(blocks, start=1):
            channels = x.shape[-1]
            weights = jnp.mean(upcast(x), axis=(1, 2), keepdims=True).astype(self.dtype)
            hidden = max(channels // ATTENTION_REDUCTION, 1)
            weights = nn.relu(_conv(hidden, 1, self.dtype, f"att{i}_conv1")(weights))
            weights = nn.sigmoid(_conv(channels, 1, self.dtype, f"att{i}_conv2")(weights))
            y = _conv(self.features, 5, self.dtype, f"up{i}_conv1")(x * weights)
            y = nn.relu(make_norm(train, self.dtype, f"up{i}_bn1")(y))
            projected.append(resize_bilinear_corners(upcast(y), size).astype(self.dtype))
        fused = jnp.concatenate(projected, axis=-1)
        width = fused.shape[-1]
        fused = _conv(width, 5, self.dtype, "mff_conv")(fused)
        fused = nn.relu(make_norm(train, self.dtype, "mff_bn")(fused))
        r = _conv(width, 5, self.dtype, "convR0")(fused)
        r = nn.relu(make_norm(train, self.dtype, "bnR0")(r))
        depth = self._biased(1, 5, 25 * width, "convR2")(r)
        gate = nn.relu(self._biased(self.layer4_channels, 1, width, "dec4")(fused))
        return upcast(depth), upcast(fused), gate

    def _biased(self, features: int, kernel: int, fan_in: int, name: str) -> nn.Module:
        pad = kernel // 2
        return nn.Conv(
            features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
            kernel_init=ADVENT_CONV_INIT, bias_init=torch_conv_bias_init(fan_in),
            dtype=self.dtype, param_dtype=jnp.float32, name=name,
        )  # fmt: skip


class DafDeepLabV2(nn.Module):
    """DAF's depth-aware DeepLabV2; ``__call__`` -> {'logits', 'aux_logits' (multi-level),
    'depth', 'depth_features'} (see the module docstring)."""

    num_classes: int
    multi_level: bool = False
    blocks: tuple = ADVENT_BLOCKS
    base_channels: int = 64
    depth_features: int = DEPTH_FEATURES
    depth_size: tuple = DEPTH_SIZE
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"

    output_names = ("logits", "aux_logits", "depth", "depth_features")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if len(self.blocks) != 4:
            raise ValueError(f"DafDeepLabV2 blocks={self.blocks}: four layers expected")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl={self.conv_impl!r}; known: {list(CONV_IMPLS)}")
        width = self.base_channels
        x = to_advent_input(images).astype(self.dtype)
        x = make_conv(width, 7, 2, 1, self.dtype, "conv1", self.conv_impl, ADVENT_CONV_INIT)(x)
        x = ceil_mode_max_pool(nn.relu(make_norm(train, self.dtype, "bn1")(x)))
        outputs, stages = {}, []
        for stage, num_blocks in enumerate(self.blocks):
            x = bottleneck_stage(x, stage, num_blocks, width, self.dtype, self.conv_impl, train)
            stages.append(x)
            if stage == 2 and self.multi_level:
                outputs["aux_logits"] = ClassifierModule(self.num_classes, dtype=self.dtype,
                                                         name="layer5")(x)  # fmt: skip
        head = DepthHead(x.shape[-1], self.depth_features, self.dtype, name=DEPTH_HEAD)
        depth, fused, gate = head(stages, train)
        outputs["logits"] = ClassifierModule(self.num_classes, dtype=self.dtype,
                                             name="layer6")(x * gate)  # fmt: skip
        if self.depth_size:
            depth = resize_bilinear_corners(depth, tuple(self.depth_size))
        outputs["depth"] = depth
        outputs["depth_features"] = fused
        return outputs


def build_daf(model_cfg) -> DafDeepLabV2:
    """DAF's network from ``config.model``: ``num_classes``, ``dtype`` and the optional
    ``advent_multi_level`` (False: dg_ljw's setting), ``advent_blocks``, ``base_channels``,
    ``conv_impl``, ``daf_depth_features`` (16) and ``daf_depth_size`` ((228, 304); () =
    the depth at 1/8)."""
    from ddb_jax.models import compute_dtype

    return DafDeepLabV2(
        num_classes=model_cfg.num_classes,
        multi_level=bool(model_cfg.get("advent_multi_level", False)),
        blocks=tuple(model_cfg.get("advent_blocks", ADVENT_BLOCKS)),
        base_channels=model_cfg.get("base_channels", 64),
        depth_features=int(model_cfg.get("daf_depth_features", DEPTH_FEATURES)),
        depth_size=tuple(model_cfg.get("daf_depth_size", DEPTH_SIZE)),
        dtype=compute_dtype(model_cfg.dtype),
        conv_impl=model_cfg.get("conv_impl", "lax"),
    )
