"""ProDA's DeepLabV2 (microsoft/ProDA models/deeplabv2.py, ``Deeplab``) in Flax.

The backbone is ADVENT's Caffe-style ResNet-101 (``advent_deeplabv2.CaffeBottleneck``: a
7x7/2 stem, a ceil-mode 3x3/2 max-pool, the stride on each layer's first 1x1 conv, layer3
dilated 2 and layer4 4, a projection shortcut on every layer's first block; output stride
8). Unlike ADVENT, every BatchNorm trains: ProDA's recipes never pass ``--freeze_bn``, so in
``model.train()`` BN normalises with batch statistics, moves its running statistics and its
scale and bias take gradients. ``bn_clr`` adds ``bn_pretrain``, a BatchNorm on layer4's
output (ProDA's ``--bn_clr``, stages 2 and 3 with the SimCLR initialisation).

The head, ``layer5`` (``Classifier_Module2``), in the reference's order:

* five branches on the 2048-channel map, each conv (with bias) -> GroupNorm(32) -> ReLU: a
  1x1 conv and four 3x3 convs dilated 6, 12, 18 and 24, each to 256 channels;
* their concatenation (1x1 first), squeeze-and-excitation (global mean, Linear C->C/16,
  ReLU, Linear C/16->C, sigmoid, channel scale), a 3x3 conv (bias) to 256 channels and a
  GroupNorm(32) with no ReLU after it;
* Dropout2d(0.1), then a bias-free 1x1 classifier.

Reproduced quirks of the reference:

* ``feature`` is ProDA's ``out['feat']``: the GroupNorm output *after* Dropout2d, so in
  training the prototype feature has whole channels zeroed and the rest scaled by 1/0.9
  (DDB's heads return the feature before dropout);
* the network sees RGB in [0, 1], no mean/std (ProDA's datasets divide by 255 with a zero
  mean) although its ImageNet weights are torchvision's, trained on normalised input;
* initialisation, as the reference's init loops leave it: every conv kernel N(0, 0.01)
  (its kaiming and N(0, 0.001) draws in the head are overwritten by the ResNet loop); the
  five branch convs keep PyTorch's default bias U(+-1/sqrt(fan_in)) (the head's loop
  looks for convs among Sequentials and finds none), the 3x3 bottleneck conv's bias is 0;
  the SE Linears keep PyTorch's defaults; norms scale 1, bias 0.

Not reproduced: on several GPUs the reference's synchronised BN normalises a training
batch by max(var, eps)^-1/2, not (var + eps)^-1/2 (its running statistics are torch's);
here BN is torch's, over the global batch. The two differ by a factor within
1 +- eps/(2 var), more only for channels whose batch variance is near eps or below.

Inputs are the project's mmseg-normalised RGB images; :func:`to_proda_input` undoes the
normalisation and divides by 255 before the first conv. Outputs are at 1/8 of the input,
not upsampled (ProDA upsamples in its losses). Submodule names follow the torch state
dict (``layer5/conv2d_list_1_0``, ``layer5/bottleneck_0/se_2``, ``layer5/head_1``), so
``ddb_jax.convert.proda`` is a rename.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddb_jax.models.advent_deeplabv2 import bottleneck_stage, ceil_mode_max_pool, path_names
from ddb_jax.models.batch_norm import make_norm
from ddb_jax.models.deeplabv2 import TORCH_CONV_KERNEL_INIT, torch_conv_bias_init
from ddb_jax.models.layers import CONV_IMPLS, make_conv
from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD, upcast

PRODA_BLOCKS = (3, 4, 23, 3)
ASPP_DILATIONS = (6, 12, 18, 24)
HEAD_CHANNELS = 256
GROUP_NORM_GROUPS = 32
SE_REDUCTION = 16
DROPOUT_RATE = 0.1
# ResNet101.__init__'s last loop: every Conv2d weight N(0, 0.01), the head's included.
PRODA_CONV_INIT = nn.initializers.normal(0.01)
# The reference's 10x learning-rate group (get_10x_lr_params) and what no ImageNet or
# SimCLR file holds.
CLASSIFIER_MODULES = ("layer5", "bn_pretrain")


def to_proda_input(images: jax.Array) -> jax.Array:
    """mmseg-normalised RGB -> ProDA's input: RGB / 255 (float32, or float64 under x64)."""
    x = upcast(images)
    rgb = x * jnp.asarray(IMAGE_STD, x.dtype) + jnp.asarray(IMAGE_MEAN, x.dtype)
    return rgb / 255.0


