"""Strong augmentation of bridged images (§1.3): colour jitter then Gaussian blur.

Semantics follow what the reference ran, kornia 0.5.8 (``STDataset.color_jitter`` /
``gaussian_blur``), applied to one image at a time:

* colour jitter with probability 0.8 (the reference jitters when ``U(0,1) > 0.2``) on the
  de-normalised [0, 1] image. kornia 0.5.8 ``ColorJitter(s, s, s, s)`` draws brightness,
  contrast and saturation factors from U(1-s, 1+s), a hue factor from U(-s, s), and a
  random permutation of the four ops *per call* (one call per image here). Brightness
  *adds* ``factor - 1``; contrast *multiplies* by the factor (no blend towards the mean);
  saturation multiplies HSV's S; hue shifts H by ``factor * 2 pi`` (fmod); every op clamps
  to [0, 1] (saturation clamps S). kornia >= 0.6 kept these semantics under the name
  ``ColorJiggle`` and made ``ColorJitter`` follow torchvision (multiplicative brightness,
  contrast blended with the grey mean), so a newer kornia is *not* a drop-in reference.
* Gaussian blur with probability 0.5 (``U(0,1) > 0.5``), sigma ~ U(0.15, 1.15), kornia
  ``GaussianBlur2d`` (reflect padding). The reference computes the kernel size after
  adding a batch axis to a (C, H, W) tensor, so its "y" size comes from the channel count
  (3 -> 1) and its "x" size from the *height*: the blur is horizontal only, of odd length
  ``floor(ceil(0.1 H) - 0.5 + ceil(0.1 H) % 2)``. We reproduce that; the length depends
  only on the static image shape.

``draw_strong_params`` (key -> parameters) is separate from ``apply_strong`` (parameters ->
image) so tests can feed one fixed draw to both this code and a PyTorch reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD

JITTER_PROB = 0.8
JITTER_STRENGTH = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.15, 1.15)
HSV_EPS = 1e-6


def blur_kernel_size(height: int) -> int:
    """The reference's (horizontal) blur length for an image of ``height`` rows."""
    c = math.ceil(0.1 * height)
    return int(math.floor(c - 0.5 + c % 2))


