"""ProDA's array ops (Zhang et al., CVPR 2021; microsoft/ProDA ``models/adaptation_modelv2.py``).

Pure functions on NHWC arrays, with the reference's arithmetic and reductions: prototype
distances and weights, the EMA features moved into the weak crop's frame, the denoised
pseudo-label, the symmetric (reverse) cross-entropy, the MRKLD / MRENT regulariser, the
target-structure and distillation KL terms, and the momentum update of the prototype table.
Label maps and soft maps follow the strong view with :mod:`ddb_jax.uda.proda_strong`.

Sizes: ProDA computes its target losses at a quarter of the weak crop (``H // 4, W // 4``),
every resize bilinear with align_corners=True.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax.labels import IGNORE_LABEL
from ddb_jax.ops import resize_bilinear_corners, upcast

HIGHEST = jax.lax.Precision.HIGHEST
MIN_CLASS_PIXELS = 10  # calculate_mean_vector: a class needs 10 pixels of an image
RCE_PROB_FLOOR = 1e-7  # rce: softmax clamped to [1e-7, 1]
# rce: log of the one-hot clamped at 1e-4, which the reference builds in float32 (`.float()`)
# whatever the prediction's dtype: the log of float32(1e-4), rounded to float32.
RCE_LOG_FLOOR = float(np.float32(np.log(np.float64(np.float32(1e-4)))))
RCE_DENOMINATOR_EPS = 1e-6
REGULARISERS = ("mrkld", "mrent")


def quarter_size(size: tuple[int, int]) -> tuple[int, int]:
    """``(H // 4, W // 4)``: where ProDA's target losses live (``int(H / 4)``)."""
    return size[0] // 4, size[1] // 4


def soft_label_at(soft: jax.Array, size: tuple[int, int]) -> jax.Array:
    """The soft pseudo-label (N, h, w, K) at ``size``: as it is when already there, else the
    reference's ``interpolate(scale_factor=0.25, bilinear, align_corners=True)``."""
    soft = upcast(soft)
    return soft if soft.shape[1:3] == tuple(size) else resize_bilinear_corners(soft, size)


def labels_at(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Hard labels (N, h, w) at ``size``: as they are when already there, else the reference's
    ``interpolate(scale_factor=0.25)`` (nearest: source index ``4 * i``)."""
    if labels.shape[1:3] == tuple(size):
        return labels
    return labels[:, ::4, ::4][:, : size[0], : size[1]]


def prototype_distances(features: jax.Array, table: jax.Array) -> jax.Array:
    """L2 distance (N, H, W, K) of each pixel feature (N, H, W, C) to each prototype (K, C).

    The reference's ``torch.norm(proto - feat)`` per class, expanded as ``|f|^2 - 2 f.p +
    |p|^2`` about the prototypes' mean (one matmul; ``uda.prototypes`` does the same), with
    the zero subgradient of the norm where a feature meets a prototype (the student's
    gradient flows through these distances; a bare sqrt would give NaN there).
    """
    f = upcast(features)
    p = table.astype(f.dtype)
    center = jnp.mean(p, axis=0)
    f, p = f - center, p - center
    cross = jnp.einsum("nhwc,kc->nhwk", f, p, precision=HIGHEST)
    squared = jnp.sum(f * f, -1, keepdims=True) - 2.0 * cross + jnp.sum(p * p, -1)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def prototype_weights(distances: jax.Array, temperature: float) -> jax.Array:
    """``softmax_k(-(d - min_k d) * T)`` (``get_prototype_weight``); (N, H, W, K)."""
    nearest = jnp.min(distances, axis=-1, keepdims=True)
    return jax.nn.softmax(-(distances - nearest) * temperature, axis=-1)


def denoised_labels(
    soft: jax.Array, weights: jax.Array, threshold: float, ignore_index: int = IGNORE_LABEL
) -> jax.Array:
    """The rectified pseudo-label (N, H, W) int32: argmax of ``weights * soft``; ignored where
    the rectified distribution's top probability is below ``threshold`` (``train_thred``)."""
    rectified = weights * soft
    labels = jnp.argmax(rectified, axis=-1).astype(jnp.int32)
    top = jnp.max(rectified / jnp.sum(rectified, axis=-1, keepdims=True), axis=-1)
    return jnp.where(top < threshold, ignore_index, labels)


def _bilinear_taps(start, resized, in_len: int, out_len: int, reverse, dtype):
    """One axis of ``full2weak``: positions ``start + i`` (reversed when flipped) of a map of
    ``resized`` entries resized from ``in_len`` with align_corners=True; torch's taps."""
    index = jnp.arange(out_len)
    index = jnp.where(reverse, out_len - 1 - index, index)
    steps = jnp.maximum(resized - 1, 1).astype(dtype)
    scale = jnp.where(resized > 1, (in_len - 1) / steps, 0.0)
    src = (start + index).astype(dtype) * scale
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_len - 1)
    i1 = jnp.where(i0 < in_len - 1, i0 + 1, i0)
    w1 = jnp.clip(src - i0.astype(dtype), 0.0, 1.0)
    return i0, i1, 1.0 - w1, w1


def full_to_weak(
    features: jax.Array,
    resized: jax.Array,
    origin: jax.Array,
    flip: jax.Array,
    size: tuple[int, int],
) -> jax.Array:
    """The EMA's full-image features in the weak crop's frame (the reference's ``full2weak``).

    ``features`` (N, Hq, Wq, C): the full image's at a quarter of its size. Per image, as the
    weak view was made: resized to ``resized // 4`` (bilinear, align_corners=True), cropped
    at ``origin // 4`` to ``size`` (the weak crop's quarter), flipped where ``flip``.
    ``resized`` (N, 2) and ``origin`` (N, 2) int: (h, w) of the resized full image and
    (y1, x1) of the crop in it, in pixels; ``flip`` (N,) bool. One gather per tap, so the
    output shape is static whatever each image's geometry.
    """
    features = upcast(features)
    _, hq, wq, _ = features.shape
    dtype = features.dtype

    def one(feat, res, org, flp):
        r0, r1, a0, a1 = _bilinear_taps(org[0] // 4, res[0] // 4, hq, size[0], False, dtype)
        c0, c1, b0, b1 = _bilinear_taps(org[1] // 4, res[1] // 4, wq, size[1], flp, dtype)
        rows = feat[r0] * a0[:, None, None] + feat[r1] * a1[:, None, None]
        return rows[:, c0] * b0[None, :, None] + rows[:, c1] * b1[None, :, None]

    return jax.vmap(one)(features, resized, origin, flip)


def reverse_cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_LABEL
) -> jax.Array:
    """``rce``: ``-sum_c p_c log(clamp(onehot_c, 1e-4))`` with ``p`` the softmax clamped to
    [1e-7, 1], summed over the valid pixels and divided by their count + 1e-6."""
    probs = jnp.clip(jax.nn.softmax(upcast(logits), axis=-1), RCE_PROB_FLOOR, 1.0)
    valid = labels != ignore_index
    one_hot = labels[..., None] == jnp.arange(logits.shape[-1])
    per_pixel = jnp.sum(jnp.where(one_hot, 0.0, probs * RCE_LOG_FLOOR), axis=-1)
    total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
    return -total / (jnp.sum(valid).astype(probs.dtype) + RCE_DENOMINATOR_EPS)


def regulariser(logits: jax.Array, kind: str) -> jax.Array:
    """``regular_loss``: 'mrkld' ``-sum(log p) / (N C H W)``; 'mrent' ``sum(p log p) /
    (N H W)`` (the negative entropy, as the reference signs it)."""
    log_probs = jax.nn.log_softmax(upcast(logits), axis=-1)
    if kind == "mrkld":
        return -jnp.mean(log_probs)
    if kind == "mrent":
        return jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
    raise ValueError(f"regulariser kind {kind!r}; use one of {list(REGULARISERS)}")


def _kl_pointwise(target: jax.Array, student_input: jax.Array) -> jax.Array:
    """torch's ``kl_div(input, target, reduction='none')``: ``t (log t - input)``, 0 where
    ``t <= 0``; ``input`` is whatever the caller passes (log-probabilities, or not)."""
    positive = target > 0
    log_target = jnp.log(jnp.where(positive, target, 1.0))
    return jnp.where(positive, target * (log_target - student_input), 0.0)


def structure_kl(
    student_distances: jax.Array,
    teacher_distances: jax.Array,
    temperature: float,
    padding: float,
) -> jax.Array:
    """Target structure learning: KL from the teacher's prototype assignment (softmax of
    ``-d T``, ``d`` the EMA's distances moved like the strong view) to the student's
    (log-softmax of its strong view's ``-d T``), per class and pixel, summed where the
    teacher's distance is not ``padding`` and divided by that count of (pixel, class)
    entries, as the reference's ``(kl * mask).sum() / mask.sum()``."""
    mask = teacher_distances != padding
    teacher = jax.nn.softmax(-teacher_distances * temperature, axis=-1)
    log_student = jax.nn.log_softmax(-student_distances * temperature, axis=-1)
    kl = _kl_pointwise(teacher, log_student)
    count = jnp.sum(mask).astype(kl.dtype)
    return jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(count, 1.0)


def distillation_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, textbook: bool = False
) -> jax.Array:
    """Stages 2 and 3's KD, averaged over every (pixel, class) entry.

    Default, the reference's ``kl_div(softmax(student), softmax(teacher))``: the student's
    *probabilities* where torch expects log-probabilities, so the term is ``t log t - t p``
    per entry (its gradient pulls ``p`` up wherever ``t`` is large, linearly). Its mask
    (``teacher != 250``) is always true. ``textbook``: KL(teacher || student) with the
    student's log-probabilities, summed over classes, averaged over pixels.
    """
    student_logits, teacher_logits = upcast(student_logits), upcast(teacher_logits)
    teacher = jax.nn.softmax(teacher_logits, axis=-1)
    if textbook:
        log_student = jax.nn.log_softmax(student_logits, axis=-1)
        return jnp.mean(jnp.sum(_kl_pointwise(teacher, log_student), axis=-1))
    return jnp.mean(_kl_pointwise(teacher, jax.nn.softmax(student_logits, axis=-1)))


def class_mean_features(
    features: jax.Array, logits: jax.Array, min_pixels: int = MIN_CLASS_PIXELS
) -> tuple[jax.Array, jax.Array]:
    """``calculate_mean_vector`` without labels or threshold: per image and class predicted
    (argmax of the softmax), the mean feature over its pixels. Returns (vectors (N, K, C),
    valid (N, K)): at least ``min_pixels`` pixels and a vector that does not sum to 0
    (``update_objective_SingleVector`` skips those)."""
    features = upcast(features)
    n, h, w, k = logits.shape
    predicted = jnp.argmax(jax.nn.softmax(upcast(logits), axis=-1), axis=-1)
    one_hot = jax.nn.one_hot(predicted.reshape(n, h * w), k, dtype=features.dtype)
    counts = jnp.sum(one_hot, axis=1)
    sums = jnp.einsum("npk,npc->nkc", one_hot, features.reshape(n, h * w, -1), precision=HIGHEST)
    vectors = sums / jnp.maximum(counts, 1.0)[..., None]
    return vectors, (counts >= min_pixels) & (jnp.sum(vectors, axis=-1) != 0)


def momentum_update(
    table: jax.Array, vectors: jax.Array, valid: jax.Array, momentum: float
) -> jax.Array:
    """The reference's per-vector ``proto = (1 - m) proto + m v``, image after image, in
    closed form: a class with valid vectors ``v_1..v_n`` (image order) becomes ``(1 - m)^n
    proto + sum_j m (1 - m)^(n - j) v_j``; classes with none are unchanged."""
    table = upcast(table)
    valid = valid.astype(table.dtype)
    rank = jnp.cumsum(valid, axis=0)
    total = rank[-1]
    keep = 1.0 - momentum
    coef = valid * momentum * jnp.power(keep, total - rank)
    fresh = jnp.einsum("nk,nkc->kc", coef, upcast(vectors), precision=HIGHEST)
    return jnp.power(keep, total)[:, None] * table + fresh
