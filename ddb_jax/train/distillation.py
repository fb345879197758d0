"""Cross-path knowledge distillation (CKD, §1.5): a jitted step and the stage that trains it.

Per iteration, as the reference ``CKD.forward_train``: source CE on the student; both
frozen path models (cut path "cu", class path "ca") in inference mode on the clean target
image, logits and features resized to the image size; optional prototype rectification of
each teacher; the two-teacher ensemble gives the pseudo-label (or, with ``soft_distill``,
a temperature-softened target); the student learns it on the strongly augmented target
image (the 'zero' bridging mask); source and target gradients are summed; one AdamW step.

The teachers (both models' variables and both prototype tables) are an *argument* of the
jitted step, replicated on the mesh: closing over them would bake hundreds of MB of
constants into the compiled program.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddb_jax import augment, bridging, checkpoints, losses, models, prototype_io, prototypes
from ddb_jax.ops import resize_bilinear
from ddb_jax.train.self_training import draw_bridging, no_dropout
from ddb_jax.train.state import TrainState, apply_gradients, student_forward

PATHS = ("cu", "ca")
# What writes each CKD input, for the error messages (the one-command pipeline's stage names).
PRODUCED_BY = {
    "teacher_cu": "the export/ directory of the cut-path self-training stage "
    "(pipeline stage r1_cu or r2_cu)",
    "teacher_ca": "the export/ directory of the class-path self-training stage "
    "(pipeline stage r1_ca or r2_ca)",
    "prototypes_cu": "stage 'prototypes' run on the cut-path model "
    "(pipeline stage r1_proto_cu / r2_proto_cu)",
    "prototypes_ca": "stage 'prototypes' run on the class-path model "
    "(pipeline stage r1_proto_ca / r2_proto_ca)",
}
TEACHER_DTYPES = ("float32", "bfloat16")


class DistillationConfigError(ValueError):
    """config.ckd (or a setting CKD depends on) is not usable."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of config.ckd and the files it names, before anything is loaded."""
    ckd = config.ckd
    if ckd.teacher_dtype not in TEACHER_DTYPES:
        raise DistillationConfigError(
            f"config.ckd.teacher_dtype={ckd.teacher_dtype!r}; use one of {list(TEACHER_DTYPES)}"
        )
    if ckd.soft_distill and not ckd.temperature > 0:
        raise DistillationConfigError(f"config.ckd.temperature={ckd.temperature!r}; it must be > 0")
    if config.st.mask != "zero":
        raise DistillationConfigError(
            f"config.st.mask={config.st.mask!r}, but stage 'ckd' trains the student on the "
            "strongly augmented target image alone (the reference's CKD data uses "
            "mask='zero'); set config.st.mask='zero'"
        )
    for path in PATHS:
        key = f"teacher_{path}"
        model_dir = ckd[key]
        if not model_dir or not os.path.isfile(os.path.join(model_dir, checkpoints.MODEL_JSON)):
            state = "is not set" if not model_dir else "is not a model directory"
            raise checkpoints.CheckpointError(
                f"config.ckd.{key}={model_dir!r} {state}; it must be {PRODUCED_BY[key]}"
            )
        if ckd.proto_rectify:
            key = f"prototypes_{path}"
            file = ckd[key]
            if not file or not os.path.isfile(file):
                state = "is not set" if not file else "does not exist"
                raise prototype_io.PrototypeError(
                    f"config.ckd.{key}={file!r} {state} (needed by config.ckd.proto_rectify="
                    f"True); it is written by {PRODUCED_BY[key]}"
                )


def teacher_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The student's architecture with dropout off and the teachers' compute dtype."""
    model_cfg = no_dropout(config.model)
    model_cfg.dtype = config.ckd.teacher_dtype
    return model_cfg


def load_teachers(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Both teachers as one host pytree ``{'cu': {'variables', ['prototypes']}, 'ca': ...}``.

    Checks each teacher's architecture against config.model and each prototype table's
    shape (classes x head channels). With ``teacher_dtype='bfloat16'`` the parameters
    are stored in bf16 (half the memory; BN statistics stay float32). Prototypes are
    loaded only when ``config.ckd.proto_rectify`` is on.
    """
    check_config(config)
    ckd = config.ckd
    teachers: dict[str, Any] = {path: {} for path in PATHS}
    # Architectures and prototype tables first: small files, so a mistake in the second
    # teacher shows before the first one's weights are read.
    for path in PATHS:
        key = f"teacher_{path}"
        stored_cfg, _ = checkpoints.read_model_config(ckd[key])
        checkpoints.check_compatible(
            stored_cfg, config.model, f"config.ckd.{key}={ckd[key]!r} ({PRODUCED_BY[key]})"
        )
        if ckd.proto_rectify:
            key = f"prototypes_{path}"
            try:
                table, _ = prototype_io.load_prototypes(
                    ckd[key],
                    config.model.num_classes,
                    config.model.head_channels,
                    produced_by=PRODUCED_BY[key],
                )
            except prototype_io.PrototypeError as err:
                raise prototype_io.PrototypeError(f"config.ckd.{key}: {err}") from err
            teachers[path]["prototypes"] = table
    wanted = _paths_and_shapes(models.variable_shapes(models.build_model(config.model)))
    for path in PATHS:
        key = f"teacher_{path}"
        variables, _ = checkpoints.load_model_dir(ckd[key])
        _check_tensors(wanted, variables, f"config.ckd.{key}={ckd[key]!r}")
        params = variables["params"]
        if ckd.teacher_dtype == "bfloat16":
            params = jax.tree_util.tree_map(lambda x: np.asarray(x, jnp.bfloat16), params)
        teachers[path]["variables"] = {
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
        }
    return teachers


