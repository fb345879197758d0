"""ADVENT's DeepLabV2 ("ResNetMulti", valeoai/ADVENT advent/model/deeplabv2.py) in Flax.

The Caffe DeepLab-v2 ResNet-101 that ADVENT (and AdaptSegNet before it) trains, which is
not mmseg's ResNetV1c of ``resnet.py``:

* stem: one 7x7/2 conv, BN, ReLU, a 3x3/2 max-pool in *ceil* mode;
* bottleneck stride on the first 1x1 conv; the 3x3 conv dilated 2 in every block of
  layer3 and 4 in layer4 (padding = dilation); a 1x1 conv + BN shortcut on the first block
  of every layer; output stride 8;
* ``layer5``, only with ``multi_level``: the auxiliary classifier on layer3's output;
  ``layer6``: the main classifier on layer4's. Each is four 3x3 convs with bias, dilations
  6, 12, 18, 24, whose outputs are summed.

BatchNorm is torch's (``batch_norm.make_norm``). The reference sets ``requires_grad=False``
on the BN scale and bias only, and trains in ``model.train()``: BN normalises with batch
statistics and updates its running statistics in training (``train=True`` here, with
``batch_stats`` mutable); :func:`frozen_param` names the scale/bias leaves an optimiser
must leave alone.

Inputs are the project's mmseg-normalised RGB images, ``(rgb - IMAGE_MEAN) / IMAGE_STD``;
the model turns them into what ADVENT feeds its network, BGR in 0..255 minus ADVENT's
IMG_MEAN (no std), before the first conv.

Submodule names follow the torch state dict (``conv1``, ``bn1``, ``layer3_0`` with
``conv1..3``, ``bn1..3``, ``downsample_0/1``, ``layer6`` with ``conv2d_list_{i}``), so
``ddb_jax.convert.advent`` is a rename.

MTAF's MTKT network (valeoai/MTAF mtaf/model/deeplabv2.py ``ResNetMultiMTKT``) is the same
backbone with ``num_heads`` classifier pairs: ``layer5/head_{i}`` (torch
``aux_classifier_list.{i}``) and ``layer6/head_{i}`` (``main_classifier_list.{i}``), head 0
the target-agnostic one the reference evaluates. Nested under layer5/layer6, every head
stays in the classifiers' groups (10x rate, no ImageNet weights), and a one-head model keeps
ADVENT's names exactly.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddb_jax.models.batch_norm import make_norm
from ddb_jax.models.deeplabv2 import torch_conv_bias_init
from ddb_jax.models.layers import CONV_IMPLS, make_conv
from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD, upcast

ADVENT_BLOCKS = (3, 4, 23, 3)
# cfg.TRAIN.IMG_MEAN of ADVENT (advent/domain_adaptation/config.py), BGR order.
ADVENT_IMG_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
CLASSIFIER_DILATIONS = (6, 12, 18, 24)
STAGE_STRIDES = (1, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 2, 4)

# ResNetMulti's init loop: every Conv2d weight N(0, 0.01), classifiers included.
ADVENT_CONV_INIT = nn.initializers.normal(0.01)
BN_MODULES = ("bn1", "bn2", "bn3", "downsample_1")
CLASSIFIER_MODULES = ("layer5", "layer6")


def to_advent_input(images: jax.Array) -> jax.Array:
    """mmseg-normalised RGB -> ADVENT's input: BGR in 0..255 minus IMG_MEAN (float32, or
    float64 under x64)."""
    x = upcast(images)
    rgb = x * jnp.asarray(IMAGE_STD, x.dtype) + jnp.asarray(IMAGE_MEAN, x.dtype)
    return rgb[..., ::-1] - jnp.asarray(ADVENT_IMG_MEAN_BGR, x.dtype)


class CaffeBottleneck(nn.Module):
    """Bottleneck with the stride on ``conv1`` (1x1) and the dilation on ``conv2`` (3x3)."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = self._conv
        out = conv(self.planes, 1, self.stride, 1, "conv1")(x)
        out = nn.relu(make_norm(train, self.dtype, "bn1")(out))
        out = conv(self.planes, 3, 1, self.dilation, "conv2")(out)
        out = nn.relu(make_norm(train, self.dtype, "bn2")(out))
        out = conv(self.planes * 4, 1, 1, 1, "conv3")(out)
        out = make_norm(train, self.dtype, "bn3")(out)
        if self.downsample:
            x = conv(self.planes * 4, 1, self.stride, 1, "downsample_0")(x)
            x = make_norm(train, self.dtype, "downsample_1")(x)
        return nn.relu(out + x)

    def _conv(self, features: int, kernel: int, stride: int, dilation: int, name: str):
        return make_conv(
            features, kernel, stride, dilation, self.dtype, name, self.conv_impl, ADVENT_CONV_INIT
        )


