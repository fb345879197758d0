"""ProDA stages 2 and 3 (microsoft/ProDA ``CustomModel.step_distillation``): self-training on
offline pseudo-labels with knowledge distillation from the previous stage's model. Stage
kind 'proda_distill'; its settings are ``config.proda`` (:mod:`ddb_jax.methods.proda`).

Per iteration, as the reference with --S_pseudo 1 --distillation 1 (no --rce):

1. source CE (logits upsampled to the image, align_corners=True; mean over valid pixels);
2. the pseudo-label taken at a quarter of the crop (nearest) and moved like the strong view;
3. the student on the strong view, logits at that quarter size (align_corners=True): CE
   against it (``distill_rce``: ``rce_alpha`` CE + ``rce_beta`` reverse CE);
4. the frozen teacher (eval mode) on the strong view: ``distill_weight`` x the reference's
   ``kl_div(softmax(student), softmax(teacher))``, averaged over every (pixel, class)
   (``kd_textbook``: the KL of the log-probabilities, averaged over pixels);
5. one SGD step on the sum (the decode head at ``optim.head_lr_mult`` = 10x: --finetune).

The pseudo-labels are made offline by the previous stage (flip-averaged softmax, argmax,
confidence <= 0.95 ignored); the teacher is ``config.proda.teacher`` (a model directory),
with its own architecture (stage 2's teacher has no ``bn_pretrain``).

Batch (static shapes; the strong view is H x W):

    source_image   float [B, Hs, Ws, 3]  normalised source images
    source_label   int32 [B, Hs, Ws]     255 = ignore
    target_strong  float [B, H, W, 3]    the strong view of the weak crop (strong_params);
                                         drawn on the device when absent (target_image)
    target_label   int32 [B, H, W]       the pseudo-label moved like the weak view (255 =
                   or [B, H//4, W//4]    ignore); at the crop's size the step takes every
                                         4th pixel, as the reference's nearest 0.25 resize
    strong_params  dict                  ddb_jax.uda.proda_strong's parameters
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from ddb_jax import checkpoints, models, paths
from ddb_jax.labels import IGNORE_LABEL
from ddb_jax.methods import base, previews, registry
from ddb_jax.methods.proda_shared import (
    label_panel,
    pseudo_label_loss,
    source_term,
    strong_like,
    strong_view_update,
)
from ddb_jax.methods.self_training import no_dropout
from ddb_jax.methods.state import TrainState
from ddb_jax.ops import resize_bilinear_corners, upcast
from ddb_jax.uda import proda_ops


def target_term(method: ProDADistill, params, ctx: base.Context):
    """The student on the strong view against the moved pseudo-label."""
    out, ctx["batch_stats"] = base.student_forward(
        method.student_apply, params, ctx["batch_stats"], ctx["batch"]["target_strong"],
        ctx["keys"]["dropout_target"],
    )  # fmt: skip
    logits = resize_bilinear_corners(upcast(out["logits"]), ctx["labels"].shape[1:3])
    ctx["strong_logits"] = logits
    ctx["student_prediction"] = jnp.argmax(logits, axis=-1)
    loss = pseudo_label_loss(logits, ctx["labels"], ctx, method.cfg.distill_rce, method.cfg)
    return loss, ctx


def distill_term(method: ProDADistill, params, ctx: base.Context):
    """KD from the frozen teacher on the same student forward (none when its weight is 0)."""
    cfg = method.cfg
    if cfg.distill_weight <= 0:
        return jnp.zeros((), jnp.result_type(float)), ctx
    ctx["kd"] = proda_ops.distillation_kl(
        ctx["strong_logits"], ctx["teacher_logits"], textbook=cfg.kd_textbook
    )
    return cfg.distill_weight * ctx["kd"], ctx


@dataclasses.dataclass(frozen=True)
class ProDADistill(base.OneTree):
    student_apply: Callable
    teacher_apply: Callable  # the teacher's own architecture
    cfg: ml_collections.ConfigDict  # config.proda

    name: ClassVar[str] = "proda_distill"
    key_names: ClassVar[tuple[str, ...]] = ("dropout_source", "dropout_target")
    terms: ClassVar[tuple] = (
        ("source", source_term), ("target", target_term), ("distill", distill_term),
    )  # fmt: skip
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss_source", "loss_target", "loss_distill", "loss_ce", "loss_rce", "kd", "ignored",
    )  # fmt: skip
    preview_tag: ClassVar[str] = "proda_distill"
    preview_panels: ClassVar[tuple[str, ...]] = (
        "strong view", "pseudo-label moved like it", "teacher prediction",
        "student prediction",
    )  # fmt: skip

    def update(self, txs, state: TrainState, batch, frozen=None):
        return strong_view_update(self, txs, state, batch, frozen)

    def init_state(self, state: TrainState) -> TrainState:
        return state

    def prepare(self, state: TrainState, batch, keys, frozen) -> base.Context:
        """The moved pseudo-label and the teacher's logits, both at the quarter size."""
        images = batch["target_strong"]
        size = proda_ops.quarter_size(images.shape[1:3])
        quarter = proda_ops.labels_at(batch["target_label"], size)
        labels = strong_like(quarter, batch["strong_params"], IGNORE_LABEL, self.cfg)
        out = {
            "labels": labels,
            "ignored": jnp.mean(labels == IGNORE_LABEL, dtype=jnp.result_type(float)),
        }
        if self.cfg.distill_weight > 0:
            teacher = self.teacher_apply(frozen["variables"], images, train=False)["logits"]
            logits = resize_bilinear_corners(upcast(teacher), size)
            out["teacher_logits"] = jax.lax.stop_gradient(logits)
        return out

    def finish(self, state: TrainState, outputs: base.Context) -> TrainState:
        return state

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        size = outputs["target_strong"].shape[1:3]
        teacher = outputs.get("teacher_logits", outputs["strong_logits"])
        return [
            previews.denormalize(outputs["target_strong"]),
            label_panel(outputs["labels"], size),
            label_panel(jnp.argmax(teacher, axis=-1), size),
            label_panel(outputs["student_prediction"], size),
        ]


