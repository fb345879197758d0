"""One DDB self-training path (§1.1): a jitted step and the stage that trains it.

Per iteration, as the reference ``ST.forward_train``: EMA update of the teacher;
source CE; teacher pseudo-labels on the clean target (teacher BN in training mode,
dropout off); a bridging mask mixes source and target, the mixed image is strongly
augmented; weighted CE on the mixed image; gradients of both losses summed; one
AdamW step. Masks and augmentation are drawn inside the step from the step's key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddb_jax import augment, bridging, losses
from ddb_jax.ops import resize_bilinear
from ddb_jax.train import previews
from ddb_jax.train.state import TrainState, apply_gradients, ema_update, student_forward


def draw_bridging(key: jax.Array, source_labels: jax.Array, st_cfg) -> dict[str, Any]:
    """The random part of a step: bridging masks and per-image augmentation parameters."""
    mask_key, aug_key = jax.random.split(key)
    masks = bridging.make_masks(
        mask_key, source_labels, st_cfg.mask, area_ratio=st_cfg.cut_area_ratio
    )
    aug = jax.vmap(
        lambda k: augment.draw_strong_params(
            k, st_cfg.color_jitter_p, st_cfg.color_jitter_strength, st_cfg.blur_p
        )
    )(jax.random.split(aug_key, source_labels.shape[0]))
    return {"masks": masks, "aug": aug}


def bridge(batch: dict, masks: jax.Array, aug: dict, pseudo: jax.Array, pseudo_weight: jax.Array):
    """Mixed image (strongly augmented), mixed label and mixed pixel weight."""
    mixed = bridging.mix(masks, batch["source_image"], batch["target_image"])
    mixed = jax.vmap(augment.apply_strong)(mixed, aug)
    labels = bridging.mix(masks, batch["source_label"], pseudo)
    weight = bridging.mix(masks, jnp.ones_like(pseudo_weight), pseudo_weight)
    return mixed, labels, weight


def self_training_grads(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    student_apply,
    teacher_apply,
    st_cfg: ml_collections.ConfigDict,
    draws: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Gradients of source CE + mixed CE, and the teacher/BN state the step leaves behind.

    ``draws`` overrides the random draws (tests feed the PyTorch reference the same ones).
    """
    step_key = jax.random.fold_in(state.key, state.step)
    draw_key, drop_src_key, drop_mix_key = jax.random.split(step_key, 3)
    if draws is None:
        draws = draw_bridging(draw_key, batch["source_label"], st_cfg)

    ema_params = ema_update(state.ema_params, state.params, state.step, st_cfg.ema_alpha)
    # Teacher: BN in training mode (target-batch statistics, own running stats), no dropout.
    (teacher_logits, _), teacher_vars = teacher_apply(
        {"params": ema_params, "batch_stats": state.ema_batch_stats},
        batch["target_image"],
        train=True,
        mutable=["batch_stats"],
    )
    image_size = batch["source_label"].shape[1:3]
    pseudo, pseudo_weight = losses.pseudo_labels(
        jax.lax.stop_gradient(teacher_logits),
        image_size,
        st_cfg.pseudo_threshold,
        st_cfg.pseudo_weight_ignore_top,
        st_cfg.pseudo_weight_ignore_bottom,
    )
    mixed_image, mixed_label, mixed_weight = bridge(
        batch, draws["masks"], draws["aug"], pseudo, pseudo_weight
    )

    def loss_fn(params):
        (src_logits, _), batch_stats = student_forward(
            student_apply, params, state.batch_stats, batch["source_image"], drop_src_key
        )
        src_loss = losses.cross_entropy(src_logits, batch["source_label"])
        (mix_logits, _), batch_stats = student_forward(
            student_apply, params, batch_stats, mixed_image, drop_mix_key
        )
        mix_loss = losses.cross_entropy(mix_logits, mixed_label, mixed_weight)
        aux = {
            "batch_stats": batch_stats,
            "loss_source": src_loss,
            "loss_mixed": mix_loss,
            "acc_source": losses.pixel_accuracy(src_logits, batch["source_label"]),
        }
        return src_loss + mix_loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    aux.update(
        loss=loss,
        ema_params=ema_params,
        ema_batch_stats=teacher_vars["batch_stats"],
        pseudo_weight=jnp.mean(pseudo_weight),
        pseudo_labels=pseudo,
        mixed_image=mixed_image,
        mixed_label=mixed_label,
    )
    return grads, aux


