"""Cross-path knowledge distillation (CKD, docs/method.md §1.5).

Per iteration, as the reference ``CKD.forward_train``: source CE on the student; both
frozen path models (cut path "cu", class path "ca") in inference mode on the clean target
image, logits and features resized to the image size; optional prototype rectification of
each teacher; the two-teacher ensemble (:mod:`ddb_jax.uda.ensemble`) gives the pseudo-label
(or, with ``soft_distill``, a temperature-softened target); the student learns it on the
strongly augmented target image (the 'zero' bridging mask); source and target gradients
are summed; one AdamW step. The teachers and prototype tables are the step's ``frozen``
argument (:mod:`ddb_jax.methods.teachers` loads them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import ml_collections

from ddb_jax.methods import base, previews, registry, self_training, teachers
from ddb_jax.methods.state import TrainState
from ddb_jax.ops import resize_bilinear, upcast
from ddb_jax.uda import bridging, ensemble, losses, prototypes


def teacher_outputs(
    frozen: dict[str, Any], images: jax.Array, teacher_apply: Callable, ckd_cfg
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array] | None]:
    """Both teachers' logits at image size and, with rectification, their prototype weights.

    Teachers run in inference mode (BN running statistics, no dropout), as the reference's
    ``encode_decode`` after ``.eval()``.
    """
    size = images.shape[1:3]
    logits, weights = [], []
    for path in teachers.PATHS:
        outputs = teacher_apply(frozen[path]["variables"], images, train=False)
        feature = outputs["feature"]
        logits.append(jax.lax.stop_gradient(resize_bilinear(upcast(outputs["logits"]), size)))
        if ckd_cfg.proto_rectify:
            table = frozen[path]["prototypes"].astype(logits[-1].dtype)
            weights.append(
                jax.lax.stop_gradient(
                    prototypes.prototype_weights(
                        jax.lax.stop_gradient(feature),
                        table,
                        size=size,
                        at_feature_resolution=ckd_cfg.prototypes_at_feature_resolution,
                    )
                )
            )
    return tuple(logits), (tuple(weights) if weights else None)


def target_term(method: CKD, params, ctx: base.Context):
    """The student on its target input against the ensemble: CE (hard) or KL (soft)."""
    cfg = method.ckd
    image = ctx["student_image"]
    if not cfg.soft_distill:
        loss, logits = base.labelled_term(
            method, params, ctx, image, ctx["pseudo_labels"], ctx["keys"]["dropout_target"],
            ctx["pseudo_pixel_weight"],
        )  # fmt: skip
    else:
        outputs, ctx["batch_stats"] = base.student_forward(
            method.student_apply, params, ctx["batch_stats"], image, ctx["keys"]["dropout_target"]
        )
        logits = outputs["logits"]
        # The reference's encode_decode: student logits resized to the image size.
        resized = resize_bilinear(upcast(logits), image.shape[1:3])
        loss = cfg.soft_distill_weight * losses.distillation_kl(
            resized, ctx["soft_target"], cfg.temperature
        )
    ctx["student_prediction"] = base.prediction(logits, image.shape[1:3])
    return loss, ctx


@dataclasses.dataclass(frozen=True)
class CKD(base.OneTree):
    student_apply: Callable
    teacher_apply: Callable  # the student's architecture, no dropout, the teachers' dtype
    ckd: ml_collections.ConfigDict
    st: ml_collections.ConfigDict
    terms: tuple[tuple[str, base.Term], ...] = (
        ("source", base.source_term),
        ("target", target_term),
    )

    name: ClassVar[str] = "ckd"
    key_names: ClassVar[tuple[str, ...]] = ("bridging", "dropout_source", "dropout_target")
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss_source", "loss_target", "acc_source", "teacher_agreement", "pseudo_weight",
        "rectify_changed",
    )  # fmt: skip
    preview_tag: ClassVar[str] = "ckd"
    preview_panels: ClassVar[tuple[str, ...]] = (
        "source image", "target image", "student input", "cu teacher", "ca teacher",
        "pseudo-label", "student prediction on its input",
    )  # fmt: skip

    def init_state(self, state: TrainState) -> TrainState:
        return state

    def prepare(self, state: TrainState, batch, keys, frozen) -> base.Context:
        """The teachers' ensemble target on the clean target; the student's input."""
        logits, weights = teacher_outputs(
            frozen, batch["target_image"], self.teacher_apply, self.ckd
        )
        targets = ensemble.ensemble_targets(
            logits,
            weights,
            soft=self.ckd.soft_distill,
            on_probabilities=self.ckd.rectify_on_prob,
            use_confidence_weight=self.ckd.use_pl_weight,
            threshold=self.st.pseudo_threshold,
        )
        # The 'zero' mask: the student's target input is the strongly augmented target image.
        draws, student_image = bridging.bridged_input(keys, batch, self.st)
        return {
            **targets,
            "pseudo_pixel_weight": self_training.valid_pseudo_region(
                targets["pseudo_weight"], batch
            ),
            "pseudo_weight": targets["pseudo_weight"].mean(),
            "teacher_labels": tuple(jax.numpy.argmax(x, -1) for x in logits),
            "draws": draws,
            "student_image": student_image,
        }

    def finish(self, state: TrainState, outputs: base.Context) -> TrainState:
        return state

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        cu_labels, ca_labels = outputs["teacher_labels"]
        return [
            previews.denormalize(batch["source_image"]),
            previews.denormalize(batch["target_image"]),
            previews.denormalize(outputs["student_image"]),
            previews.colorize(cu_labels),
            previews.colorize(ca_labels),
            previews.colorize(outputs["pseudo_labels"]),
            previews.colorize(outputs["student_prediction"]),
        ]


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model) -> CKD:
    teachers.check_settings(config)  # the files: check_config, before the loop
    return CKD(
        student_apply=student_apply,
        teacher_apply=build_model(teachers.teacher_model_config(config)).apply,
        ckd=config.ckd,
        st=config.st,
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """The bridging mask (the student's input), then the teachers and prototype files."""
    self_training.check_bridging(config)
    teachers.check_config(config)


def frozen_shapes(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The teachers and prototype tables as ShapeDtypeStructs (no file read)."""
    self_training.check_bridging(config)
    return teachers.teacher_shapes(config)


registry.register(
    registry.MethodSpec(
        kinds=("ckd",),
        create=create,
        check=check_config,
        load_frozen=teachers.load_teachers,
        frozen_shapes=frozen_shapes,
    )
)
