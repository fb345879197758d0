"""mmseg 0.x ``PhotoMetricDistortion`` in TensorFlow, bit-exact on uint8 RGB images.

The reference's CKD stages distort the source images after RandomFlip and before
Normalize. mmseg works on uint8 BGR with mmcv's OpenCV conversions; OpenCV's BGR2HSV of
a BGR image is RGB2HSV of the RGB image, so everything here stays RGB. Every op maps
uint8 to uint8 as mmseg's ``convert`` does (float32 ``x * alpha + beta``, clip to
[0, 255], truncating cast): brightness (beta ~ U(-32, 32)), contrast (alpha ~ U(0.5,
1.5)) before or after the HSV ops, saturation (S * U(0.5, 1.5)) and hue (H +
randint(-18, 18), numpy's exclusive upper bound, wrapped mod 180), each on a fair coin.
Saturation and hue each convert to HSV and back, as mmseg does.

The HSV conversions reproduce OpenCV's 8-bit code: RGB->HSV is its integer arithmetic
(12-bit fixed point, hue in 0..179); HSV->RGB is its vectorised float32 path, whose
``1 - s*h`` terms are fused multiply-adds in x86 AVX2/AVX-512 builds (emulated exactly in
float64) and whose results are truncated. OpenCV rounds instead in the scalar tail of a
row (the last ``width mod 64`` pixels on AVX-512); 512-wide crops have no tail.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
HUE_RANGE = 180  # OpenCV's 8-bit hue: degrees / 2

_SHIFT = 12  # OpenCV's fixed-point shift in RGB2HSV_b
_HALF = 1 << (_SHIFT - 1)
_STEPS = np.arange(1, 256, dtype=np.float64)
# saturate_cast<int>(double) rounds half to even, as np.rint does; entry 0 is 0.
_SDIV = np.concatenate([[0], np.rint((255 << _SHIFT) / _STEPS)]).astype(np.int32)
_HDIV = np.concatenate([[0], np.rint((HUE_RANGE << _SHIFT) / (6.0 * _STEPS))]).astype(np.int32)
_INV_255 = np.float32(1.0) / np.float32(255.0)  # float32 arithmetic, as OpenCV
_HSCALE = np.float32(6.0) / np.float32(HUE_RANGE)
_SIXTH = np.float32(1.0) / np.float32(6.0)
# OpenCV's sector_data (tab indices of b, g, r per hue sector), in r, g, b order.
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])

DRAW_NAMES = (
    "brightness",
    "beta",
    "contrast_first",
    "contrast",
    "contrast_alpha",
    "saturation",
    "saturation_alpha",
    "hue",
    "hue_delta",
)


def sample_draws(seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Every random choice of one distortion from a [2] seed (stateless, so a pure
    function of the element's seed): four op coins, the contrast position and values."""
    seeds = tf.random.experimental.stateless_split(seed, num=5)
    coins = tf.random.stateless_uniform([5], seeds[0]) < 0.5
    uniform = lambda s, bounds: tf.random.stateless_uniform([], s, bounds[0], bounds[1])
    return {
        "brightness": coins[0],
        "beta": uniform(seeds[1], (-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)),
        # mmseg's ``mode == 1``: contrast before the HSV ops, otherwise after them.
        "contrast_first": coins[1],
        "contrast": coins[2],
        "contrast_alpha": uniform(seeds[2], CONTRAST_RANGE),
        "saturation": coins[3],
        "saturation_alpha": uniform(seeds[3], SATURATION_RANGE),
        "hue": coins[4],
        # numpy's randint(-18, 18) never returns 18.
        "hue_delta": tf.random.stateless_uniform(
            [], seeds[4], -HUE_DELTA, HUE_DELTA, dtype=tf.int32
        ),
    }


def convert(x: tf.Tensor, alpha: tf.Tensor | None = None, beta: tf.Tensor | None = None):
    """mmseg's ``convert``: float32 ``x * alpha + beta``, clipped, truncated to uint8."""
    y = tf.cast(x, tf.float32)
    if alpha is not None:
        y = y * alpha
    if beta is not None:
        y = y + beta
    return tf.cast(tf.clip_by_value(y, 0.0, 255.0), tf.uint8)


