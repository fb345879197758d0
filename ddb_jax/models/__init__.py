"""Segmentation models: a backbone and a decode head, built from ``config.model``.

Every segmentor maps a normalised NHWC float image batch to a dict of named outputs, the
names it declares in ``output_names``: always ``logits``, at the head's output stride (1/8
for DeepLabV2, 1/4 for SegFormer heads); DDB's segmentors also ``feature``, the
decode-head feature that feeds the final 1x1 classifier (the prototype feature of DDB,
docs/method.md §1.4), and on request ``backbone``, the backbone's maps of the same forward.
Evaluation, prediction, previews and the methods read outputs by name, never by position.
With ``config.model.hrda.enabled`` the segmentor is HRDA's multi-resolution one
(models/hrda.py; :func:`is_multi_resolution`), whose training forward takes a detail box.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddb_jax import errors

RESNET_DEPTHS = (18, 34, 50, 101, 152)
MIT_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5")
# 'segformer' is the DAFormer repo's (NVlabs) all-MLP head, 'mmseg_segformer' mmseg 0.x's
# SegformerHead (ConvModule embeddings); their checkpoints differ in keys and in maths.
# 'dlv2_sum' is DAFormer/HRDA's DLV2Head (dilated convs to the classes, summed).
HEADS = (
    "dlv2", "dlv2_sum", "segformer", "daformer", "mmseg_segformer", "advent_aspp", "proda_aspp",
    "daf_aspp",
)  # fmt: skip
# The single-scale heads HRDA (config.model.hrda) wraps: their backbone family, output stride.
# DDB's own DeepLabV2 head ('dlv2') is wrapped the same way (DDB on HRDA).
HRDA_HEADS = {"daformer": ("mit", 4), "dlv2_sum": ("resnet", 8), "dlv2": ("resnet", 8)}
# HRDA's DeepLabV2 head (the reference's 'dlv2red'): ASPP dilations 6 and 12.
DLV2_SUM_DILATIONS = (6, 12)
# ADVENT's Caffe-style DeepLabV2 (models/advent_deeplabv2.py): its own backbone and head.
ADVENT_BACKBONE = "resnet101_caffe"
# ProDA's DeepLabV2 (models/proda_deeplabv2.py): the same ResNet, trained BN, its GN head.
PRODA_BACKBONE = "resnet101_proda"
# DAF's depth-aware DeepLabV2 (models/daf_deeplabv2.py): ADVENT's ResNet with a depth head.
DAF_BACKBONE = "resnet101_daf"
MIT_LAYOUTS = ("nvlabs", "mmseg")


class ModelConfigError(errors.UsageError, ValueError):
    """A model config names something that does not exist."""


Outputs = dict[str, Any]


class EncoderDecoder(nn.Module):
    """mmseg's EncoderDecoder: ``backbone`` then ``decode_head`` (names kept for conversion)."""

    backbone: nn.Module
    decode_head: nn.Module

    output_names = ("logits", "feature", "backbone")

    def __call__(self, images: jax.Array, train: bool = False) -> Outputs:
        """``{'logits', 'feature'}``."""
        features = self.backbone(images, train=train)
        logits, feature = self.decode_head(features, train=train)
        return {"logits": logits, "feature": feature}

    def extract_feat(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
        """The backbone's four maps alone (mmseg's ``extract_feat``): what DAFormer's frozen
        ImageNet model computes for the feature distance; its variables may hold only
        ``backbone``."""
        return self.backbone(images, train=train)

    def forward_with_features(self, images: jax.Array, train: bool = False) -> Outputs:
        """``{'logits', 'feature', 'backbone'}`` of one forward: the feature distance compares
        the backbone maps of the very forward that gives the source loss (same drop-path
        draw)."""
        features = self.backbone(images, train=train)
        logits, feature = self.decode_head(features, train=train)
        return {"logits": logits, "feature": feature, "backbone": features}


def parse_backbone(name: str) -> tuple[str, Any]:
    """'resnet101_v1c' -> ('resnet', 101); 'mit_b5' -> ('mit', 'b5'); else a clear error."""
    match = re.fullmatch(r"resnet(\d+)_v1c", name)
    if match and int(match.group(1)) in RESNET_DEPTHS:
        return "resnet", int(match.group(1))
    match = re.fullmatch(r"mit_(b\d)", name)
    if match and match.group(1) in MIT_VARIANTS:
        return "mit", match.group(1)
    known = [f"resnet{d}_v1c" for d in RESNET_DEPTHS] + [f"mit_{v}" for v in MIT_VARIANTS]
    raise ModelConfigError(
        f"config.model.backbone={name!r} is not a known backbone; known: {known}"
    )


COMPUTE_DTYPES = ("float32", "bfloat16", "float64")


def compute_dtype(name: str) -> jnp.dtype:
    """float32 | bfloat16; float64 (with ``jax_enable_x64``) is what the parity tests use."""
    if name not in COMPUTE_DTYPES:
        raise ModelConfigError(f"config.model.dtype={name!r}; use 'float32' or 'bfloat16'")
    return jnp.dtype(name)


# One instance per distinct segmentor (modules compare by value): jit caches keyed on
# ``model.apply`` (a static argument of evaluation, say) then hit across the stages of a
# process, where each stage's own instance made every stage trace and compile again.
_CANONICAL: dict[nn.Module, nn.Module] = {}
_CANONICAL_LOCK = threading.Lock()


def build_model(model_cfg: ml_collections.ConfigDict) -> nn.Module:
    """Builds the segmentor described by ``config.model`` (see configs/default.py)."""
    model = _build(model_cfg)
    with _CANONICAL_LOCK:
        return _CANONICAL.setdefault(model, model)


def _build(model_cfg: ml_collections.ConfigDict) -> nn.Module:
    if model_cfg.head == "advent_aspp" or model_cfg.backbone == ADVENT_BACKBONE:
        from ddb_jax.models.advent_deeplabv2 import build_advent

        if (model_cfg.backbone, model_cfg.head) != (ADVENT_BACKBONE, "advent_aspp"):
            raise ModelConfigError(
                f"config.model.backbone={model_cfg.backbone!r} with head={model_cfg.head!r}: "
                f"ADVENT's DeepLabV2 is backbone {ADVENT_BACKBONE!r} with head 'advent_aspp'"
            )
        compute_dtype(model_cfg.dtype)
        return build_advent(model_cfg)
    if model_cfg.head == "daf_aspp" or model_cfg.backbone == DAF_BACKBONE:
        from ddb_jax.models.daf_deeplabv2 import build_daf

        if (model_cfg.backbone, model_cfg.head) != (DAF_BACKBONE, "daf_aspp"):
            raise ModelConfigError(
                f"config.model.backbone={model_cfg.backbone!r} with head={model_cfg.head!r}: "
                f"DAF's DeepLabV2 is backbone {DAF_BACKBONE!r} with head 'daf_aspp'"
            )
        return build_daf(model_cfg)
    if model_cfg.head == "proda_aspp" or model_cfg.backbone == PRODA_BACKBONE:
        from ddb_jax.models.proda_deeplabv2 import build_proda

        if (model_cfg.backbone, model_cfg.head) != (PRODA_BACKBONE, "proda_aspp"):
            raise ModelConfigError(
                f"config.model.backbone={model_cfg.backbone!r} with head={model_cfg.head!r}: "
                f"ProDA's DeepLabV2 is backbone {PRODA_BACKBONE!r} with head 'proda_aspp'"
            )
        return build_proda(model_cfg)
    family, size = parse_backbone(model_cfg.backbone)
    dtype = compute_dtype(model_cfg.dtype)
    from ddb_jax.models.layers import CONV_IMPLS

    if model_cfg.get("conv_impl", "lax") not in CONV_IMPLS:
        raise ModelConfigError(
            f"config.model.conv_impl={model_cfg.conv_impl!r}; known: {list(CONV_IMPLS)}"
        )
    if model_cfg.head not in HEADS:
        raise ModelConfigError(f"config.model.head={model_cfg.head!r}; known heads: {list(HEADS)}")
    if family == "resnet":
        from ddb_jax.models.resnet import ResNetV1c

        base = model_cfg.get("base_channels", 64)
        if base < 2 or base % 2:
            raise ModelConfigError(f"config.model.base_channels={base}; use an even width >= 2")
        backbone = ResNetV1c(
            depth=size,
            dtype=dtype,
            remat=model_cfg.remat,
            conv_impl=model_cfg.conv_impl,
            base_channels=base,
        )
    else:
        from ddb_jax.models.mit import MixVisionTransformer

        if model_cfg.mit_layout not in MIT_LAYOUTS:
            raise ModelConfigError(
                f"config.model.mit_layout={model_cfg.mit_layout!r}; known: {list(MIT_LAYOUTS)}"
            )
        backbone = MixVisionTransformer(
            variant=size,
            layout=model_cfg.mit_layout,
            drop_path_rate=model_cfg.drop_path_rate,
            dtype=dtype,
            remat=model_cfg.remat,
        )
    hrda_cfg = model_cfg.get("hrda")
    if hrda_cfg is not None and hrda_cfg.get("enabled", False):
        return _build_hrda(model_cfg, backbone, family, dtype)
    head = _single_scale_head(model_cfg, family, dtype)
    return EncoderDecoder(backbone=backbone, decode_head=head)


def _single_scale_head(
    model_cfg: ml_collections.ConfigDict,
    family: str,
    dtype: jnp.dtype,
    num_classes: int | None = None,
    **head_kwargs,
) -> nn.Module:
    """config.model.head for a ``family`` backbone (``num_classes``: another output width,
    e.g. HRDA's single-channel attention; ``head_kwargs``: the head's other settings)."""
    num_classes = model_cfg.num_classes if num_classes is None else num_classes
    if model_cfg.head in ("dlv2", "dlv2_sum"):
        from ddb_jax.models.deeplabv2 import DLV2Head, DLV2SumHead

        if family != "resnet":
            raise ModelConfigError(f"config.model.head={model_cfg.head!r} needs a ResNet backbone")
        if model_cfg.head == "dlv2_sum":
            return DLV2SumHead(
                num_classes=num_classes,
                dilations=DLV2_SUM_DILATIONS,
                dtype=dtype,
                conv_impl=model_cfg.conv_impl,
            )
        return DLV2Head(
            num_classes=num_classes,
            channels=model_cfg.head_channels,
            dropout_ratio=model_cfg.dropout_ratio,
            dtype=dtype,
            conv_impl=model_cfg.conv_impl,
        )
    from ddb_jax.models.segformer_heads import DAFormerHead, MMSegSegformerHead, SegFormerHead

    if family != "mit":
        raise ModelConfigError(f"config.model.head={model_cfg.head!r} needs a MiT backbone")
    head_cls = {
        "segformer": SegFormerHead,
        "daformer": DAFormerHead,
        "mmseg_segformer": MMSegSegformerHead,
    }[model_cfg.head]
    settings = dict(channels=model_cfg.head_channels, dropout_ratio=model_cfg.dropout_ratio)
    settings.update(head_kwargs)
    return head_cls(num_classes=num_classes, dtype=dtype, **settings)


def _build_hrda(
    model_cfg: ml_collections.ConfigDict, backbone: nn.Module, family: str, dtype: jnp.dtype
) -> nn.Module:
    """HRDA around the backbone and head (config.model.hrda): DAFormer's head on MiT, or
    DAFormer's DLV2Head ('dlv2_sum') or DDB's ('dlv2') on ResNetV1c; its scale attention is
    the same kind of head (DAFormer's with a 1x1 conv fusion at ``attention_channels``)."""
    from ddb_jax.models.hrda import HRDAEncoderDecoder, HRDAHead

    hrda_cfg = model_cfg.hrda
    wanted_family, output_stride = HRDA_HEADS.get(model_cfg.head, (None, None))
    if wanted_family != family:
        raise ModelConfigError(
            f"config.model.hrda.enabled=True with head={model_cfg.head!r} and backbone="
            f"{model_cfg.backbone!r}: HRDA wraps head 'daformer' (MiT), 'dlv2_sum' or 'dlv2' "
            "(resnet*_v1c)"
        )
    head = _single_scale_head(model_cfg, family, dtype)
    attention_classes = model_cfg.num_classes if hrda_cfg.attention_classwise else 1
    extra = {}
    if family == "mit":
        width = int(hrda_cfg.attention_channels)
        extra = dict(channels=width, embed_dim=width, fusion="conv")
    attention = _single_scale_head(model_cfg, family, dtype, attention_classes, **extra)
    return HRDAEncoderDecoder(
        backbone=backbone,
        decode_head=HRDAHead(head=head, scale_attention=attention),
        output_stride=output_stride,
        context_scale=float(hrda_cfg.context_scale),
        detail_crop=tuple(int(v) for v in hrda_cfg.detail_crop),
        slide_detail=bool(hrda_cfg.slide_detail),
        crop_divisible=int(hrda_cfg.crop_divisible),
        detail_loss_weight=float(hrda_cfg.detail_loss_weight),
    )


def is_multi_resolution(apply_fn_or_model: Any) -> bool:
    """Whether a model (or its bound ``model.apply``) is HRDA's multi-resolution segmentor,
    whose training forward takes a detail box (``forward_train``)."""
    model = getattr(apply_fn_or_model, "__self__", apply_fn_or_model)
    return bool(getattr(model, "multi_resolution", False))


def default_head(backbone: str) -> str:
    """The head a converted checkpoint of ``backbone`` has unless told otherwise."""
    if backbone == ADVENT_BACKBONE:
        return "advent_aspp"
    if backbone == PRODA_BACKBONE:
        return "proda_aspp"
    if backbone == DAF_BACKBONE:
        return "daf_aspp"
    return "dlv2" if backbone.startswith("resnet") else "daformer"


def backbone_predicate(model: nn.Module):
    """``name -> bool``: whether a top-level module of ``model`` belongs to its backbone (what
    an ImageNet initialisation supplies): mmseg segmentors' ``backbone``, everything but the
    classifiers of ADVENT's DeepLabV2, everything but layer5 and bn_pretrain of ProDA's."""
    from ddb_jax.models import advent_deeplabv2, daf_deeplabv2, proda_deeplabv2

    if isinstance(model, advent_deeplabv2.AdventDeepLabV2):
        return lambda name: name not in advent_deeplabv2.CLASSIFIER_MODULES
    if isinstance(model, daf_deeplabv2.DafDeepLabV2):  # the depth head is not ImageNet's
        skip = (*advent_deeplabv2.CLASSIFIER_MODULES, daf_deeplabv2.DEPTH_HEAD)
        return lambda name: name not in skip
    if isinstance(model, proda_deeplabv2.ProdaDeepLabV2):
        return lambda name: name not in proda_deeplabv2.CLASSIFIER_MODULES
    return lambda name: name == "backbone"


def init_variables(model: nn.Module, rng: jax.Array, image_size: tuple[int, int] = (64, 64)):
    """Random initial variables ({'params', 'batch_stats'}) for ``model``."""
    images = jnp.zeros((1, *image_size, 3), jnp.float32)
    return _init(model, {"params": rng, "dropout": rng}, images)


@functools.partial(jax.jit, static_argnums=0)
def _init(model: nn.Module, rngs, images):
    # One compiled program instead of hundreds of eagerly dispatched initialiser ops, and
    # one per distinct model in a process.
    return model.init(rngs, images, train=False)


def variable_shapes(model: nn.Module, image_size: tuple[int, int] = (64, 64)):
    """Shapes of ``model``'s variables without allocating them (for conversion/restore)."""
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_size))