def group_norm(dtype, name: str) -> nn.GroupNorm:
    """torch ``GroupNorm(32, C)``: eps 1e-5, two-pass variance, statistics in float32+."""
    return nn.GroupNorm(
        num_groups=GROUP_NORM_GROUPS,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )


def biased_conv(
    features: int, kernel: int, dilation: int, bias_init: Callable, dtype, name: str
) -> nn.Conv:
    """A stride-1 conv with bias, torch padding and the reference's N(0, 0.01) kernel."""
    pad = dilation * (kernel // 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        kernel_init=PRODA_CONV_INIT,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class SqueezeExcitation(nn.Module):
    """ProDA's ``SEBlock``: channels scaled by sigmoid(Linear(ReLU(Linear(mean over HW))));
    the two Linears (``se_0``, ``se_2``) in float32 (float64 under x64)."""

    reduction: int = SE_REDUCTION

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        pooled = jnp.mean(upcast(x), axis=(1, 2))

        def linear(features: int, fan_in: int, name: str) -> nn.Dense:
            return nn.Dense(
                features,
                kernel_init=TORCH_CONV_KERNEL_INIT,
                bias_init=torch_conv_bias_init(fan_in),
                param_dtype=jnp.float32,
                name=name,
            )

        hidden = nn.relu(linear(channels // self.reduction, channels, "se_0")(pooled))
        weight = nn.sigmoid(linear(channels, channels // self.reduction, "se_2")(hidden))
        return x * weight[:, None, None, :].astype(x.dtype)


class ProdaClassifier(nn.Module):
    """``Classifier_Module2`` -> ``(logits, feature)``, both float32 (float64 under x64);
    ``feature`` after the channel dropout, as the reference's ``feat``."""

    num_classes: int
    channels: int = HEAD_CHANNELS
    dilations: tuple = ASPP_DILATIONS
    dropout_rate: float = DROPOUT_RATE
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        cin = x.shape[-1]
        branches = []
        for i, dilation in enumerate((1, *self.dilations)):
            kernel = 1 if i == 0 else 3
            bias_init = torch_conv_bias_init(kernel * kernel * cin)
            conv = biased_conv(
                self.channels, kernel, dilation, bias_init, self.dtype, f"conv2d_list_{i}_0"
            )
            y = group_norm(self.dtype, f"conv2d_list_{i}_1")(conv(x))
            branches.append(nn.relu(y))
        y = jnp.concatenate(branches, axis=-1)
        y = SqueezeExcitation(name="bottleneck_0")(y)
        zeros = nn.initializers.zeros
        y = biased_conv(self.channels, 3, 1, zeros, self.dtype, "bottleneck_1")(y)
        feature = upcast(group_norm(self.dtype, "bottleneck_2")(y))
        # Dropout2d: whole channels of each image, so the mask broadcasts over H and W.
        feature = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(
            feature
        )
        classifier = make_conv(
            self.num_classes, 1, 1, 1, feature.dtype, "head_1", self.conv_impl, PRODA_CONV_INIT
        )
        return classifier(feature), feature


class ProdaDeepLabV2(nn.Module):
    """ProDA's DeepLabV2; ``__call__`` -> ``{"logits", "feature"}`` at 1/8 of the input.

    ``train=True``: BN on batch statistics (``batch_stats`` mutable) and Dropout2d (a
    'dropout' rng), as the reference's ``model.train()``. ``blocks``, ``base_channels`` and
    ``head_channels`` are (3, 4, 23, 3), 64 and 256 in the reference; smaller ones make the
    tests' tiny models.
    """

    num_classes: int
    blocks: tuple = PRODA_BLOCKS
    base_channels: int = 64
    head_channels: int = HEAD_CHANNELS
    dropout_rate: float = DROPOUT_RATE
    bn_clr: bool = False
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "lax"

    output_names = ("logits", "feature")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if len(self.blocks) != 4:
            raise ValueError(f"ProdaDeepLabV2 blocks={self.blocks}: four layers expected")
        if self.head_channels % GROUP_NORM_GROUPS:
            raise ValueError(
                f"ProdaDeepLabV2 head_channels={self.head_channels}: GroupNorm({GROUP_NORM_GROUPS})"
                " needs a multiple of 32"
            )
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl={self.conv_impl!r}; known: {list(CONV_IMPLS)}")
        width = self.base_channels
        x = to_proda_input(images).astype(self.dtype)
        x = make_conv(width, 7, 2, 1, self.dtype, "conv1", self.conv_impl, PRODA_CONV_INIT)(x)
        x = nn.relu(make_norm(train, self.dtype, "bn1")(x))
        x = ceil_mode_max_pool(x)
        for stage, num_blocks in enumerate(self.blocks):
            x = bottleneck_stage(x, stage, num_blocks, width, self.dtype, self.conv_impl, train)
        if self.bn_clr:
            x = make_norm(train, self.dtype, "bn_pretrain")(x)
        logits, feature = ProdaClassifier(
            self.num_classes,
            self.head_channels,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
            name="layer5",
        )(x, train)
        return {"logits": logits, "feature": feature}


def is_classifier_param(path: tuple) -> bool:
    """A parameter of the reference's 10x group (warm-up and ``--finetune`` stages): layer5
    and, with ``bn_clr``, bn_pretrain. ``path``: a key path of the params tree."""
    return any(name in CLASSIFIER_MODULES for name in path_names(path))


def listed_times(path: tuple) -> int:
    """How often the reference's 1x group lists this parameter (``get_1x_lr_params`` walks
    ``modules()`` of conv1, bn1, layer1..4 and yields each one's recursive ``parameters()``):
    the stem's conv1 and bn1 once, a block's convs and BNs 3 times (the layer, the block,
    the module), a shortcut's conv and BN 4 times; the 10x group lists each once. BN
    parameters train here (no ``requires_grad=False``), unlike ADVENT's. How a repeated
    listing steps depends on the torch version ProDA ran, which it does not pin; stage 1
    (no ``--finetune``) lists every parameter once, in one group."""
    names = path_names(path)
    if not names or not re.fullmatch(r"layer[1-4]_\d+", names[0]):
        return 1
    return 4 if len(names) > 1 and names[1].startswith("downsample_") else 3


def build_proda(model_cfg) -> ProdaDeepLabV2:
    """ProDA's DeepLabV2 from ``config.model``: ``num_classes``, ``dtype`` and the optional
    ``proda_blocks`` ((3, 4, 23, 3)), ``base_channels`` (64), ``head_channels`` (256),
    ``dropout_ratio`` (0.1), ``proda_bn_clr`` (False) and ``conv_impl`` ('lax')."""
    from ddb_jax.models import ModelConfigError, compute_dtype

    head_channels = model_cfg.get("head_channels", HEAD_CHANNELS)
    if head_channels % GROUP_NORM_GROUPS:
        raise ModelConfigError(
            f"config.model.head_channels={head_channels}: ProDA's GroupNorm(32) needs a "
            "multiple of 32 (256 in the reference)"
        )
    return ProdaDeepLabV2(
        num_classes=model_cfg.num_classes,
        blocks=tuple(model_cfg.get("proda_blocks", PRODA_BLOCKS)),
        base_channels=model_cfg.get("base_channels", 64),
        head_channels=head_channels,
        dropout_rate=model_cfg.get("dropout_ratio", DROPOUT_RATE),
        bn_clr=bool(model_cfg.get("proda_bn_clr", False)),
        dtype=compute_dtype(model_cfg.dtype),
        conv_impl=model_cfg.get("conv_impl", "lax"),
    )