def rgb_to_hsv(image: tf.Tensor) -> tf.Tensor:
    """OpenCV ``COLOR_RGB2HSV`` on uint8: H in 0..179, S and V in 0..255."""
    r, g, b = tf.unstack(tf.cast(image, tf.int32), axis=-1)
    v = tf.maximum(tf.maximum(r, g), b)
    diff = v - tf.minimum(tf.minimum(r, g), b)
    s = tf.bitwise.right_shift(diff * tf.gather(_SDIV, v) + _HALF, _SHIFT)
    h = tf.where(
        tf.equal(v, r), g - b, tf.where(tf.equal(v, g), b - r + 2 * diff, r - g + 4 * diff)
    )
    h = tf.bitwise.right_shift(h * tf.gather(_HDIV, diff) + _HALF, _SHIFT)  # floor
    h = tf.where(h < 0, h + HUE_RANGE, h)
    return tf.cast(tf.stack([h, s, v], axis=-1), tf.uint8)


def _one_minus_product(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """float32 ``fma(-a, b, 1)``: the float64 product of two float32 values is exact and
    the one rounding of the difference to float32 is the FMA's (checked exhaustively over
    the inputs 8-bit HSV can produce by the value tests)."""
    a64, b64 = tf.cast(a, tf.float64), tf.cast(b, tf.float64)
    return tf.cast(1.0 - a64 * b64, tf.float32)


def hsv_to_rgb(hsv: tf.Tensor) -> tf.Tensor:
    """OpenCV ``COLOR_HSV2RGB`` on uint8 as its vectorised path computes it (the 8-bit
    hue range is 0..179; larger values wrap to sector ``floor(H / 30) mod 6``)."""
    h, s, v = tf.unstack(tf.cast(hsv, tf.float32), axis=-1)
    s = s * _INV_255
    v = v * _INV_255
    h = h * _HSCALE
    whole = tf.math.floor(h)
    frac = h - whole
    sector = whole - tf.math.floor(whole * _SIXTH) * 6.0  # hues past 179 wrap as in OpenCV
    tab = tf.stack(
        [
            v,
            v * (1.0 - s),
            v * _one_minus_product(s, frac),
            v * _one_minus_product(s, 1.0 - frac),
        ],
        axis=-1,
    )
    index = tf.gather(_SECTOR_RGB, tf.cast(sector, tf.int32))
    rgb = tf.gather(tab, index, axis=-1, batch_dims=tab.shape.rank - 1)
    return tf.cast(tf.clip_by_value(tf.math.floor(rgb * 255.0), 0.0, 255.0), tf.uint8)


def _with_channel(hsv: tf.Tensor, channel: int, values: tf.Tensor) -> tf.Tensor:
    parts = tf.unstack(hsv, axis=-1)
    parts[channel] = values
    return tf.stack(parts, axis=-1)


def _saturation(image: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    hsv = rgb_to_hsv(image)
    return hsv_to_rgb(_with_channel(hsv, 1, convert(hsv[..., 1], alpha=alpha)))


def _hue(image: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    hsv = rgb_to_hsv(image)
    hue = tf.math.floormod(tf.cast(hsv[..., 0], tf.int32) + delta, HUE_RANGE)
    return hsv_to_rgb(_with_channel(hsv, 0, tf.cast(hue, tf.uint8)))


def distort(image: tf.Tensor, draws: dict[str, tf.Tensor]) -> tf.Tensor:
    """mmseg's op order on a uint8 RGB image with the given draws; returns uint8 RGB."""

    def maybe(apply, op, x):
        return tf.cond(apply, lambda: op(x), lambda: tf.identity(x))

    contrast = lambda x: convert(x, alpha=draws["contrast_alpha"])
    first = tf.logical_and(draws["contrast"], draws["contrast_first"])
    last = tf.logical_and(draws["contrast"], tf.logical_not(draws["contrast_first"]))
    image = tf.convert_to_tensor(image, tf.uint8)
    image = maybe(draws["brightness"], lambda x: convert(x, beta=draws["beta"]), image)
    image = maybe(first, contrast, image)
    image = maybe(draws["saturation"], lambda x: _saturation(x, draws["saturation_alpha"]), image)
    image = maybe(draws["hue"], lambda x: _hue(x, draws["hue_delta"]), image)
    return maybe(last, contrast, image)


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The distortion of a uint8 RGB image with draws from ``seed``."""
    return distort(image, sample_draws(seed))
