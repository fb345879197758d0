"""What ProDA's stages share (:mod:`ddb_jax.methods.proda` stage 1,
:mod:`ddb_jax.methods.proda_distill` stages 2/3): the ``config.proda`` section and its
rules, the student's forward at a given size, the source and pseudo-label losses, and the
strong view: drawn on the device when the input delivers none, label maps moved like it.
"""

from __future__ import annotations

import jax
import ml_collections

from ddb_jax import config_rules
from ddb_jax.methods import base, previews
from ddb_jax.ops import (
    denormalize_image,
    normalize_image,
    resize_bilinear_corners,
    resize_nearest,
    upcast,
)
from ddb_jax.uda import adversarial, proda_ops, proda_strong, randaugment

SCALE = 4  # the quarter maps: strong-view pixels per map pixel
STRONG_VIEW_KEY = "strong_view"  # the step key the on-device strong view is drawn from


def default_config() -> ml_collections.ConfigDict:
    """``config.proda``: parser_train.py's defaults with the README's stage flags."""
    return ml_collections.ConfigDict(
        dict(
            prototypes="",  # stage 1: the initial table (.npz of stage 'prototypes', or .pth)
            teacher="",  # stages 2/3: the previous stage's model directory
            soft_labels="",  # stage 1: the warm-up model's soft pseudo-labels (a folder)
            pseudo_labels="",  # stages 2/3: the previous model's hard pseudo-labels (a folder)
            # The pipeline: a converted warm-up model to start from instead of training one
            # (the released warm-up checkpoints), and the student of stage 2 (ImageNet or
            # SimCLRv2 weights; stage 3 starts from stage 2).
            warmup_from="",
            student_init="",
            distill_lr=6e-4,  # stages 2/3's learning rate (--lr 6e-4; the head at 10x)
            proto_temperature=1.0,
            proto_momentum=1e-4,
            train_threshold=0.0,  # train_thred: rectified confidence below it is ignored
            consistency_weight=10.0,  # proto_consistW (README; the parser's default is 1)
            rce=True,
            rce_alpha=0.1,
            rce_beta=1.0,
            regular_weight=0.1,  # GTA5; the SYNTHIA command sets none (0)
            regular_type="mrkld",
            ema_decay=0.999,
            ema_train_mode=True,  # the reference's EMA is never in eval mode
            distill_weight=1.0,  # stages 2/3: --distillation 1
            distill_rce=False,  # stages 2/3 run without --rce
            kd_textbook=False,  # True: KL with the student's log-probabilities
            strong_align_corners=False,  # affine_grid / grid_sample (see uda/proda_strong)
            translate_x_by_width=False,  # True: TranslateX by 2v/W (the reference: 2v/H)
        )
    )


PATH = config_rules.PATH


def section_rules() -> dict:
    """What each non-boolean value of ``config.proda`` may be (ddb_jax.config_checks)."""
    positive = config_rules.real(0.0, low_open=True)
    return {
        "prototypes": PATH, "teacher": PATH, "soft_labels": PATH, "pseudo_labels": PATH,
        "warmup_from": PATH, "student_init": PATH, "distill_lr": positive,
        "proto_temperature": positive,
        "proto_momentum": config_rules.RATIO, "train_threshold": config_rules.RATIO,
        "consistency_weight": config_rules.NON_NEGATIVE, "rce_alpha": config_rules.NON_NEGATIVE,
        "rce_beta": config_rules.NON_NEGATIVE, "regular_weight": config_rules.NON_NEGATIVE,
        "regular_type": config_rules.one_of(proda_ops.REGULARISERS),
        "ema_decay": config_rules.RATIO, "distill_weight": config_rules.NON_NEGATIVE,
    }  # fmt: skip


def student_at(method, params, ctx: base.Context, images, key: str, size) -> dict:
    """The student (training mode) on ``images``, its outputs resized to ``size`` with
    align_corners=True (the reference's ``F.interpolate``); updates ``ctx['batch_stats']``."""
    outputs, ctx["batch_stats"] = base.student_forward(
        method.student_apply, params, ctx["batch_stats"], images, ctx["keys"][key]
    )
    return {name: resize_bilinear_corners(upcast(x), size) for name, x in outputs.items()}


def source_term(method, params, ctx: base.Context):
    """CE of the source logits upsampled to the label (``cross_entropy2d``)."""
    labels = ctx["batch"]["source_label"]
    out = student_at(method, params, ctx, ctx["batch"]["source_image"], "dropout_source",
                     labels.shape[1:3])  # fmt: skip
    return adversarial.valid_pixel_cross_entropy(out["logits"], labels), ctx


def pseudo_label_loss(logits, labels, ctx: base.Context, rce: bool, cfg) -> jax.Array:
    """CE, or ``rce_alpha`` CE + ``rce_beta`` reverse CE (``--rce``); parts kept in ``ctx``."""
    ctx["loss_ce"] = adversarial.valid_pixel_cross_entropy(logits, labels)
    if not rce:
        return ctx["loss_ce"]
    ctx["loss_rce"] = proda_ops.reverse_cross_entropy(logits, labels)
    return cfg.rce_alpha * ctx["loss_ce"] + cfg.rce_beta * ctx["loss_rce"]


def strong_like(maps, params, fill, cfg):
    """``maps`` moved like the strong view, with ``config.proda``'s grid settings."""
    return proda_strong.transform_like_strong(
        maps, params, fill, SCALE, cfg.strong_align_corners, cfg.translate_x_by_width
    )


def with_strong_view(batch: dict, key: jax.Array) -> dict:
    """``batch`` with ProDA's strong view of its weak target crop (``target_strong`` and
    its geometry ``strong_params``): drawn here on the device, RandAugmentMC(2, 10) per
    image (:mod:`ddb_jax.uda.randaugment`), unless the input delivered one (the step tests
    feed the reference's)."""
    if "target_strong" in batch:
        return batch
    images = batch["target_image"]
    count, height, width = images.shape[:3]
    draw = randaugment.draw_strong(key, count, height, width)
    strong, params = randaugment.apply_strong(denormalize_image(upcast(images)), draw)
    return {**batch, "target_strong": normalize_image(strong).astype(images.dtype),
            "strong_params": params}  # fmt: skip


def strong_view_update(method, txs, state, batch: dict, frozen):
    """The one-tree iteration on the batch with its strong view; the view is kept in the
    outputs (``target_strong``) for the preview."""
    batch = with_strong_view(batch, base.StepKeys(state, method.key_names)[STRONG_VIEW_KEY])
    new_state, outputs, metrics = base.single_tree_update(method, txs, state, batch, frozen)
    return new_state, {**outputs, "target_strong": batch["target_strong"]}, metrics


def label_panel(labels, size):
    """A quarter-size label map as a panel of the image's size."""
    return previews.colorize(resize_nearest(labels, size))
