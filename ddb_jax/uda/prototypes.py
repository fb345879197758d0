"""Class prototypes and prototype weights (docs/method.md §1.4, §1.5).

Reference: DDB ``tools/cal_prototypes/class_features.py`` (per-image class means, running
mean table) and ``dass/models/uda/ckd.py`` (prototype weights). The two-teacher ensemble
that uses the weights is :mod:`ddb_jax.uda.ensemble`. The
reference loops over images and classes in Python; here each step is one batched, jitted
array program (one-hot matmuls, a closed form for the sequential table update).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddb_jax.ops import bilinear_taps, resize_bilinear, upcast

MIN_PIXELS = 10
COUNT_CAP = 3000
HIGHEST = jax.lax.Precision.HIGHEST


def class_mean_features(
    features: jax.Array, logits: jax.Array, min_pixels: int = MIN_PIXELS
) -> tuple[jax.Array, jax.Array]:
    """Per-image mean feature of each predicted class.

    features (N, H, W, C) and logits (N, H, W, K) at the same (image) size. Returns
    ``vectors`` (N, K, C), the mean feature over the pixels whose argmax is k, and
    ``valid`` (N, K), True where class k has at least ``min_pixels`` pixels in the image.
    """
    n, h, w, k = logits.shape
    features = upcast(features)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, -1).reshape(n, h * w), k, dtype=features.dtype)
    counts = jnp.sum(one_hot, axis=1)
    sums = jnp.einsum(
        "npk,npc->nkc",
        one_hot,
        upcast(features.reshape(n, h * w, -1)),
        precision=HIGHEST,
    )
    vectors = sums / jnp.maximum(counts, 1.0)[..., None]
    return vectors, counts >= min_pixels


def update_prototype_table(
    table: jax.Array,
    table_counts: jax.Array,
    vectors: jax.Array,
    valid: jax.Array,
    cap: int = COUNT_CAP,
) -> tuple[jax.Array, jax.Array]:
    """Running-mean table update equal to the reference's sequential per-image updates.

    The reference applies, for each image in order and each valid class k,
    ``v = (v*n + x) / (n + 1); n = min(n + 1, cap)`` (skipping all-zero vectors). For one
    row with count n0 and the k valid vectors x_1..x_k of the batch in image order:
    the first ``m = clip(cap - n0, 0, k)`` updates are a plain running mean, giving
    ``(n0 v0 + sum_{j<=m} x_j) / (n0 + m)``; each of the remaining ``r = k - m`` is an EMA
    with ``a = cap / (cap + 1)``. Hence
    ``v = a^r (n0 v0 + sum_{j<=m} x_j) / (n0 + m) + (1 - a) sum_{j>m} a^(k-j) x_j`` and
    ``n = min(n0 + k, cap)``. table (K, C), table_counts (K,), vectors (N, K, C),
    valid (N, K).
    """
    valid = valid & (jnp.sum(vectors, axis=-1) != 0)
    rank = jnp.cumsum(upcast(valid), axis=0)  # 1-based order among valid images
    total = rank[-1]
    counts = upcast(table_counts)
    num_mean = jnp.clip(cap - counts, 0.0, total)
    num_ema = total - num_mean
    decay = cap / (cap + 1.0)
    denom = counts + num_mean
    safe_denom = jnp.where(denom > 0, denom, 1.0)
    shrink = jnp.power(decay, num_ema)
    mean_coef = shrink / safe_denom
    ema_coef = (1.0 - decay) * jnp.power(decay, total - rank)
    coef = jnp.where(valid, jnp.where(rank <= num_mean, mean_coef, ema_coef), 0.0)
    old_coef = jnp.where(denom > 0, shrink * counts / safe_denom, 1.0)
    new_table = old_coef[:, None] * table + jnp.einsum(
        "nk,nkc->kc", coef, upcast(vectors), precision=HIGHEST
    )
    return new_table, jnp.minimum(counts + total, float(cap))


def _low_res_sq_distances(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Squared L2 distances (N, H, W, K) of pixel features (N, H, W, C) to prototypes (K, C).

    Expanded as |f|^2 - 2 f.p + |p|^2 (one matmul instead of an (N, H, W, K, C) tensor),
    after subtracting the prototypes' mean from both sides to limit cancellation.
    """
    center = jnp.mean(prototypes, axis=0)
    f = upcast(features) - center
    p = upcast(prototypes) - center
    cross = jnp.einsum("nhwc,kc->nhwk", f, p, precision=HIGHEST)
    return jnp.sum(f * f, -1, keepdims=True) - 2.0 * cross + jnp.sum(p * p, -1)


