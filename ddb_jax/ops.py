"""Small array operations shared by models, losses and evaluation.

Kept in one place so every resize in the project has PyTorch's
``F.interpolate(mode="bilinear", align_corners=False)`` semantics: the
reference computes losses, pseudo-labels and prototype features on logits
resized that way, and jax.image.resize antialiases by default when shrinking.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Cityscapes mean/std in RGB, 0-255 scale (mmseg img_norm_cfg).
IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)
# config.data.image_transfer: training images cross to the device as their uint8 pixels
# (normalised there, ddb_jax/methods/device_input.py) or normalised on the host.
IMAGE_TRANSFERS = ("uint8", "float32")
SIZE_SUFFIX = "_size"  # batch key '<image key>_size': a uint8 image's unpadded (height, width)


def upcast(x: jax.Array) -> jax.Array:
    """``x`` in float32, or as it is when wider: bfloat16 activations are summed and
    compared in float32, and the float64 parity tests keep float64 throughout."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes NHWC ``x`` to ``size`` (H, W) like torch bilinear, align_corners=False."""
    n, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    return jax.image.resize(x, (n, size[0], size[1], c), method="bilinear", antialias=False)


def resize_bilinear_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes NHWC ``x`` to ``size`` (H, W) like torch bilinear with align_corners=True (the
    corners of input and output coincide: ``src = dst * (in - 1) / (out - 1)``), as ADVENT
    and its family upsample logits."""
    n, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x

    def taps(in_size: int, out_size: int):
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = np.arange(out_size) * scale
        i0 = np.minimum(np.floor(src), in_size - 1).astype(np.int32)
        i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
        return i0, i1, src - i0

    r0, r1, rf = taps(h, size[0])
    c0, c1, cf = taps(w, size[1])
    rf = jnp.asarray(rf, x.dtype)[None, :, None, None]
    cf = jnp.asarray(cf, x.dtype)[None, None, :, None]
    rows = x[:, r0] * (1 - rf) + x[:, r1] * rf
    return rows[:, :, c0] * (1 - cf) + rows[:, :, c1] * cf


def bilinear_taps(
    in_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two source indices and weights of each output index of a 1-D torch bilinear resize.

    align_corners=False: ``src = max((dst + 0.5) * in / out - 0.5, 0)``, ``i0 = floor(src)``,
    ``i1 = min(i0 + 1, in - 1)``, weights ``(1 - l, l)`` with ``l = src - i0``; so
    ``out[d] = w0[d] x[i0[d]] + w1[d] x[i1[d]]`` along one axis, and the 2-D resize is the
    same along rows then columns (the taps :func:`resize_bilinear` uses, up to rounding).
    Static (numpy) so callers can gather, fold weights into other sums, or build matrices.
    Returns int32 ``i0``, ``i1`` and float64 ``w0``, ``w1`` (callers cast them to their
    arrays' dtype), each of length ``out_size``.
    """
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src), in_size - 1).astype(np.int32)
    i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
    frac = np.minimum(src - i0, 1.0)
    return i0, i1, 1.0 - frac, frac


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
