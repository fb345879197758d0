"""DAFormer's ImageNet feature distance, a self-training term (``config.fdist``).

DAFormer (``DACS.calc_feat_dist``) keeps a frozen copy of the ImageNet backbone and pulls
the student's last backbone map on the *source* image towards it, only where the
downscaled source label is a "thing" class: this keeps the ImageNet features of rare
object classes that synthetic data alone would let the student forget. Per iteration, on
the maps of the very source forward that gives the source loss:

    mask = downscale_label_ratio(source label, H // h, min_ratio) in classes
    loss = weight * mean over mask of || S_backbone(xs)[-1] - I_backbone(xs)[-1] ||_2

The frozen model runs in inference mode (BN running statistics, no drop path), as the
reference's ``imnet_model.eval()``. Its weights are ``config.fdist.imnet_from``, a model
directory: an ImageNet backbone (``tools/convert_checkpoint.py mit_b5.pth ...``) or the
``imnet_model.`` of a DAFormer checkpoint (``--which=imnet_model``); only the backbone is
read. The path is explicit because round 2's students start from the round-1 CKD
student, which is no ImageNet model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ddb_jax import checkpoints, errors, models, paths
from ddb_jax.labels import NUM_CLASSES
from ddb_jax.methods import base, self_training
from ddb_jax.uda import losses


class FeatureDistanceConfigError(errors.UsageError, ValueError):
    """config.fdist is not usable."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of config.fdist and the model directory it names."""
    cfg = config.fdist
    check_settings(config)
    if not cfg.imnet_from:
        raise FeatureDistanceConfigError(
            "config.fdist.enabled needs config.fdist.imnet_from: the ImageNet backbone "
            "(e.g. pretrained/mit_b5, converted with tools/convert_checkpoint.py) or the "
            "imnet_model of a DAFormer checkpoint (--which=imnet_model)"
        )
    if not paths.isfile(paths.join(cfg.imnet_from, checkpoints.MODEL_JSON)):
        raise checkpoints.CheckpointError(
            f"config.fdist.imnet_from={cfg.imnet_from!r} is not a model directory"
        )


def check_settings(config: ml_collections.ConfigDict) -> None:
    """config.fdist's own values (not the model directory it names)."""
    cfg = config.fdist
    if config.model.num_classes > NUM_CLASSES:
        raise FeatureDistanceConfigError(
            f"config.fdist downscales labels of at most {NUM_CLASSES} classes, the model has "
            f"{config.model.num_classes}"
        )
    bad = [c for c in cfg.classes if not 0 <= c < config.model.num_classes]
    if bad:
        raise FeatureDistanceConfigError(
            f"config.fdist.classes has {bad}, outside 0..{config.model.num_classes - 1}"
        )
    if not 0.0 <= cfg.min_ratio <= 1.0:
        raise FeatureDistanceConfigError(f"config.fdist.min_ratio={cfg.min_ratio}; use [0, 1]")


def backbone_only(variables: dict[str, Any]) -> dict[str, Any]:
    """The ``backbone`` subtree of every collection that has one."""
    return {k: {"backbone": v["backbone"]} for k, v in variables.items() if "backbone" in v}


def load_imnet(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The frozen ImageNet backbone (host arrays), checked against ``config.model``."""
    check_config(config)
    where = f"config.fdist.imnet_from={config.fdist.imnet_from!r}"
    loaded, stored_cfg = checkpoints.load_model_dir(config.fdist.imnet_from)
    # The backbone's name and LayerNorm convention; its widths are checked tensor by tensor.
    diffs = [k for k in ("backbone", "mit_layout")
             if k in stored_cfg and stored_cfg.get(k) != config.model.get(k)]  # fmt: skip
    if diffs:
        raise checkpoints.CheckpointError(
            f"{where} was built for another backbone: "
            + ", ".join(
                f"model.{k} {stored_cfg.get(k)!r} vs {config.model.get(k)!r}" for k in diffs
            )
        )
    wanted = backbone_only(models.variable_shapes(models.build_model(config.model)))
    imnet = backbone_only(loaded)
    checkpoints.check_tensors(wanted, imnet, f"{where} does not fit the backbone")
    imnet.setdefault("batch_stats", {})  # MiT has no BatchNorm
    return imnet


def imnet_shapes(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """:func:`load_imnet`'s tree as ShapeDtypeStructs, from ``config.model`` alone."""
    check_settings(config)
    imnet = backbone_only(models.variable_shapes(models.build_model(config.model)))
    imnet.setdefault("batch_stats", {})
    return imnet


def thing_mask(labels: jax.Array, feature_shape: tuple[int, int], cfg) -> jax.Array:
    """Where the feature distance applies: cells of the downscaled label in ``cfg.classes``."""
    scale = labels.shape[2] // feature_shape[1]
    rescaled = losses.downscale_label_ratio(labels, scale, cfg.min_ratio, NUM_CLASSES)
    if rescaled.shape[1:] != tuple(feature_shape):
        raise ValueError(
            f"the labels {labels.shape[1:]} downscale by {scale} to {rescaled.shape[1:]}, but "
            f"the backbone map is {tuple(feature_shape)}: use crops divisible by the stride"
        )
    return jnp.isin(rescaled, jnp.asarray(cfg.classes, jnp.int32))


@self_training.register_term(
    "fdist",
    order=1,
    source_backbone=True,
    load_frozen=load_imnet,
    check=check_config,
    frozen_shapes=imnet_shapes,
)
def feature_distance_term(method, params, ctx: base.Context):
    """``weight`` x the masked distance of the student's and the frozen backbone's last map."""
    del params  # the gradient reaches the student through ctx['source_backbone']
    cfg = method.options["fdist"]
    images, labels = ctx["batch"]["source_image"], ctx["batch"]["source_label"]
    student = ctx["source_backbone"][-1]
    frozen = method.student_apply(
        ctx["frozen"]["fdist"], images, train=False, method="extract_feat"
    )[-1]
    mask = None
    if cfg.classes:  # () = every pixel (DAFormer's imnet_feature_dist_classes=None)
        mask = thing_mask(labels, student.shape[1:3], cfg)
        ctx["fdist_mask"] = mask
    distance = losses.masked_feature_distance(student, jax.lax.stop_gradient(frozen), mask)
    return cfg.weight * distance, ctx