def _paths_and_shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in flat}


def _check_tensors(wanted: dict[str, tuple[int, ...]], variables: dict, what: str) -> None:
    """Every tensor of the model, none other, each of the model's shape (a clear error
    here instead of an opaque one when the step is traced)."""
    have = _paths_and_shapes(variables)
    missing = sorted(set(wanted) - set(have))
    unexpected = sorted(set(have) - set(wanted))
    shapes = [f"{k} {have[k]} vs model {wanted[k]}" for k in sorted(set(wanted) & set(have))
              if have[k] != wanted[k]]  # fmt: skip
    if missing or unexpected or shapes:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:8])}"
            for label, keys in (
                ("missing tensors", missing),
                ("unexpected tensors", unexpected),
                ("shape conflicts", shapes),
            )
            if keys
        ]
        raise checkpoints.CheckpointError(f"{what} does not fit config.model: " + "; ".join(parts))


def teacher_predictions(
    teachers: dict[str, Any],
    images: jax.Array,
    *,
    teacher_apply,
    ckd_cfg: ml_collections.ConfigDict,
) -> dict[str, dict[str, jax.Array]]:
    """Per teacher: logits at image size (float32) and, with rectification, prototype weights.

    Teachers run in inference mode (BN running statistics, no dropout), as the reference's
    ``encode_decode`` after ``.eval()``; logits and features are resized to the image size.
    """
    size = images.shape[1:3]
    out = {}
    for path in PATHS:
        logits, feature = teacher_apply(teachers[path]["variables"], images, train=False)
        logits = jax.lax.stop_gradient(resize_bilinear(logits.astype(jnp.float32), size))
        entry = {"logits": logits}
        if ckd_cfg.proto_rectify:
            entry["weights"] = jax.lax.stop_gradient(
                prototypes.prototype_weights(
                    jax.lax.stop_gradient(feature),
                    teachers[path]["prototypes"].astype(jnp.float32),
                    size=size,
                    at_feature_resolution=ckd_cfg.prototypes_at_feature_resolution,
                )
            )
        out[path] = entry
    return out


def ensemble_targets(
    preds: dict[str, dict[str, jax.Array]],
    ckd_cfg: ml_collections.ConfigDict,
    pseudo_threshold: float,
) -> dict[str, jax.Array]:
    """Pseudo-labels, pixel weights (and the soft target) from the two teachers.

    Hard labels (reference, ``soft_distill`` off): rectified probabilities
    ``0.5 W_cu softmax(l_cu) + 0.5 W_ca softmax(l_ca)`` (or on logits,
    ``0.5 softmax(W_cu l_cu) + 0.5 softmax(W_ca l_ca)``; without rectification the plain
    0.5/0.5 softmax ensemble); argmax; weight 1, or with ``use_pl_weight`` the batch
    fraction of ensemble maxima >= ``pseudo_threshold``. Soft (``soft_distill``): the target
    logits ``(W_cu l_cu + W_ca l_ca) / 2`` (W = 1 without rectification).
    """
    l_cu, l_ca = preds["cu"]["logits"], preds["ca"]["logits"]
    if ckd_cfg.proto_rectify:
        w_cu, w_ca = preds["cu"]["weights"], preds["ca"]["weights"]
    else:
        w_cu = w_ca = jnp.ones((), jnp.float32)
    out = {"teacher_agreement": jnp.mean(jnp.argmax(l_cu, -1) == jnp.argmax(l_ca, -1))}
    if ckd_cfg.soft_distill:
        target = prototypes.rectified_logit_average(l_cu, w_cu, l_ca, w_ca)
        out["soft_target"] = target
        out["pseudo_labels"] = jnp.argmax(target, -1).astype(jnp.int32)
        out["pseudo_weight"] = jnp.ones(l_cu.shape[:3], jnp.float32)
    else:
        on_prob = ckd_cfg.rectify_on_prob or not ckd_cfg.proto_rectify
        labels, confidence = prototypes.rectified_ensemble(
            l_cu, w_cu, l_ca, w_ca, on_probabilities=on_prob
        )
        if ckd_cfg.use_pl_weight:
            weight = losses.confident_fraction(confidence, pseudo_threshold)
        else:
            weight = jnp.ones((), jnp.float32)
        out["pseudo_labels"] = labels
        out["pseudo_weight"] = jnp.broadcast_to(weight, labels.shape).astype(jnp.float32)
    if ckd_cfg.proto_rectify:  # share of pseudo-labels the prototypes changed
        if ckd_cfg.soft_distill:
            plain = jnp.argmax(l_cu + l_ca, -1)
        else:
            plain = jnp.argmax(jax.nn.softmax(l_cu, -1) + jax.nn.softmax(l_ca, -1), -1)
        out["rectify_changed"] = jnp.mean(plain != out["pseudo_labels"])
    return out