class ClassifierModule(nn.Module):
    """Sum of four dilated 3x3 convs with bias (ADVENT's ``ClassifierModule``): each conv in
    the compute dtype, the sum in float32 (float64 under x64).

    Kernels N(0, 0.01); the biases keep PyTorch's Conv2d default, U(+-1/sqrt(fan_in)): the
    reference re-draws only the weights.
    """

    num_classes: int
    dilations: tuple = CLASSIFIER_DILATIONS
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = 9 * x.shape[-1]
        out = None
        for i, d in enumerate(self.dilations):
            conv = nn.Conv(
                self.num_classes,
                (3, 3),
                padding=((d, d), (d, d)),
                kernel_dilation=(d, d),
                kernel_init=ADVENT_CONV_INIT,
                bias_init=torch_conv_bias_init(fan_in),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"conv2d_list_{i}",
            )
            y = upcast(conv(x))
            out = y if out is None else out + y
        return out


class ClassifierHeads(nn.Module):
    """``num_heads`` classifiers on the same map (MTKT's ``*_classifier_list``), stacked:
    (num_heads, N, h, w, num_classes)."""

    num_classes: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.stack(
            [
                ClassifierModule(self.num_classes, dtype=self.dtype, name=f"head_{i}")(x)
                for i in range(self.num_heads)
            ]
        )


class AdventDeepLabV2(nn.Module):
    """ADVENT's DeepLabV2; ``__call__`` -> ``{"logits": main, "aux_logits": layer-3 head}``.

    Both outputs are float32 (float64 under x64) at 1/8 of the input, with torch's sizes
    (7x7/2 conv, ceil-mode 3x3/2 pool, 1x1/2 conv); ``aux_logits`` only with
    ``multi_level``. ``blocks`` and ``base_channels`` are (3, 4, 23, 3) and 64 in the
    reference; smaller ones make the tests' tiny models.

    ``num_heads`` > 1 (MTAF's MTKT): also ``head_logits`` and ``head_aux_logits``, every
    head's outputs stacked on a leading axis; ``logits``/``aux_logits`` are head 0's, the
    one evaluation reads.
    """

    num_classes: int
    multi_level: bool = True
    blocks: tuple = ADVENT_BLOCKS
    base_channels: int = 64
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"
    num_heads: int = 1

    output_names = ("logits", "aux_logits")
    head_output_names = ("head_logits", "head_aux_logits")  # only with num_heads > 1

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if len(self.blocks) != 4:
            raise ValueError(f"AdventDeepLabV2 blocks={self.blocks}: four layers expected")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl={self.conv_impl!r}; known: {list(CONV_IMPLS)}")
        if self.num_heads < 1:
            raise ValueError(f"AdventDeepLabV2 num_heads={self.num_heads}: at least one")
        width = self.base_channels
        x = to_advent_input(images).astype(self.dtype)
        x = make_conv(width, 7, 2, 1, self.dtype, "conv1", self.conv_impl, ADVENT_CONV_INIT)(x)
        x = nn.relu(make_norm(train, self.dtype, "bn1")(x))
        x = ceil_mode_max_pool(x)
        outputs = {}
        for stage, num_blocks in enumerate(self.blocks):
            x = bottleneck_stage(x, stage, num_blocks, width, self.dtype, self.conv_impl, train)
            if stage == 2 and self.multi_level:
                outputs["aux_logits"] = self._classifier("layer5")(x)
        outputs["logits"] = self._classifier("layer6")(x)
        if self.num_heads > 1:
            for name in ("logits", "aux_logits"):
                if name in outputs:
                    outputs[f"head_{name}"] = outputs[name]
                    outputs[name] = outputs[name][0]
        return outputs

    def _classifier(self, name: str) -> nn.Module:
        if self.num_heads == 1:
            return ClassifierModule(self.num_classes, dtype=self.dtype, name=name)
        return ClassifierHeads(self.num_classes, self.num_heads, dtype=self.dtype, name=name)