def teacher_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The teacher's architecture as its model directory records it (the student's when no
    teacher is set), without dropout, in the student's compute dtype."""
    model_cfg = config.model
    if config.proda.teacher:
        model_cfg, _ = checkpoints.read_model_config(config.proda.teacher)
    model_cfg = no_dropout(model_cfg)
    model_cfg.dtype = config.model.dtype
    return model_cfg


def check_config(config: ml_collections.ConfigDict) -> None:
    """The teacher is a model directory of the same classes."""
    teacher = config.proda.teacher
    if config.proda.distill_weight <= 0:
        return
    if not teacher or not paths.isfile(paths.join(teacher, checkpoints.MODEL_JSON)):
        state = "is not set" if not teacher else "is not a model directory"
        raise checkpoints.CheckpointError(
            f"config.proda.teacher={teacher!r} {state}; stage 'proda_distill' distils the "
            "previous ProDA stage's model (its export/ directory)"
        )
    stored, _ = checkpoints.read_model_config(teacher)
    if stored.num_classes != config.model.num_classes:
        raise checkpoints.CheckpointError(
            f"config.proda.teacher={teacher!r} predicts {stored.num_classes} classes, "
            f"config.model.num_classes={config.model.num_classes}"
        )


def load_teacher(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """``{'variables': the teacher's}`` as host arrays (None without distillation)."""
    if config.proda.distill_weight <= 0:
        return None
    check_config(config)
    teacher = config.proda.teacher
    variables, _ = checkpoints.load_model_dir(teacher)
    wanted = models.variable_shapes(models.build_model(teacher_model_config(config)))
    checkpoints.check_tensors(wanted, variables, f"config.proda.teacher={teacher!r}")
    return {"variables": {"params": variables["params"],
                          "batch_stats": variables.get("batch_stats", {})}}  # fmt: skip


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model):
    teacher_apply = build_model(teacher_model_config(config)).apply
    return ProDADistill(student_apply, teacher_apply, config.proda)


registry.register(
    registry.MethodSpec(
        kinds=("proda_distill",), create=create, check=check_config, load_frozen=load_teacher
    )
)
