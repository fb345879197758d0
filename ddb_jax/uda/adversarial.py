"""The losses of ADVENT and the adversarial methods built on it (valeoai/ADVENT), as the
reference computes them: pure functions of arrays.

ADVENT's discriminators see weighted self-information maps of the segmentor's softmax
(ProDA's warm-up: the softmax itself); they are trained with binary cross-entropy (ProDA:
least squares) against a constant domain label (source 0, target 1), and the segmentor is
trained to make target maps look like source ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax.labels import IGNORE_LABEL

SOURCE_LABEL = 0.0  # ADVENT's domain labels (train_UDA.py)
TARGET_LABEL = 1.0
_LOG_EPS = 1e-30  # inside log2 only, as the reference


def self_information(probs: jax.Array) -> jax.Array:
    """``-p log2(p + 1e-30) / log2(C)`` per pixel and class (ADVENT's ``prob_2_entropy``):
    the discriminator's input; NHWC."""
    num_classes = probs.shape[-1]
    return -probs * jnp.log2(probs + _LOG_EPS) / np.log2(num_classes)


def entropy_loss(probs: jax.Array) -> jax.Array:
    """MinEnt's loss: the normalised per-pixel entropy summed over classes, averaged over
    N, H and W."""
    return jnp.mean(jnp.sum(self_information(probs), axis=-1))


def bce_to_label(logits: jax.Array, label: float) -> jax.Array:
    """``BCEWithLogitsLoss`` against a map filled with ``label``: mean over every element."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return jnp.mean(jnp.maximum(logits, 0) - logits * label + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def mse_to_label(outputs: jax.Array, label: float) -> jax.Array:
    """``MSELoss`` against a map filled with ``label``: the least-squares GAN loss (ProDA's
    warm-up, its default ``--gan LS``), mean over every element."""
    outputs = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
    return jnp.mean(jnp.square(outputs - label))


def valid_pixel_cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_LABEL
) -> jax.Array:
    """ADVENT's ``cross_entropy_2d``: CE summed over the batch's valid pixels (label >= 0 and
    not ``ignore_index``) divided by their count; logits at the labels' size. A batch
    without a valid pixel gives 0 (the reference: NaN, with the same zero gradient)."""
    valid = (labels >= 0) & (labels != ignore_index)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    count = jnp.sum(valid)
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def kl_to_teacher(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """MTAF's distillation loss (``kl_divergence``, utils/loss.py): ``F.kl_div(
    log_softmax(student), softmax(teacher), size_average=True)``, i.e. ``p_t (log p_t -
    log p_s)`` averaged over every element, classes included (1/C of the per-pixel KL),
    temperature 1; NHWC logits. The caller detaches the teacher."""
    log_student = jax.nn.log_softmax(student_logits, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits, axis=-1)
    return jnp.mean(jnp.exp(log_teacher) * (log_teacher - log_student))
