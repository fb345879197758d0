"""The pixel ops of ProDA's strong view (``randaugment.py``), one image at a time, as PIL
computes them.

An image here is float32 [H, W, 3], RGB, holding whole numbers 0..255: an image PIL could
hold as uint8. Every op returns such an image, rounding where PIL's C code rounds, so a
chain of ops gives what PIL's chain gives (the places where float32 cannot follow PIL's
float64 are named where they occur: the affine sampler's coordinates).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

FILL = 127.0  # the reference's grey, (127, 127, 127), for uncovered and cut-out pixels


def quantize(image: jax.Array) -> jax.Array:
    """Rounds and clips to uint8 levels (PIL holds only those)."""
    return jnp.clip(jnp.round(image.astype(jnp.float32)), 0.0, 255.0)


def blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """``Image.blend(degenerate, image, factor)``, which every ImageEnhance op is: PIL
    computes ``d + factor * (i - d)`` in C floats (float32, as here), truncates, and clips
    when the factor extrapolates.

    XLA fuses a product and a sum into one fused multiply-add, which skips the rounding of
    the product that PIL makes and so moves a few results across a whole level. The factor
    is therefore split into two halves of 12 significant bits: each half times a level
    difference (9 bits) is exact, and their sum rounds once, to PIL's rounded product,
    fused or not.
    """
    factor = factor.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(factor, jnp.uint32)
    factor_hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
    difference = image - degenerate
    product = factor_hi * difference + (factor - factor_hi) * difference
    return jnp.clip(jnp.floor(degenerate + product), 0.0, 255.0)


def greyscale(image: jax.Array) -> jax.Array:
    """PIL's RGB -> L, [H, W]: the 299/587/114 weights in 16-bit fixed point, rounded."""
    rgb = image.astype(jnp.int32)
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return jnp.right_shift(weighted, 16)


def brightness_base(image: jax.Array) -> jax.Array:
    """ImageEnhance.Brightness blends with black."""
    return jnp.zeros_like(image)


def color_base(image: jax.Array) -> jax.Array:
    """ImageEnhance.Color blends with the image converted to L and back."""
    grey = greyscale(image).astype(jnp.float32)
    return jnp.broadcast_to(grey[..., None], image.shape)


def contrast_base(image: jax.Array) -> jax.Array:
    """ImageEnhance.Contrast blends with the mean of L, rounded half up to an integer (the
    sum is exact in int32 for images under 8.4 million pixels)."""
    grey = greyscale(image)
    count = grey.size
    total = jnp.sum(grey)
    mean = total // count + (2 * (total % count) >= count)
    return jnp.full_like(image, mean.astype(jnp.float32))