def bottleneck_stage(
    x: jax.Array, stage: int, num_blocks: int, width: int, dtype, conv_impl: str, train: bool
) -> jax.Array:
    """ResNet stage ``stage`` (0-3) of ``num_blocks`` bottlenecks, ``layer{stage+1}_{i}``,
    the first with the shortcut conv and the stage's stride; built in the calling module's
    scope (ADVENT's and ProDA's networks)."""
    for index in range(num_blocks):
        first = index == 0
        x = CaffeBottleneck(
            planes=width * 2**stage,
            stride=STAGE_STRIDES[stage] if first else 1,
            dilation=STAGE_DILATIONS[stage],
            downsample=first,
            dtype=dtype,
            conv_impl=conv_impl,
            name=f"layer{stage + 1}_{index}",
        )(x, train)
    return x


def ceil_mode_max_pool(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d(3, stride=2, padding=1, ceil_mode=True)`` on NHWC.

    Ceil mode adds a last window that may run past the right/bottom edge (torch drops it
    when it would start in the padding); the extra cells are -inf, as reduce_window's max
    pads.
    """
    pads = []
    for size in x.shape[1:3]:
        out = -(-(size + 2 - 3) // 2) + 1
        if (out - 1) * 2 >= size + 1:
            out -= 1
        pads.append((1, (out - 1) * 2 + 3 - size - 1))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=tuple(pads))


def path_names(path: tuple) -> list[str]:
    """A jax key path (DictKey / GetAttrKey / SequenceKey entries) or a tuple of strings as
    plain names, without the 'params' collection."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return [name for name in names if name != "params"]


def frozen_param(path: tuple) -> bool:
    """A BN scale or bias: ``requires_grad=False`` in the reference, never updated (and not
    weight-decayed). ``path``: a key path of the params tree (with or without 'params')."""
    names = path_names(path)
    return len(names) >= 2 and names[-2] in BN_MODULES and names[-1] in ("scale", "bias")


def is_classifier_param(path: tuple) -> bool:
    """A parameter of layer5/layer6: the reference's 10x learning-rate group."""
    return any(name in CLASSIFIER_MODULES for name in path_names(path))


def listed_times(path: tuple) -> int:
    """How often the reference's 1x SGD group lists this parameter (``optim_parameters``:
    ``get_1x_lr_params_no_scale`` yields the parameters of every module enclosing it within
    conv1, bn1 and layer1..4): the stem conv once, a bottleneck conv 3 times (the layer, the
    block, the conv), a shortcut conv 4 times (the layer, the block, the shortcut, the conv);
    1 elsewhere (the classifiers are listed once, BN parameters not at all)."""
    names = path_names(path)
    if not names or frozen_param(path) or not re.fullmatch(r"layer[1-4]_\d+", names[0]):
        return 1
    return 4 if len(names) > 1 and names[1].startswith("downsample_") else 3


def build_advent(model_cfg) -> AdventDeepLabV2:
    """ADVENT's DeepLabV2 from ``config.model``: ``num_classes``, ``dtype`` and the optional
    ``advent_multi_level`` (True), ``advent_blocks`` ((3, 4, 23, 3)), ``base_channels``
    (64), ``conv_impl`` ('lax') and ``advent_heads`` (1; MTAF's MTKT: 1 + the targets)."""
    from ddb_jax.models import compute_dtype

    return AdventDeepLabV2(
        num_classes=model_cfg.num_classes,
        multi_level=bool(model_cfg.get("advent_multi_level", True)),
        blocks=tuple(model_cfg.get("advent_blocks", ADVENT_BLOCKS)),
        base_channels=model_cfg.get("base_channels", 64),
        dtype=compute_dtype(model_cfg.dtype),
        conv_impl=model_cfg.get("conv_impl", "lax"),
        num_heads=int(model_cfg.get("advent_heads", 1)),
    )
