"""Pillow's ``Image.resize`` as TensorFlow ops, pixel for pixel: ProDA's loaders resize with
PIL (``BILINEAR`` for images, ``NEAREST`` for labels), the mmseg pipelines of
:mod:`input_pipeline.transforms` with OpenCV, whose rules differ.

- ``BILINEAR`` (Pillow's ``Resample.c``): a triangle filter widened by the scale when
  shrinking (antialiased), coefficients normalised and rounded to 22-bit fixed point, a
  horizontal pass rounded to uint8, then a vertical one. That order is the reference's
  Pillow's (up to 12); Pillow 13 runs the vertical pass first in some shrinking cases,
  where its pixels may then differ from these by one level.
- ``NEAREST`` (Pillow's affine scale): source index ``int(x0 + k * in / out)`` with
  ``x0 = 0.5 * in / out`` accumulated step by step in double precision, so the rare
  positions that land on an integer take the side Pillow's running sum takes.

The coefficient tables are computed in numpy (float64, Pillow's expressions in its order)
inside ``tf.numpy_function``; the pixels in TensorFlow, integers only. Only the rows and
columns of a crop are computed when one is asked for (Pillow's values: a pixel depends on
its own coefficients only).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, fixed-point weight), each (n_out, taps) int32: Pillow's
    ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the bilinear filter."""
    n_in, n_out = int(n_in), int(n_out)
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(n_out) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), n_in) - first
    offsets = np.arange(taps)
    x = np.abs(((offsets[None] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(offsets[None] < count[:, None], np.where(x < 1.0, 1.0 - x, 0.0), 0.0)
    total = np.zeros(n_out)
    for t in range(taps):  # Pillow's running sum, in its order
        total = total + weights[:, t]
    weights = weights / np.where(total == 0.0, 1.0, total)[:, None]
    fixed = np.where(weights < 0, -0.5 + weights * (1 << PRECISION_BITS),
                     0.5 + weights * (1 << PRECISION_BITS)).astype(np.int32)  # fmt: skip
    index = np.minimum(offsets[None] + first[:, None], n_in - 1)
    return index.astype(np.int32), fixed


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index (n_out,) int32 of Pillow's NEAREST resize along one axis."""
    n_in, n_out = int(n_in), int(n_out)
    step = n_in / n_out
    positions = np.full(n_out, step)
    positions[0] = 0.0 + step * 0.5
    positions = np.add.accumulate(positions)  # sequential, as Pillow's xo += a[0]
    return np.clip(positions.astype(np.int64), 0, n_in - 1).astype(np.int32)


def _taps(n_in: tf.Tensor, n_out: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    index, weight = tf.numpy_function(bilinear_taps, [n_in, n_out], (tf.int32, tf.int32),
                                      stateful=False)  # fmt: skip
    index.set_shape([None, None])
    weight.set_shape([None, None])
    return index, weight


def nearest(n_in: tf.Tensor, n_out: tf.Tensor) -> tf.Tensor:
    """:func:`nearest_index` as a tensor."""
    index = tf.numpy_function(nearest_index, [n_in, n_out], tf.int32, stateful=False)
    index.set_shape([None])
    return index


def _filter_pass(pixels: tf.Tensor, index: tf.Tensor, weight: tf.Tensor, axis: int) -> tf.Tensor:
    """One separable pass along ``axis`` (0 rows, 1 columns) of int32 pixels, rounded and
    clipped to 0..255 as Pillow's ``clip8``."""
    out_shape = tf.tensor_scatter_nd_update(tf.shape(pixels), [[axis]], tf.shape(index)[:1])
    total = tf.fill(out_shape, 1 << (PRECISION_BITS - 1))  # the rounding half
    shape = [-1, 1, 1] if axis == 0 else [1, -1, 1]

    def body(t, total):
        taken = tf.gather(pixels, index[:, t], axis=axis)
        return t + 1, total + taken * tf.reshape(weight[:, t], shape)

    _, total = tf.while_loop(lambda t, _: t < tf.shape(index)[1], body, (0, total))
    return tf.clip_by_value(tf.bitwise.right_shift(total, PRECISION_BITS), 0, 255)


def resize_bilinear(
    image: tf.Tensor,
    size: tf.Tensor,
    origin: tf.Tensor | None = None,
    crop_size: tuple[int, int] | None = None,
) -> tf.Tensor:
    """uint8 (H, W, C) resized to ``size`` (h, w) as Pillow's BILINEAR; with ``origin``
    (y1, x1) and ``crop_size``, only that crop of the resized image (static shape)."""
    shape = tf.shape(image)
    rows, row_w = _taps(shape[0], size[0])
    cols, col_w = _taps(shape[1], size[1])
    if origin is not None:
        row_span = slice(origin[0], origin[0] + crop_size[0])
        col_span = slice(origin[1], origin[1] + crop_size[1])
        rows, row_w, cols, col_w = rows[row_span], row_w[row_span], cols[col_span], col_w[col_span]
    # The horizontal pass on the input rows the vertical one reads (Pillow's ybox).
    low, high = tf.reduce_min(rows), tf.reduce_max(rows) + 1
    pixels = tf.cast(image[low:high], tf.int32)
    pixels = _filter_pass(pixels, cols, col_w, axis=1)
    pixels = _filter_pass(pixels, rows - low, row_w, axis=0)
    out = tf.cast(pixels, tf.uint8)
    if crop_size is not None:
        out.set_shape([crop_size[0], crop_size[1], image.shape[-1]])
    return out


def resize_nearest(label: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """A (H, W[, C]) map resized to ``size`` (h, w) as Pillow's NEAREST."""
    shape = tf.shape(label)
    label = tf.gather(label, nearest(shape[0], size[0]), axis=0)
    return tf.gather(label, nearest(shape[1], size[1]), axis=1)