def draw_strong_params(
    key: jax.Array,
    jitter_prob: float = JITTER_PROB,
    strength: float = JITTER_STRENGTH,
    blur_prob: float = BLUR_PROB,
    sigma_range: tuple[float, float] = BLUR_SIGMA_RANGE,
) -> dict[str, jax.Array]:
    """One image's augmentation parameters (scalars and a length-4 op order)."""
    keys = jax.random.split(key, 8)
    s = strength

    def uniform(k: jax.Array, low: float, high: float) -> jax.Array:
        return jax.random.uniform(k, (), jnp.float32, low, high)

    return dict(
        jitter=jax.random.uniform(keys[0], ()) < jitter_prob,
        brightness=uniform(keys[1], max(1 - s, 0.0), min(1 + s, 2.0)),
        contrast=uniform(keys[2], max(1 - s, 0.0), 1 + s),
        saturation=uniform(keys[3], max(1 - s, 0.0), 1 + s),
        hue=uniform(keys[4], max(-s, -0.5), min(s, 0.5)),
        order=jax.random.permutation(keys[5], 4).astype(jnp.int32),
        blur=jax.random.uniform(keys[6], ()) < blur_prob,
        sigma=uniform(keys[7], *sigma_range),
    )


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """(..., 3) RGB in [0, 1] -> HSV with H in [0, 2 pi) (kornia 0.5.8 formulas, eps 1e-6)."""
    maxc = jnp.max(rgb, axis=-1)
    minc = jnp.min(rgb, axis=-1)
    max_index = jnp.argmax(rgb, axis=-1)  # first maximum, as kornia's cumsum trick
    delta = maxc - minc
    sat = delta / (maxc + HSV_EPS)
    delta_safe = jnp.where(delta == 0, 1.0, delta)
    rc, gc, bc = [maxc - rgb[..., i] for i in range(3)]
    candidates = jnp.stack([bc - gc, 2.0 * delta_safe + rc - bc, 4.0 * delta_safe + gc - rc], -1)
    hue = jnp.take_along_axis(candidates, max_index[..., None], axis=-1)[..., 0]
    hue = jnp.remainder(hue / delta_safe / 6.0, 1.0) * (2 * math.pi)
    return jnp.stack([hue, sat, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Inverse of :func:`rgb_to_hsv` (kornia 0.5.8 sector table)."""
    h = hsv[..., 0] / (2 * math.pi)
    s, v = hsv[..., 1], hsv[..., 2]
    sector = jnp.remainder(jnp.floor(h * 6), 6)
    f = jnp.remainder(h * 6, 6) - sector
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    table = jnp.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], axis=-1).reshape(
        *v.shape, 3, 6
    )
    idx = sector.astype(jnp.int32)[..., None, None]
    return jnp.take_along_axis(table, jnp.broadcast_to(idx, (*v.shape, 3, 1)), axis=-1)[..., 0]


def adjust_brightness(rgb: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(rgb + (factor - 1), 0.0, 1.0)


def adjust_contrast(rgb: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(rgb * factor, 0.0, 1.0)


def adjust_saturation(rgb: jax.Array, factor: jax.Array) -> jax.Array:
    hsv = rgb_to_hsv(rgb)
    hsv = hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * factor, 0.0, 1.0))
    return hsv_to_rgb(hsv)


def adjust_hue(rgb: jax.Array, factor: jax.Array) -> jax.Array:
    hsv = rgb_to_hsv(rgb)
    hsv = hsv.at[..., 0].set(jnp.fmod(hsv[..., 0] + factor * 2 * math.pi, 2 * math.pi))
    return hsv_to_rgb(hsv)


def color_jitter(rgb: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """kornia 0.5.8 ColorJitter on one (H, W, 3) image in [0, 1], ops in ``params['order']``."""
    ops = [
        lambda x: adjust_brightness(x, params["brightness"]),
        lambda x: adjust_contrast(x, params["contrast"]),
        lambda x: adjust_saturation(x, params["saturation"]),
        lambda x: adjust_hue(x, params["hue"]),
    ]
    for step in range(4):
        rgb = jax.lax.switch(params["order"][step], ops, rgb)
    return rgb


def gaussian_blur(image: jax.Array, sigma: jax.Array) -> jax.Array:
    """The reference's blur of one (H, W, C) image: horizontal Gaussian, reflect padding."""
    h, w, c = image.shape
    size = blur_kernel_size(h)
    if size <= 1:
        return image
    offsets = jnp.arange(size, dtype=jnp.float32) - size // 2
    taps = jnp.exp(-(offsets**2) / (2 * sigma**2))
    taps = taps / jnp.sum(taps)
    padded = jnp.pad(image, ((0, 0), (size // 2, size // 2), (0, 0)), mode="reflect")
    kernel = jnp.broadcast_to(taps[None, :, None, None], (1, size, 1, c))
    out = jax.lax.conv_general_dilated(
        padded[None],
        kernel.astype(image.dtype),
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )
    return out[0]


def apply_strong(
    image: jax.Array,
    params: dict[str, jax.Array],
    jitter: bool = True,
    blur: bool = True,
) -> jax.Array:
    """Strong augmentation of one normalised (H, W, 3) image with given parameters.

    ``jitter`` / ``blur`` are the static switches of the reference config (post_pmd,
    post_blur); the per-image coin flips are in ``params``.
    """
    mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
    std = jnp.asarray(IMAGE_STD, jnp.float32)
    if jitter:
        rgb = (image * std + mean) / 255.0
        jittered = (color_jitter(rgb, params) * 255.0 - mean) / std
        image = jnp.where(params["jitter"], jittered, image)
    if blur:
        image = jnp.where(params["blur"], gaussian_blur(image, params["sigma"]), image)
    return image


def strong_augment(
    key: jax.Array, images: jax.Array, jitter: bool = True, blur: bool = True
) -> jax.Array:
    """Strong augmentation of a normalised NHWC batch, an independent draw per image."""
    params = jax.vmap(draw_strong_params)(jax.random.split(key, images.shape[0]))
    return jax.vmap(lambda x, p: apply_strong(x, p, jitter, blur))(images, params)
