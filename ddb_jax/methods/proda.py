"""ProDA stage 1 (Zhang et al., CVPR 2021; microsoft/ProDA): prototypical pseudo-label
denoising and target structure learning. Stage kind 'proda'; the config section ``proda``
(shared with stages 2/3, :mod:`ddb_jax.methods.proda_distill`; its defaults and rules in
:mod:`ddb_jax.methods.proda_shared`) is declared here.

Per iteration, as the reference's ``CustomModel.step`` (stage1: --ema --proto_rectify
--moving_prototype --rce --proto_consistW 10 --regular_w 0.1):

1. source CE (logits upsampled to the image, align_corners=True; mean over valid pixels);
2. the EMA model on the whole target image (BN on batch statistics and dropout on: the
   reference never puts it in eval mode; ``ema_train_mode``) -> features and logits at a
   quarter of the image, the features moved into the weak crop's frame;
3. prototype weights (distances to the table, softmax of ``-(d - d_min) T``) times the soft
   pseudo-label -> argmax: the denoised label (ignored below ``train_threshold``);
4. the student on the weak view: ``rce_alpha`` CE + ``rce_beta`` reverse CE + ``regular_
   weight`` x MRKLD, logits at a quarter of the crop;
5. the student on the strong view: KL from the EMA's prototype assignment (its distances
   moved like the strong view) to the student's, x ``consistency_weight``;
6. one SGD step on the sum; then the prototype table (momentum ``proto_momentum``) from the
   EMA's own predictions and features on the whole image, computed in 2 before the step;
   then the EMA: parameters ``decay e + (1 - decay) p`` of the updated student, BN
   statistics copied from it.

Batch (static shapes; the weak crop is H x W, the quarter maps H // 4 x W // 4):

    source_image       float [B, Hs, Ws, 3]  normalised source images
    source_label       int32 [B, Hs, Ws]     255 = ignore
    target_image       float [B, H, W, 3]    weak view: the target resized to target_resized,
                                             cropped at target_crop, flipped where target_flip
    target_strong      float [B, H, W, 3]    the strong view of the weak view (strong_params);
                                             without it (and strong_params) the step draws
                                             one on the device (with_strong_view)
    target_full        float [B, Hf, Wf, 3]  the whole target image (the EMA's input)
    target_soft_label  float [B, H, W, K]    the warm-up model's softmax moved like the weak
                       or [B, H//4, W//4, K] view (at the crop's size the step takes its
                                             quarter, bilinear with align_corners=True)
    target_resized     int32 [B, 2]          (h, w) of the resized full image, in pixels
    target_crop        int32 [B, 2]          (y1, x1) of the weak crop in it
    target_flip        bool  [B]             the weak view is flipped
    strong_params      dict                  ddb_jax.uda.proda_strong's parameters
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp
import ml_collections

from ddb_jax import paths
from ddb_jax.labels import IGNORE_LABEL
from ddb_jax.methods import base, previews, registry
from ddb_jax.methods.proda_shared import (
    default_config,
    label_panel,
    pseudo_label_loss,
    section_rules,
    source_term,
    strong_like,
    strong_view_update,
    student_at,
)
from ddb_jax.methods.state import TrainState
from ddb_jax.offline import prototype_io
from ddb_jax.ops import resize_bilinear_corners, upcast
from ddb_jax.uda import proda_ops

DISTANCE_PADDING = 250.0  # the reference's padding of moved distance maps (a distance value)


@flax.struct.dataclass
class ProDAState(TrainState):
    ema_params: Any  # the EMA model
    ema_batch_stats: Any
    prototypes: jax.Array  # (K, C) class prototypes, updated by momentum every step


def target_term(method: ProDA, params, ctx: base.Context):
    """The student on the weak view against the denoised label (+ MRKLD / MRENT)."""
    cfg = method.cfg
    out = student_at(method, params, ctx, ctx["batch"]["target_image"], "dropout_target",
                     ctx["labels"].shape[1:3])  # fmt: skip
    logits = out["logits"]
    ctx["target_prediction"] = jnp.argmax(logits, axis=-1)
    loss = pseudo_label_loss(logits, ctx["labels"], ctx, cfg.rce, cfg)
    ctx["loss_regular"] = proda_ops.regulariser(logits, cfg.regular_type)
    if cfg.regular_weight > 0:
        loss = loss + cfg.regular_weight * ctx["loss_regular"]
    return loss, ctx


def consistency_term(method: ProDA, params, ctx: base.Context):
    """Target structure learning on a separate strong forward (none when its weight is 0)."""
    cfg = method.cfg
    if cfg.consistency_weight <= 0:
        return jnp.zeros((), jnp.result_type(float)), ctx
    out = student_at(method, params, ctx, ctx["batch"]["target_strong"], "dropout_strong",
                     ctx["labels"].shape[1:3])  # fmt: skip
    table = jax.lax.stop_gradient(ctx["state"].prototypes)
    student = proda_ops.prototype_distances(out["feature"], table)
    ctx["structure_kl"] = proda_ops.structure_kl(
        student, ctx["teacher_distances"], cfg.proto_temperature, DISTANCE_PADDING
    )
    return cfg.consistency_weight * ctx["structure_kl"], ctx


@dataclasses.dataclass(frozen=True)
class ProDA(base.OneTree):
    student_apply: Callable
    cfg: ml_collections.ConfigDict  # config.proda
    num_classes: int

    name: ClassVar[str] = "proda"
    key_names: ClassVar[tuple[str, ...]] = (
        "dropout_source", "dropout_target", "dropout_strong", "dropout_ema",
    )  # fmt: skip
    terms: ClassVar[tuple] = (
        ("source", source_term), ("target", target_term), ("consistency", consistency_term),
    )  # fmt: skip
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss_source", "loss_target", "loss_consistency", "loss_ce", "loss_rce",
        "loss_regular", "structure_kl", "denoise_changed", "ignored",
    )  # fmt: skip
    preview_tag: ClassVar[str] = "proda"
    preview_panels: ClassVar[tuple[str, ...]] = (
        "weak view", "soft pseudo-label", "denoised pseudo-label",
        "student prediction on the weak view", "strong view",
    )  # fmt: skip

    def update(self, txs, state: TrainState, batch, frozen=None):
        return strong_view_update(self, txs, state, batch, frozen)

    def initial_prototypes(self, state: TrainState) -> jax.Array:
        """The table of ``config.proda.prototypes``, else zeros (K, feature channels)."""
        dtype = jnp.result_type(float)
        file = self.cfg.prototypes
        if not file:
            shapes = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.variables()
            )
            probe = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
            feature = jax.eval_shape(self.student_apply, shapes, probe)["feature"]
            return jnp.zeros((self.num_classes, feature.shape[-1]), dtype)
        if file.endswith(".pth"):
            table, _ = prototype_io.load_reference_pth(file)
        else:
            table, _ = prototype_io.load_prototypes(file, self.num_classes)
        return jnp.asarray(table, dtype)

    def init_state(self, state: TrainState) -> ProDAState:
        """The EMA starts as the student (the reference's ``load_state_dict`` copy)."""
        return ProDAState(
            **state.fields(),
            ema_params=jax.tree_util.tree_map(jnp.copy, state.params),
            ema_batch_stats=jax.tree_util.tree_map(jnp.copy, state.batch_stats),
            prototypes=self.initial_prototypes(state),
        )

    def ema_outputs(self, state: ProDAState, images, key) -> dict:
        """The EMA model on ``images``, no gradient (its BN statistics are not kept: the
        reference overwrites them with the student's after the step)."""
        variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
        if self.cfg.ema_train_mode:
            outputs, _ = self.student_apply(
                variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key}
            )
        else:
            outputs = self.student_apply(variables, images, train=False)
        return jax.lax.stop_gradient(outputs)

    def prepare(self, state: ProDAState, batch, keys, frozen) -> base.Context:
        """The EMA's features and logits, the denoised label, the teacher's distances."""
        cfg = self.cfg
        size = proda_ops.quarter_size(batch["target_image"].shape[1:3])
        full = proda_ops.quarter_size(batch["target_full"].shape[1:3])
        ema = self.ema_outputs(state, batch["target_full"], keys["dropout_ema"])
        ema_feature = resize_bilinear_corners(upcast(ema["feature"]), full)
        ema_logits = resize_bilinear_corners(upcast(ema["logits"]), full)
        weak_feature = proda_ops.full_to_weak(
            ema_feature, batch["target_resized"], batch["target_crop"], batch["target_flip"], size
        )
        distances = proda_ops.prototype_distances(weak_feature, state.prototypes)
        weights = proda_ops.prototype_weights(distances, cfg.proto_temperature)
        soft = proda_ops.soft_label_at(batch["target_soft_label"], size)
        labels = proda_ops.denoised_labels(soft, weights, cfg.train_threshold)
        soft_labels = jnp.argmax(soft, axis=-1)
        dtype = weights.dtype
        return {
            "ema_feature": ema_feature,
            "ema_logits": ema_logits,
            "prototype_weights": weights,
            "soft_labels": soft_labels,
            "labels": labels,
            "denoise_changed": jnp.mean(labels != soft_labels, dtype=dtype),
            "ignored": jnp.mean(labels == IGNORE_LABEL, dtype=dtype),
            "teacher_distances": strong_like(
                distances, batch["strong_params"], DISTANCE_PADDING, cfg
            ),  # fmt: skip
        }

    def finish(self, state: ProDAState, outputs: base.Context) -> ProDAState:
        """The prototype table from the EMA's pre-step outputs, then the EMA of the updated
        student (parameters averaged, BN statistics copied)."""
        cfg = self.cfg
        vectors, valid = proda_ops.class_mean_features(outputs["ema_feature"],
                                                       outputs["ema_logits"])  # fmt: skip
        table = proda_ops.momentum_update(state.prototypes, vectors, valid, cfg.proto_momentum)
        decay = cfg.ema_decay
        ema = jax.tree_util.tree_map(
            lambda e, p: e * decay + p * (1.0 - decay), state.ema_params, state.params
        )
        return state.replace(
            prototypes=table.astype(state.prototypes.dtype),
            ema_params=ema,
            ema_batch_stats=jax.tree_util.tree_map(jnp.copy, state.batch_stats),
        )

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        size = batch["target_image"].shape[1:3]
        return [
            previews.denormalize(batch["target_image"]),
            label_panel(outputs["soft_labels"], size),
            label_panel(outputs["labels"], size),
            label_panel(outputs["target_prediction"], size),
            previews.denormalize(outputs["target_strong"]),
        ]


def check_config(config: ml_collections.ConfigDict) -> None:
    """One target stream, and the initial prototype table exists."""
    base.check_one_target_stream(config)
    file = config.proda.prototypes
    if not file or not paths.isfile(file):
        state = "is not set" if not file else "does not exist"
        raise registry.MethodConfigError(
            f"config.proda.prototypes={file!r} {state}: stage 'proda' starts from the warm-up "
            "model's class prototypes (a prototypes.npz of stage 'prototypes', or the "
            "reference's calc_prototype.py file)"
        )


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model) -> ProDA:
    return ProDA(student_apply, config.proda, config.model.num_classes)


registry.register(
    registry.MethodSpec(
        kinds=("proda",),
        create=create,
        check=check_config,
        config_section=("proda", default_config),
        section_rules=section_rules,
    )
)
