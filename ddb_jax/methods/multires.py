"""HRDA's multi-resolution student in training (docs/method.md §6): the detail box, the
training forward and the loss, for every method whose student is an HRDA segmentor.

HRDA (``HRDAEncoderDecoder.forward_train``) trains each student forward on two crops of
the same image: the context (the whole training crop at half resolution) and a detail
crop at full resolution, placed at random with offsets divisible by ``crop_divisible``
(8: the fused maps of both scales then align cell for cell). Each forward draws its own
box, as the reference draws one per ``forward_train`` call; here the box is drawn from
the forward's dropout key folded with a constant, so a method's existing draws do not
move, and it reaches the model as an int32 (2,) array: the compiled step is the same for
every box. The loss is HRDA's head loss with ``lr_loss_weight=0``:

    (1 - lambda_d) CE(fused, y, w) + lambda_d CE(detail, crop(y), crop(w))

Methods reach this through :func:`ddb_jax.methods.base.student_forward` and
``labelled_term``; nothing else in a method changes with HRDA.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ddb_jax import models
from ddb_jax.uda import losses

# Folded into a forward's dropout key to draw its detail box (as StepKeys names a key).
BOX_SALT = zlib.crc32(b"hrda_box") >> 1


def segmentor(apply_fn: Callable) -> Any:
    """The HRDA segmentor behind ``apply_fn`` (a bound ``model.apply``), or None."""
    return getattr(apply_fn, "__self__", None) if models.is_multi_resolution(apply_fn) else None


def draw_box(
    key: jax.Array, image_size: tuple[int, int], crop: tuple[int, int], divisible: int
) -> jax.Array:
    """HRDA's ``get_crop_bbox``: top-left (y1, x1), int32 (2,), each uniform over the
    multiples of ``divisible`` in ``[0, (margin + 1) // divisible)`` x ``divisible`` with
    ``margin = max(size - crop, 0)`` (numpy's ``randint`` upper bound excluded)."""
    choices = [max(size - c, 0) + 1 for size, c in zip(image_size, crop, strict=True)]
    counts = jnp.asarray([max(n // divisible, 1) for n in choices], jnp.int32)
    draws = jax.random.randint(key, (2,), 0, counts, dtype=jnp.int32)
    return draws * divisible


def crop_box(x: jax.Array, box: jax.Array, crop: tuple[int, int]) -> jax.Array:
    """``x[:, y1:y1 + ch, x1:x1 + cw]`` for (N, H, W, ...) arrays and a traced box."""
    zero = jnp.zeros((), box.dtype)  # one index type (int64 zeros under x64 would not mix)
    start = (zero, box[0], box[1]) + (zero,) * (x.ndim - 3)
    return jax.lax.dynamic_slice(x, start, (x.shape[0], *crop, *x.shape[3:]))


def training_forward(
    apply_fn: Callable, variables: dict, images: jax.Array, dropout_key: jax.Array
) -> tuple[dict[str, Any], dict]:
    """The student's training forward on a drawn box: (outputs with 'detail_box', updated
    collections)."""
    model = segmentor(apply_fn)
    box = draw_box(
        jax.random.fold_in(dropout_key, BOX_SALT),
        images.shape[1:3],
        tuple(model.detail_crop),
        model.crop_divisible,
    )
    outputs, updates = apply_fn(
        variables,
        images,
        box,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_key},
        method="forward_train",
    )
    return {**outputs, "detail_box": box}, updates


def segmentation_loss(
    apply_fn: Callable,
    outputs: dict[str, Any],
    labels: jax.Array,
    weight: jax.Array | None,
    fused_scale: float = 1.0,
) -> jax.Array:
    """HRDA's head loss: the fused prediction on the whole crop and the detail prediction
    on its own box of the labels (and weights), mixed by the model's detail loss weight.
    ``fused_scale`` multiplies the fused term alone, as MIC's ``mask_lambda`` scales only
    the reference's 'decode.loss_seg'."""
    model = segmentor(apply_fn)
    fused = fused_scale * losses.cross_entropy(outputs["logits"], labels, weight)
    if model.detail_loss_weight == 0:
        return fused
    box, crop = outputs["detail_box"], tuple(model.detail_crop)
    detail_weight = None if weight is None else crop_box(weight, box, crop)
    detail = losses.cross_entropy(
        outputs["detail_logits"], crop_box(labels, box, crop), detail_weight
    )
    return (1.0 - model.detail_loss_weight) * fused + model.detail_loss_weight * detail
