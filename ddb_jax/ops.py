"""Small array operations shared by models, losses and evaluation.

Kept in one place so every resize in the project has PyTorch's
``F.interpolate(mode="bilinear", align_corners=False)`` semantics: the
reference computes losses, pseudo-labels and prototype features on logits
resized that way, and jax.image.resize antialiases by default when shrinking.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Cityscapes mean/std in RGB, 0-255 scale (mmseg img_norm_cfg).
IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)
IGNORE_LABEL = 255


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes NHWC ``x`` to ``size`` (H, W) like torch bilinear, align_corners=False."""
    n, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    return jax.image.resize(x, (n, size[0], size[1], c), method="bilinear", antialias=False)


def resize_nearest(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes NHW integer ``labels`` to ``size`` like torch nearest (floor of scaled index)."""
    n, h, w = labels.shape
    if (h, w) == tuple(size):
        return labels
    rows = jnp.floor(jnp.arange(size[0]) * (h / size[0])).astype(jnp.int32)
    cols = jnp.floor(jnp.arange(size[1]) * (w / size[1])).astype(jnp.int32)
    return labels[:, rows][:, :, cols]


def normalize_image(image_uint8: jax.Array) -> jax.Array:
    """RGB 0-255 -> the normalised float32 space every model here takes."""
    mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
    std = jnp.asarray(IMAGE_STD, jnp.float32)
    return (image_uint8.astype(jnp.float32) - mean) / std


def denormalize_image(image: jax.Array) -> jax.Array:
    """Inverse of :func:`normalize_image` (0-255 float)."""
    mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
    std = jnp.asarray(IMAGE_STD, jnp.float32)
    return image * std + mean