def distillation_grads(
    state: TrainState,
    batch: dict[str, jax.Array],
    teachers: dict[str, Any],
    *,
    student_apply,
    teacher_apply,
    ckd_cfg: ml_collections.ConfigDict,
    st_cfg: ml_collections.ConfigDict,
    draws: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Gradients of source CE + target loss, and the student BN state the step leaves behind.

    ``draws`` overrides the random draws ({'masks': all-zero, 'aug': per-image strong
    augmentation parameters}; tests feed the PyTorch reference the same ones).
    """
    if st_cfg.mask != "zero":
        raise DistillationConfigError(f"CKD needs config.st.mask='zero', got {st_cfg.mask!r}")
    step_key = jax.random.fold_in(state.key, state.step)
    draw_key, drop_src_key, drop_tgt_key = jax.random.split(step_key, 3)
    if draws is None:
        draws = draw_bridging(draw_key, batch["source_label"], st_cfg)

    preds = teacher_predictions(
        teachers, batch["target_image"], teacher_apply=teacher_apply, ckd_cfg=ckd_cfg
    )
    targets = ensemble_targets(preds, ckd_cfg, st_cfg.pseudo_threshold)
    # The 'zero' mask: the student's target input is the strongly augmented target image.
    student_image = bridging.mix(draws["masks"], batch["source_image"], batch["target_image"])
    student_image = jax.vmap(augment.apply_strong)(student_image, draws["aug"])

    def loss_fn(params):
        (src_logits, _), batch_stats = student_forward(
            student_apply, params, state.batch_stats, batch["source_image"], drop_src_key
        )
        src_loss = losses.cross_entropy(src_logits, batch["source_label"])
        (tgt_logits, _), batch_stats = student_forward(
            student_apply, params, batch_stats, student_image, drop_tgt_key
        )
        if ckd_cfg.soft_distill:
            # The reference's encode_decode: student logits resized to the image size.
            resized = resize_bilinear(tgt_logits.astype(jnp.float32), student_image.shape[1:3])
            tgt_loss = ckd_cfg.soft_distill_weight * losses.distillation_kl(
                resized, targets["soft_target"], ckd_cfg.temperature
            )
        else:
            tgt_loss = losses.cross_entropy(
                tgt_logits, targets["pseudo_labels"], targets["pseudo_weight"]
            )
        aux = {
            "batch_stats": batch_stats,
            "loss_source": src_loss,
            "loss_target": tgt_loss,
            "acc_source": losses.pixel_accuracy(src_logits, batch["source_label"]),
        }
        return src_loss + tgt_loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    aux.update(
        loss=loss,
        teacher_agreement=targets["teacher_agreement"],
        pseudo_weight=jnp.mean(targets["pseudo_weight"]),
        pseudo_labels=targets["pseudo_labels"],
        student_image=student_image,
    )
    if "rectify_changed" in targets:
        aux["rectify_changed"] = targets["rectify_changed"]
    return grads, aux


METRICS = ("loss", "loss_source", "loss_target", "acc_source", "teacher_agreement",
           "pseudo_weight", "rectify_changed")  # fmt: skip


def distillation_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    teachers: dict[str, Any],
    *,
    student_apply,
    teacher_apply,
    tx: optax.GradientTransformation,
    ckd_cfg: ml_collections.ConfigDict,
    st_cfg: ml_collections.ConfigDict,
    draws: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One CKD iteration: gradients, one AdamW update of the student and its BN statistics."""
    grads, aux = distillation_grads(
        state,
        batch,
        teachers,
        student_apply=student_apply,
        teacher_apply=teacher_apply,
        ckd_cfg=ckd_cfg,
        st_cfg=st_cfg,
        draws=draws,
    )
    return apply_gradients(state, grads, aux["batch_stats"], tx=tx), step_metrics(aux, grads)


def step_metrics(aux: dict[str, Any], grads: Any) -> dict[str, jax.Array]:
    """The scalars a step reports (``rectify_changed`` only with prototype rectification)."""
    metrics = {k: aux[k] for k in METRICS if k in aux}
    metrics["grad_norm"] = optax.tree.norm(grads)
    return metrics


PREVIEW_PANELS = (
    "source image", "target image", "student input", "cu teacher", "ca teacher",
    "pseudo-label", "student prediction on target",
)  # fmt: skip


def preview_images(
    state: TrainState,
    batch: dict[str, jax.Array],
    teachers: dict[str, Any],
    *,
    student_apply,
    teacher_apply,
    ckd_cfg: ml_collections.ConfigDict,
    st_cfg: ml_collections.ConfigDict,
    max_samples: int = 4,
) -> dict[str, jax.Array]:
    """The step that produced ``state`` from ``batch``, as image panels (PREVIEW_PANELS).

    Recomputed outside the train step: the augmentation comes from the same
    ``fold_in(key, step - 1)`` draw, the teachers are frozen, so the student input and the
    pseudo-labels are the step's own. The prediction is the updated student in inference
    mode. Returns {"ckd": (n, h, 7w + gaps, 3) uint8}.
    """
    from ddb_jax.train import previews

    step_key = jax.random.fold_in(state.key, state.step - 1)
    draw_key, _, _ = jax.random.split(step_key, 3)  # as distillation_grads splits it
    draws = draw_bridging(draw_key, batch["source_label"], st_cfg)
    preds = teacher_predictions(
        teachers, batch["target_image"], teacher_apply=teacher_apply, ckd_cfg=ckd_cfg
    )
    targets = ensemble_targets(preds, ckd_cfg, st_cfg.pseudo_threshold)
    student_image = bridging.mix(draws["masks"], batch["source_image"], batch["target_image"])
    student_image = jax.vmap(augment.apply_strong)(student_image, draws["aug"])
    logits, _ = student_apply(state.variables(), batch["target_image"], train=False)
    size = batch["target_image"].shape[1:3]
    prediction = jnp.argmax(resize_bilinear(logits.astype(jnp.float32), size), axis=-1)
    panels = [
        previews.denormalize(batch["source_image"]),
        previews.denormalize(batch["target_image"]),
        previews.denormalize(student_image),
        previews.colorize(jnp.argmax(preds["cu"]["logits"], -1)),
        previews.colorize(jnp.argmax(preds["ca"]["logits"], -1)),
        previews.colorize(targets["pseudo_labels"]),
        previews.colorize(prediction),
    ]
    return {"ckd": previews.panel_rows(panels, max_samples=max_samples)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Stage 'ckd': a student (config.init_from) distilled from config.ckd's two teachers."""
    from ddb_jax.train import setup
    from ddb_jax.train.loop import check_workdir_config, train_loop

    check_workdir_config(workdir, config)
    check_config(config)
    host_teachers = load_teachers(config)
    teacher = setup.build(teacher_model_config(config))
    run = setup.prepare_run(config)
    # CKD has no EMA teacher: empty fields keep checkpoints to the student and its optimiser.
    state = run.state.replace(ema_params={}, ema_batch_stats={})
    teachers = jax.device_put(host_teachers, run.replicated)
    del host_teachers
    step = functools.partial(
        distillation_step,
        student_apply=run.model.apply,
        teacher_apply=teacher.apply,
        tx=run.tx,
        ckd_cfg=config.ckd,
        st_cfg=config.st,
    )
    jitted = jax.jit(
        step,
        in_shardings=(run.replicated, run.batch_sharding, run.replicated),
        out_shardings=(run.replicated, run.replicated),
        donate_argnums=0,
    )
    preview_fn = None
    if config.image_summary_every > 0:
        preview = jax.jit(
            functools.partial(
                preview_images,
                student_apply=run.model.apply,
                teacher_apply=teacher.apply,
                ckd_cfg=config.ckd,
                st_cfg=config.st,
            ),
            in_shardings=(run.replicated, run.batch_sharding, run.replicated),
            out_shardings=run.replicated,
        )
        preview_fn = lambda state, batch: preview(state, batch, teachers)  # noqa: E731
    return train_loop(
        config,
        workdir,
        state,
        lambda state, batch: jitted(state, batch, teachers),
        run.make_batches,
        run.evaluate_student,
        lambda state: jax.device_get(state.variables()),
        preview_fn=preview_fn,
    )