def _neighbour_sq_differences(features: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """|g_a - g_b|^2 (N, H, W) for the neighbour pairs inside each bilinear 2x2 tap square.

    Returns (right, down, diagonals): pixel (i, j) with (i, j+1); with (i+1, j); and
    (i, j)-(i+1, j+1) plus (i, j+1)-(i+1, j). Indices past the last row/column are clamped,
    as the resize clamps them, so pairs that leave the image compare a pixel with itself.
    """
    g = upcast(features)
    g = jnp.pad(g, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
    top_left, top_right = g[:, :-1, :-1], g[:, :-1, 1:]
    bottom_left, bottom_right = g[:, 1:, :-1], g[:, 1:, 1:]

    def sq(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.sum(jnp.square(a - b), -1)

    diagonals = sq(bottom_right, top_left) + sq(top_right, bottom_left)
    return sq(top_right, top_left), sq(bottom_left, top_left), diagonals


def _resized_sq_distances(
    features: jax.Array, prototypes: jax.Array, size: tuple[int, int]
) -> jax.Array:
    """Squared distances of the bilinearly resized features to the prototypes, exactly,
    without building the C-channel features at ``size``.

    A resized feature is a convex combination ``f = sum_i a_i g_i`` of (at most) the 4
    source pixels of its tap square, weights ``a = r_row * c_col`` summing to 1. For any
    convex combination, ``|f - p|^2 = sum_i a_i |g_i - p|^2 - sum_{i<j} a_i a_j |g_i - g_j|^2``.
    The first sum is the bilinear resize of the K squared-distance maps at feature
    resolution; the second (the tap square's spread, independent of k) needs only the squared
    differences of neighbouring source pixels, folded in with products of the separable tap
    weights. Everything C-channel stays at feature resolution; at ``size`` only K + 2 maps
    are gathered. Both terms are sums of non-negative parts, so the subtraction only cancels
    as much as the true distance is smaller than its parts (smooth features: tiny spread).
    """
    _, h, w, _ = features.shape
    dtype = upcast(features).dtype
    rows0, rows1, r0, r1 = bilinear_taps(h, size[0])
    cols0, cols1, c0, c1 = bilinear_taps(w, size[1])
    r0, r1, c0, c1 = (jnp.asarray(a, dtype) for a in (r0, r1, c0, c1))
    low = _low_res_sq_distances(features, prototypes)  # (N, h, w, K)
    right, down, diagonals = _neighbour_sq_differences(features)  # (N, h, w) each

    # Rows: taps (i0, i1), weights (r0, r1). The spread's pairs are grouped by the column
    # weight they will get: c0 c1 for the horizontal pair of each tap row (row weight
    # r_a^2) and for both diagonals (r0 r1); c_b^2 for the vertical pair of each tap
    # column (r0 r1). Separate gathers (not one concatenated map): measurably faster on CPU.
    def rows(weight: jax.Array) -> jax.Array:
        return weight[None, :, None]

    resized = rows(r0)[..., None] * low[:, rows0] + rows(r1)[..., None] * low[:, rows1]
    horizontal = (
        rows(r0 * r0) * right[:, rows0]
        + rows(r1 * r1) * right[:, rows1]
        + rows(r0 * r1) * diagonals[:, rows0]
    )  # (N, H, w)
    vertical = rows(r0 * r1) * down[:, rows0]  # (N, H, w)

    # Columns: taps (j0, j1), weights (c0, c1).
    spread = (
        (c0 * c1) * horizontal[:, :, cols0]
        + (c0 * c0) * vertical[:, :, cols0]
        + (c1 * c1) * vertical[:, :, cols1]
    )
    interp = c0[:, None] * resized[:, :, cols0] + c1[:, None] * resized[:, :, cols1]
    return interp - spread[..., None]


def prototype_distances(
    features: jax.Array, prototypes: jax.Array, size: tuple[int, int] | None = None
) -> jax.Array:
    """L2 distance (N, H, W, K) of every pixel feature (N, h, w, C) to each prototype (K, C).

    With ``size``, the distances of the features bilinearly resized to ``size`` (torch
    semantics, as :func:`ddb_jax.ops.resize_bilinear`), computed exactly without resizing
    the C-channel features (see :func:`_resized_sq_distances`).
    """
    if size is None or tuple(size) == features.shape[1:3]:
        sq = _low_res_sq_distances(features, prototypes)
    else:
        sq = _resized_sq_distances(features, prototypes, tuple(size))
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def prototype_weights(
    features: jax.Array,
    prototypes: jax.Array,
    size: tuple[int, int] | None = None,
    at_feature_resolution: bool = False,
) -> jax.Array:
    """``W = softmax_k(-(d - min_k d))`` (N, H, W, K), d = feature-to-prototype distance.

    ``size``: the image size; the reference resizes the features to it bilinearly first
    and so does this (exact path), in closed form at feature resolution (see
    :func:`_resized_sq_distances`): no C-channel map at image size, equal to resizing then
    measuring up to float32 rounding. ``at_feature_resolution=True`` instead computes the
    weights on the (1/8) features and resizes the K weight maps. Not equivalent (the
    distance is not linear in the feature): on i.i.d. random data (tests/test_prototypes.py:
    2x16x16 features with 32 channels, 19 prototypes, upsampled x8) mean |dW| = 0.005 but
    the rectified pseudo-label agrees with the exact path on only 83% of pixels. Kept for
    comparison, no longer worth it: batch 4, 64x64x256 features to 512x512 on a 2-core CPU,
    exact 285 ms (was 4532 ms when it resized the features), this path 244 ms. Off by
    default.
    """
    if size is None or at_feature_resolution:
        weights = jax.nn.softmax(-prototype_distances(features, prototypes), axis=-1)
        return weights if size is None else resize_bilinear(weights, size)
    return jax.nn.softmax(-prototype_distances(features, prototypes, size), axis=-1)