def sharpness_base(image: jax.Array) -> jax.Array:
    """ImageEnhance.Sharpness blends with ImageFilter.SMOOTH: (8 neighbours + 5 x centre)
    / 13, rounded (a sum over 13 never ties, so integer arithmetic gives PIL's float
    result), the one-pixel border kept as it is."""
    pixels = image.astype(jnp.int32)
    h, w = image.shape[:2]
    window = sum(
        pixels[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    )
    weighted = window + 4 * pixels[1:-1, 1:-1]
    smooth = (2 * weighted + 13) // 26
    return pixels.at[1:-1, 1:-1].set(smooth).astype(jnp.float32)


@functools.cache
def _autocontrast_slips() -> np.ndarray:
    """Keys ``(lo * 256 + hi) * 256 + level`` where PIL's float64 LUT
    ``int(level * scale - lo * scale)`` lands one below the exact ``(level - lo) * 255 //
    (hi - lo)`` (about 0.4% of the entries): a table makes ours PIL's to the level."""
    keys = []
    level = np.arange(256, dtype=np.float64)
    for lo in range(255):
        hi = np.arange(lo + 1, 256, dtype=np.float64)[:, None]
        scale = 255.0 / (hi - lo)
        pil = np.floor(level * scale + (-lo * scale))
        exact = np.floor_divide((level - lo) * 255, hi - lo)
        his, levels = np.nonzero((pil < exact) & (level >= lo) & (level <= hi))
        keys.append((lo * 256 + lo + 1 + his) * 256 + levels)
    return np.sort(np.concatenate(keys)).astype(np.int32)


def _autocontrast_channel(channel: jax.Array) -> jax.Array:
    lo, hi = jnp.min(channel), jnp.max(channel)
    level = jnp.arange(256, dtype=jnp.int32)
    exact = jnp.clip((level - lo) * 255 // jnp.maximum(hi - lo, 1), 0, 255)
    slips = jnp.asarray(_autocontrast_slips())
    keys = (lo * 256 + hi) * 256 + level
    found = slips[jnp.clip(jnp.searchsorted(slips, keys), 0, slips.size - 1)] == keys
    lut = jnp.where(hi > lo, exact - found, level)
    return lut[channel]


def autocontrast(image: jax.Array) -> jax.Array:
    """ImageOps.autocontrast: each channel's min..max stretched to 0..255 (unchanged when
    the channel is flat)."""
    channels = jnp.moveaxis(image.astype(jnp.int32), -1, 0)
    return jnp.moveaxis(jax.vmap(_autocontrast_channel)(channels), 0, -1).astype(jnp.float32)


def _equalize_channel(channel: jax.Array) -> jax.Array:
    histogram = jnp.bincount(channel.ravel(), length=256)
    # PIL's step leaves out the count of the highest level present; a channel with one
    # level has step 0 too, so "step == 0" is PIL's "unchanged" case entire.
    step = (channel.size - histogram[jnp.max(channel)]) // 255
    below = jnp.cumsum(histogram) - histogram
    lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut[channel], channel)


def equalize(image: jax.Array) -> jax.Array:
    """ImageOps.equalize: per-channel histogram equalisation, PIL's lookup table (values
    past 255 clipped, as ``Image.point`` clips them)."""
    channels = jnp.moveaxis(image.astype(jnp.int32), -1, 0)
    return jnp.moveaxis(jax.vmap(_equalize_channel)(channels), 0, -1).astype(jnp.float32)


def posterize(image: jax.Array, bits: jax.Array) -> jax.Array:
    """ImageOps.posterize: keeps the top ``bits`` bits of each channel."""
    shift = 8 - bits
    return jnp.left_shift(jnp.right_shift(image.astype(jnp.int32), shift), shift).astype(
        jnp.float32
    )


def solarize(image: jax.Array, threshold: jax.Array) -> jax.Array:
    """ImageOps.solarize: levels at or above ``threshold`` inverted."""
    return jnp.where(image >= threshold, 255.0 - image, image)


def affine(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """PIL's ``transform(size, AFFINE, ..., BILINEAR, fillcolor=127)``.

    ``matrix`` (a, b, c, d, e, f) maps each output pixel centre, taken relative to the image
    centre (X = x + 0.5 - W / 2, Y likewise), to the input point (a X + b Y + c, d X + e Y
    + f) in PIL's absolute coordinates (pixel centres at +0.5); the centred form keeps the
    float32 products small. As PIL: a point outside [0, W) x [0, H) leaves the fill, a
    point inside is interpolated between its four neighbours with the edge pixels
    repeated, and the result is truncated. PIL computes the point and the weights in
    float64: where a value lands within float32's error of a whole level (or a point of
    the border) ours may differ by one level (or be fill where PIL samples the border).
    """
    h, w = image.shape[:2]
    xs = jnp.arange(w, dtype=jnp.float32) + (0.5 - w / 2)
    ys = jnp.arange(h, dtype=jnp.float32)[:, None] + (0.5 - h / 2)
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    x_in = a * xs + b * ys + c
    y_in = d * xs + e * ys + f
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    x_floor = jnp.floor(x_in - 0.5)
    y_floor = jnp.floor(y_in - 0.5)
    dx = (x_in - 0.5 - x_floor)[..., None]
    dy = (y_in - 0.5 - y_floor)[..., None]
    x0 = jnp.clip(x_floor, 0, w - 1).astype(jnp.int32)
    x1 = jnp.clip(x_floor + 1, 0, w - 1).astype(jnp.int32)
    y0 = jnp.clip(y_floor, 0, h - 1).astype(jnp.int32)
    y1 = jnp.clip(y_floor + 1, 0, h - 1).astype(jnp.int32)  # below the last row: the row itself
    top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
    bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
    sampled = jnp.floor(top + (bottom - top) * dy)
    return jnp.where(inside[..., None], sampled, FILL)


def cutout(image: jax.Array, box: jax.Array) -> jax.Array:
    """``ImageDraw.rectangle((x0, y0, x1, y1), fill=127)``: both corners included."""
    h, w = image.shape[:2]
    xs = jnp.arange(w)
    ys = jnp.arange(h)[:, None]
    inside = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
    return jnp.where(inside[..., None], FILL, image)
