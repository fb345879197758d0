"""Losses and pseudo-labels of self-training and distillation (docs/method.md §1.1, §1.2, §1.5).

mmseg semantics (DDB pins mmseg 0.22): logits come at the head's output stride and are
resized bilinearly (align_corners=False) to the label size inside the loss; the weighted
cross-entropy is averaged over *all* pixels, ignored ones included in the denominator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddb_jax.labels import IGNORE_LABEL
from ddb_jax.ops import resize_bilinear, upcast


def _to_label_size(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return resize_bilinear(upcast(logits), labels.shape[1:3])


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    pixel_weight: jax.Array | None = None,
    ignore_index: int = IGNORE_LABEL,
) -> jax.Array:
    """mmseg CrossEntropyLoss: logits (N, h, w, K), labels (N, H, W), weight (N, H, W).

    Per-pixel CE (0 at ``ignore_index``) times the weight, then the mean over N*H*W.
    """
    logits = _to_label_size(logits, labels)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ignored = labels == ignore_index
    safe = jnp.where(ignored, 0, labels).astype(jnp.int32)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(ignored, 0.0, nll)
    if pixel_weight is not None:
        nll = nll * pixel_weight.astype(nll.dtype)
    return jnp.mean(nll)


def pixel_accuracy(
    logits: jax.Array, labels: jax.Array, ignore_index: int | None = IGNORE_LABEL
) -> jax.Array:
    """Top-1 pixel accuracy in percent (mmseg ``accuracy``), logits resized to the labels.

    With ``ignore_index=None`` every pixel counts in the denominator: that is the
    ``acc_seg`` DDB logs (its mmseg 0.22 call passes no ignore index).
    """
    pred = jnp.argmax(_to_label_size(logits, labels), axis=-1)
    correct = pred == labels
    if ignore_index is None:
        return 100.0 * jnp.mean(correct, dtype=upcast(logits).dtype)
    valid = labels != ignore_index
    return 100.0 * jnp.sum(correct & valid) / jnp.maximum(jnp.sum(valid), 1)


def distillation_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Soft distillation: KL(softmax(t/T) || softmax(s/T)) x T^2 (CKD ``soft_distill``).

    The reference's ``kl_div(..., 'batchmean') / (H*W)`` is the per-pixel KL (summed over
    classes) averaged over all N*H*W pixels. Both inputs (N, H, W, K) at the same size;
    ``teacher_logits`` is the (rectified) two-teacher average. The CKD weight (0.1) is the
    caller's.
    """
    log_p_student = jax.nn.log_softmax(upcast(student_logits) / temperature, -1)
    p_teacher = jax.nn.softmax(upcast(teacher_logits) / temperature, -1)
    log_p_teacher = jnp.log(jnp.where(p_teacher > 0, p_teacher, 1.0))
    kl = jnp.sum(p_teacher * (log_p_teacher - log_p_student), axis=-1)
    return jnp.mean(kl) * temperature**2


def confident_fraction(confidence: jax.Array, threshold: float) -> jax.Array:
    """Share of pixels of the whole batch with confidence >= threshold (a scalar)."""
    return jnp.mean(confidence >= threshold, dtype=upcast(confidence).dtype)


def pseudo_labels(
    teacher_logits: jax.Array,
    image_size: tuple[int, int],
    threshold: float = 0.968,
    ignore_top: int = 0,
    ignore_bottom: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Teacher logits (N, h, w, K) -> (labels int32 (N, H, W), pixel weight (N, H, W)).

    Logits are resized to ``image_size``; the label is the argmax, and the weight is ONE
    scalar for the batch (the fraction of pixels with max softmax >= threshold), set to 0
    in the top ``ignore_top`` and bottom ``ignore_bottom`` rows.
    """
    probs = jax.nn.softmax(resize_bilinear(upcast(teacher_logits), image_size), -1)
    labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    weight = confident_fraction(jnp.max(probs, axis=-1), threshold)
    rows = jnp.arange(image_size[0])
    keep = (rows >= ignore_top) & (rows < image_size[0] - ignore_bottom)
    pixel_weight = jnp.broadcast_to(
        jnp.where(keep[:, None], weight, 0.0), (labels.shape[0], *image_size)
    )
    return labels, pixel_weight


# --- DAFormer's ImageNet feature distance (docs/method.md §1.1) -----------------------------


def downscale_label_ratio(
    labels: jax.Array,
    scale_factor: int,
    min_ratio: float,
    num_classes: int = 19,
    ignore_index: int = IGNORE_LABEL,
) -> jax.Array:
    """DAFormer's ``downscale_label_ratio``: (N, H, W) labels -> (N, H // s, W // s).

    Each s x s cell takes its most frequent value (the ignore value counting as a class;
    the first on ties), or ``ignore_index`` when that value covers less than ``min_ratio``
    of the cell. Rows and columns beyond a multiple of s are dropped, as ``avg_pool2d`` does.
    """
    if scale_factor <= 1:
        raise ValueError(f"downscale_label_ratio needs a scale factor > 1, got {scale_factor}")
    n, h, w = labels.shape
    s = scale_factor
    th, tw = h // s, w // s
    slots = jnp.where(labels == ignore_index, num_classes, labels).astype(jnp.int32)
    cells = slots[:, : th * s, : tw * s].reshape(n, th, s, tw, s)
    one_hot = jax.nn.one_hot(cells, num_classes + 1, dtype=jnp.int32)
    counts = jnp.sum(one_hot, axis=(2, 4))  # (N, th, tw, K + 1), exact integers
    best = jnp.argmax(counts, axis=-1)
    # The reference's ratio: an average pool of the float32 one-hot (exact count / s^2).
    ratio = jnp.max(counts, axis=-1).astype(jnp.float32) / jnp.float32(s * s)
    out = jnp.where(best == num_classes, ignore_index, best)
    return jnp.where(ratio < min_ratio, ignore_index, out).astype(jnp.int32)


def masked_feature_distance(
    student: jax.Array, frozen: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean over the masked pixels of the per-pixel L2 distance of two (N, h, w, C) maps.

    DAFormer's ``masked_feat_dist``. Two deliberate deviations that leave its gradients
    unchanged: an empty mask gives 0 (the reference's mean of nothing is NaN, with zero
    gradients), and a pixel where the maps coincide gets the zero subgradient of the norm,
    as torch's ``norm`` backward gives (a plain sqrt would give NaN there).
    """
    diff = upcast(student) - upcast(frozen)
    squared = jnp.sum(diff * diff, axis=-1)
    positive = squared > 0
    distance = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    if mask is None:
        return jnp.mean(distance)
    mask = mask.astype(distance.dtype)
    return jnp.sum(distance * mask) / jnp.maximum(jnp.sum(mask), 1.0)