def self_training_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    student_apply,
    teacher_apply,
    tx: optax.GradientTransformation,
    st_cfg: ml_collections.ConfigDict,
    draws: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One iteration: gradients, one AdamW update, the EMA teacher and its BN statistics."""
    grads, aux = self_training_grads(
        state,
        batch,
        student_apply=student_apply,
        teacher_apply=teacher_apply,
        st_cfg=st_cfg,
        draws=draws,
    )
    new_state = apply_gradients(state, grads, aux["batch_stats"], tx).replace(
        ema_params=aux["ema_params"], ema_batch_stats=aux["ema_batch_stats"]
    )
    scalars = ("loss", "loss_source", "loss_mixed", "acc_source", "pseudo_weight")
    metrics = {k: aux[k] for k in scalars}
    metrics["grad_norm"] = optax.tree.norm(grads)
    return new_state, metrics


PREVIEW_PANELS = (
    "source image", "source label", "target image", "pseudo-label", "mixed image",
    "mixed label", "student prediction on target",
)  # fmt: skip


def preview_images(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    student_apply,
    teacher_apply,
    st_cfg: ml_collections.ConfigDict,
    max_samples: int = 4,
) -> dict[str, jax.Array]:
    """The bridging of the step that produced ``state`` from ``batch``, as image panels.

    Recomputed outside the train step (which stays as fast as without summaries): the
    step drew masks and augmentation from ``fold_in(key, step - 1)`` and ran the teacher
    with ``state.ema_params`` (stored by that step) in BN-train mode, so the same draw and
    pseudo-labels come out here. The prediction is the updated student in inference mode.
    Returns {"bridging": (n, h, 7w + gaps, 3) uint8}, panels in PREVIEW_PANELS order.
    """
    step_key = jax.random.fold_in(state.key, state.step - 1)
    draw_key, _, _ = jax.random.split(step_key, 3)  # as self_training_grads splits it
    draws = draw_bridging(draw_key, batch["source_label"], st_cfg)
    (teacher_logits, _), _ = teacher_apply(
        state.ema_variables(), batch["target_image"], train=True, mutable=["batch_stats"]
    )
    image_size = batch["source_label"].shape[1:3]
    pseudo, pseudo_weight = losses.pseudo_labels(
        teacher_logits,
        image_size,
        st_cfg.pseudo_threshold,
        st_cfg.pseudo_weight_ignore_top,
        st_cfg.pseudo_weight_ignore_bottom,
    )
    mixed_image, mixed_label, _ = bridge(batch, draws["masks"], draws["aug"], pseudo, pseudo_weight)
    logits, _ = student_apply(state.variables(), batch["target_image"], train=False)
    prediction = jnp.argmax(resize_bilinear(logits.astype(jnp.float32), image_size), axis=-1)
    panels = [
        previews.denormalize(batch["source_image"]),
        previews.colorize(batch["source_label"]),
        previews.denormalize(batch["target_image"]),
        previews.colorize(pseudo),
        previews.denormalize(mixed_image),
        previews.colorize(mixed_label),
        previews.colorize(prediction),
    ]
    return {"bridging": previews.panel_rows(panels, max_samples=max_samples)}


def no_dropout(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same architecture with dropout and drop-path off (the EMA teacher's forward)."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.dropout_ratio = 0.0
    cfg.drop_path_rate = 0.0
    return cfg


def make_train_step(
    config: ml_collections.ConfigDict,
    student_apply: Callable,
    teacher_apply: Callable,
    tx: optax.GradientTransformation,
    replicated: Any = None,
    batch_sharding: Any = None,
) -> Callable:
    """The stage's jitted step, state donated; the benchmarks time and measure this one.

    With ``replicated``/``batch_sharding`` (NamedShardings of the mesh) the state is
    replicated and the batch split over 'data'; without, jit places by its inputs.
    """
    step = functools.partial(
        self_training_step,
        student_apply=student_apply,
        teacher_apply=teacher_apply,
        tx=tx,
        st_cfg=config.st,
    )
    if replicated is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(
        step,
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Stage 'self_training': trains one bridging path (config.st.mask = cut | class)."""
    from ddb_jax.train import setup
    from ddb_jax.train.loop import check_workdir_config, train_loop

    check_workdir_config(workdir, config)
    run = setup.prepare_run(config)
    teacher = setup.build(no_dropout(config.model))
    train_step = make_train_step(
        config, run.model.apply, teacher.apply, run.tx, run.replicated, run.batch_sharding
    )
    preview_fn = None
    if config.image_summary_every > 0:
        preview_fn = jax.jit(
            functools.partial(
                preview_images,
                student_apply=run.model.apply,
                teacher_apply=teacher.apply,
                st_cfg=config.st,
            ),
            in_shardings=(run.replicated, run.batch_sharding),
            out_shardings=run.replicated,
        )
    return train_loop(
        config,
        workdir,
        run.state,
        train_step,
        run.make_batches,
        run.evaluate_student,
        lambda state: jax.device_get(state.variables()),
        preview_fn=preview_fn,
    )
