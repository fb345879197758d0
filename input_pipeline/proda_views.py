"""ProDA's weak view (microsoft/ProDA ``data/augmentations.py``) and the label maps moved
like it, per image, as TensorFlow ops (:mod:`input_pipeline.proda` builds the streams).

``RandomSized``: width ``int(U[0.5, 1.5] * data.proda_resize)``, height ``int(width /
(W / H))`` of the image at its fixed size (W x H); ``RandomCrop``: a uniform (y1, x1) of the
resized image, bounds included; ``RandomHorizontallyFlip`` with probability
``data.flip_prob``. Images move with Pillow's BILINEAR, hard labels with its NEAREST
(:mod:`input_pipeline.pil_resize`), a soft label with ``F.interpolate(bilinear,
align_corners=True)``: stored map -> the fixed size -> the resized size, cropped, flipped,
and then to the quarter the steps read (``interpolate(scale_factor=0.25)``: bilinear with
align_corners=True for the soft label, every 4th pixel for a hard one).

Only what the step reads is computed: the crop's rows and columns of the resized image,
one gather per axis for a hard label, and for a soft label one matrix per axis (the three
linear resizes composed in float64, applied in float32: the reference's values to float32
rounding, without its full-size maps).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ddb_jax import errors
from input_pipeline import pil_resize, transforms

SCALE_RANGE = (0.5, 1.5)  # RandomSized's factor of data.proda_resize
QUARTER = 4  # the steps' target maps: a quarter of the crop
SIZE_OP, CROP_OP, FLIP_OP = 1, 2, 3


class GeometryError(errors.UsageError, ValueError):
    """The crop does not fit the smallest resized image; the message names the keys."""


# --- geometry -----------------------------------------------------------------------------


def check_geometry(size: tuple[int, int], crop: tuple[int, int], resize: int, key: str) -> None:
    """The smallest resized image holds the crop (the reference's fallback for a larger crop
    fails); ``key`` names the fixed size in the message."""
    width = int(SCALE_RANGE[0] * resize)
    height = int(width / (size[1] / size[0]))
    if height < crop[0] or width < crop[1]:
        raise GeometryError(
            f"config.data.proda_resize={resize} with config.{key}={size}: the smallest "
            f"resized image ({height} x {width}) is smaller than config.data.crop_size={crop}"
        )


def draw_geometry(
    seed: tf.Tensor, size: tuple[int, int], resize: int, crop: tuple[int, int], flip_prob: float
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(resized (h, w), crop origin (y1, x1), flip) of ``RandomSized`` / ``RandomCrop`` /
    ``RandomHorizontallyFlip`` on an image of ``size``, from ``seed``."""
    low, high = SCALE_RANGE
    factor = low + (high - low) * tf.random.stateless_uniform(
        [], transforms.fold_seed(seed, SIZE_OP), dtype=tf.float64
    )
    width = tf.floor(factor * resize)
    height = tf.floor(width / (size[1] / size[0]))
    resized = tf.cast(tf.stack([height, width]), tf.int32)
    margins = resized - tf.constant(crop, tf.int32)  # >= 0: check_geometry
    origin = tf.random.stateless_uniform(
        [2], transforms.fold_seed(seed, CROP_OP), maxval=tf.int32.max, dtype=tf.int32
    ) % (margins + 1)
    flip = tf.random.stateless_uniform([], transforms.fold_seed(seed, FLIP_OP)) < flip_prob
    return resized, origin, flip


def weak_view(
    image: tf.Tensor, resized: tf.Tensor, origin: tf.Tensor, flip: tf.Tensor, crop: tuple[int, int]
) -> tf.Tensor:
    """The normalised crop of ``image`` (uint8, the fixed size) resized to ``resized``."""
    view = pil_resize.resize_bilinear(image, resized, origin, crop)
    view = tf.cond(flip, lambda: tf.reverse(view, [1]), lambda: view)
    return transforms.normalize(view)


def _crop_positions(origin, flip, length: int, step: int) -> tf.Tensor:
    """Positions in the resized image of every ``step``-th pixel of a (flipped) crop."""
    positions = tf.range(0, length, step)
    return origin + tf.where(flip, length - 1 - positions, positions)


def moved_label(
    label: tf.Tensor,
    size: tuple[int, int],
    resized: tf.Tensor,
    origin: tf.Tensor,
    flip: tf.Tensor,
    crop: tuple[int, int],
    step: int = 1,
) -> tf.Tensor:
    """``label`` (any size) at ``size`` and then ``resized`` (NEAREST, Pillow's), cropped,
    flipped, every ``step``-th pixel: one gather per axis."""
    shape = tf.shape(label)
    axes = []
    for axis, axis_flip in ((0, tf.constant(False)), (1, flip)):
        to_full = pil_resize.nearest(shape[axis], size[axis])
        to_resized = pil_resize.nearest(size[axis], resized[axis])
        at = _crop_positions(origin[axis], axis_flip, crop[axis], step)
        axes.append(tf.gather(to_full, tf.gather(to_resized, at)))
    return tf.gather(tf.gather(label, axes[0], axis=0), axes[1], axis=1)


def corner_matrix(n_stored, n_full, n_resized, start, n_crop, flip) -> np.ndarray:
    """(n_crop // 4, n_stored) float32: a stored map's rows (or columns) resized to
    ``n_full`` then ``n_resized`` (align_corners=True), cropped at ``start``, reversed when
    ``flip``, then resized to the quarter (align_corners=True): the composed linear map."""

    def resize(matrix: np.ndarray, n_out: int, rows: slice = slice(None)) -> np.ndarray:
        n_in = len(matrix)
        src = np.arange(n_out, dtype=np.float64)[rows] * ((n_in - 1) / max(n_out - 1, 1))
        low = np.minimum(np.floor(src), n_in - 1).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        frac = (src - low)[:, None]
        return (1.0 - frac) * matrix[low] + frac * matrix[high]

    start, n_crop = int(start), int(n_crop)
    matrix = resize(np.eye(int(n_stored)), int(n_full))
    matrix = resize(matrix, int(n_resized), slice(start, start + n_crop))
    matrix = matrix[::-1] if flip else matrix
    return resize(matrix, n_crop // QUARTER).astype(np.float32)


def moved_soft_label(
    soft: tf.Tensor,
    size: tuple[int, int],
    resized: tf.Tensor,
    origin: tf.Tensor,
    flip: tf.Tensor,
    crop: tuple[int, int],
) -> tf.Tensor:
    """The soft label (h, w, K) moved like the weak view, at the quarter of the crop."""
    shape = tf.shape(soft)

    def matrix(axis, axis_flip):
        composed = tf.numpy_function(corner_matrix, [shape[axis], size[axis], resized[axis],
                                                     origin[axis], crop[axis], axis_flip],
                                     tf.float32, stateful=False)  # fmt: skip
        composed.set_shape([crop[axis] // QUARTER, soft.shape[axis]])
        return composed

    soft = tf.cast(soft, tf.float32)
    rows = tf.einsum("ih,hwk->iwk", matrix(0, False), soft)
    return tf.einsum("jw,iwk->ijk", matrix(1, flip), rows)
