"""Strong augmentation of bridged images (docs/method.md §1.3): colour jitter then Gaussian blur.

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

DAFormer's DACS (and MIC) draw some of these once per batch (:func:`share_over_batch`) and
blur with a 2-D kernel (``blur_2d``: its kernel sizes come from a (1, C, H, W) view, so
rows from H and columns from W). MIC's block mask is MIC's own (``ddb_jax/methods/mic.py``).
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
JITTER_FACTORS = ("brightness", "contrast", "saturation", "hue")


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
        jitter=jax.random.uniform(keys[0], (), jnp.float32) < jitter_prob,
        brightness=uniform(keys[1], max(1 - s, 0.0), min(1 + s, 2.0)),
        contrast=uniform(keys[2], max(1 - s, 0.0), 1 + s),
        saturation=uniform(keys[3], max(1 - s, 0.0), 1 + s),
        hue=uniform(keys[4], max(-s, -0.5), min(s, 0.5)),
        order=jax.random.permutation(keys[5], 4).astype(jnp.int32),
        blur=jax.random.uniform(keys[6], (), jnp.float32) < blur_prob,
        sigma=uniform(keys[7], *sigma_range),
    )


Planes = tuple[jax.Array, jax.Array, jax.Array]


def _hsv_planes(r: jax.Array, g: jax.Array, b: jax.Array) -> Planes:
    """kornia 0.5.8 rgb_to_hsv on separate channel planes (elementwise selects, no gathers:
    several times faster on CPU than gathering from a trailing axis of 3)."""
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    minc = jnp.minimum(jnp.minimum(r, g), b)
    delta = maxc - minc
    sat = delta / (maxc + HSV_EPS)
    delta_safe = jnp.where(delta == 0, 1.0, delta)
    rc, gc, bc = maxc - r, maxc - g, maxc - b
    # The first channel equal to the maximum picks the formula (kornia's cumsum trick).
    hue = jnp.where(
        r == maxc,
        bc - gc,
        jnp.where(g == maxc, 2.0 * delta_safe + rc - bc, 4.0 * delta_safe + gc - rc),
    )
    hue = jnp.remainder(hue / delta_safe / 6.0, 1.0) * (2 * math.pi)
    return hue, sat, maxc


def _rgb_planes(hue: jax.Array, sat: jax.Array, val: jax.Array) -> Planes:
    """kornia 0.5.8 hsv_to_rgb (sector table) on separate planes."""
    h = hue / (2 * math.pi)
    sector = jnp.remainder(jnp.floor(h * 6), 6)
    f = jnp.remainder(h * 6, 6) - sector
    p = val * (1 - sat)
    q = val * (1 - f * sat)
    t = val * (1 - (1 - f) * sat)

    def pick(row: tuple[jax.Array, ...]) -> jax.Array:
        out = row[5]
        for i in range(4, -1, -1):
            out = jnp.where(sector == i, row[i], out)
        return out

    return (
        pick((val, q, p, p, t, val)),
        pick((t, val, val, q, p, p)),
        pick((p, p, t, val, val, q)),
    )


def _split(image: jax.Array) -> Planes:
    return image[..., 0], image[..., 1], image[..., 2]


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """(..., 3) RGB in [0, 1] -> HSV with H in [0, 2 pi) (kornia 0.5.8 formulas, eps 1e-6)."""
    return jnp.stack(_hsv_planes(*_split(rgb)), axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Inverse of :func:`rgb_to_hsv` (kornia 0.5.8 sector table)."""
    return jnp.stack(_rgb_planes(*_split(hsv)), axis=-1)


def adjust_brightness(rgb: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(rgb + (factor - 1), 0.0, 1.0)


def adjust_contrast(rgb: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(rgb * factor, 0.0, 1.0)


def _saturate(hsv: Planes, factor: jax.Array) -> Planes:
    return hsv[0], jnp.clip(hsv[1] * factor, 0.0, 1.0), hsv[2]


def _shift_hue(hsv: Planes, factor: jax.Array) -> Planes:
    return jnp.fmod(hsv[0] + factor * 2 * math.pi, 2 * math.pi), hsv[1], hsv[2]


def adjust_saturation(rgb: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.stack(_rgb_planes(*_saturate(_hsv_planes(*_split(rgb)), factor)), axis=-1)


def adjust_hue(rgb: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.stack(_rgb_planes(*_shift_hue(_hsv_planes(*_split(rgb)), factor)), axis=-1)


def color_jitter(rgb: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """kornia 0.5.8 ColorJitter on one (H, W, 3) image in [0, 1], ops in ``params['order']``.

    Works on channel planes. Each of the 4 steps applies the op ``order[step]``; under
    ``vmap`` (one order per image) a switch evaluates every branch, so the saturation and
    hue branches share one HSV round trip per step (they differ only in the channel they
    change): same values as separate calls, half the colour-space conversions.
    """
    # Factors in the image's dtype, so that float64 images are jittered in float64 throughout.
    factors = {k: jnp.asarray(params[k], rgb.dtype) for k in JITTER_FACTORS}
    params = {**params, **factors}
    planes = _split(rgb)
    for step in range(4):
        op = params["order"][step]
        hsv = _hsv_planes(*planes)
        hsv = tuple(
            jnp.where(op == 2, sat, jnp.where(op == 3, hue, keep))
            for keep, sat, hue in zip(
                hsv,
                _saturate(hsv, params["saturation"]),
                _shift_hue(hsv, params["hue"]),
                strict=True,
            )
        )
        via_hsv = _rgb_planes(*hsv)
        planes = tuple(
            jnp.where(
                op == 0,
                adjust_brightness(x, params["brightness"]),
                jnp.where(op == 1, adjust_contrast(x, params["contrast"]), y),
            )
            for x, y in zip(planes, via_hsv, strict=True)
        )
    return jnp.stack(planes, axis=-1)


def _blur_axis(image: jax.Array, sigma: jax.Array, size: int, axis: int) -> jax.Array:
    """1-D Gaussian of odd length ``size`` along ``axis`` (0 rows, 1 columns) of (H, W, C),
    reflect padding, taps normalised to sum 1 (kornia's ``get_gaussian_kernel1d``)."""
    if size <= 1:
        return image
    offsets = jnp.arange(size, dtype=image.dtype) - size // 2
    taps = jnp.exp(-(offsets**2) / (2 * jnp.asarray(sigma, image.dtype) ** 2))
    taps = taps / jnp.sum(taps)
    pad = [(0, 0)] * 3
    pad[axis] = (size // 2, size // 2)
    padded = jnp.pad(image, pad, mode="reflect")
    length = image.shape[axis]

    def shifted(i: int) -> jax.Array:
        return jax.lax.slice_in_dim(padded, i, i + length, axis=axis)

    # A weighted sum of shifted slices: one fused elementwise loop, ~8x faster on CPU than
    # the equivalent depthwise conv_general_dilated (3 groups of a 1 x size kernel).
    out = taps[0] * shifted(0)
    for i in range(1, size):
        out = out + taps[i] * shifted(i)
    return out


def gaussian_blur(image: jax.Array, sigma: jax.Array, two_d: bool = False) -> jax.Array:
    """The reference's blur of one (H, W, C) image, reflect padding.

    DDB (default): horizontal only, of length :func:`blur_kernel_size` of the height.
    ``two_d`` (DACS/DAFormer, MIC): rows of length ``blur_kernel_size(H)`` and columns of
    ``blur_kernel_size(W)``; kornia's 2-D kernel is the outer product of the two, so two
    1-D passes compute it.
    """
    h, w, _ = image.shape
    if two_d:
        out = _blur_axis(image, sigma, blur_kernel_size(h), axis=0)
        out = _blur_axis(out, sigma, blur_kernel_size(w), axis=1)
    else:
        out = _blur_axis(image, sigma, blur_kernel_size(h), axis=1)
    return out.astype(image.dtype)


def apply_strong(
    image: jax.Array,
    params: dict[str, jax.Array],
    jitter: bool = True,
    blur: bool = True,
    blur_2d: bool = False,
) -> jax.Array:
    """Strong augmentation of one normalised (H, W, 3) image with given parameters.

    ``jitter`` / ``blur`` are the static switches of the reference config (post_pmd,
    post_blur); the per-image coin flips are in ``params``; ``blur_2d`` selects DACS's
    2-D kernel over DDB's horizontal one (:func:`gaussian_blur`).
    """
    mean = jnp.asarray(IMAGE_MEAN, image.dtype)
    std = jnp.asarray(IMAGE_STD, image.dtype)
    if jitter:
        rgb = (image * std + mean) / 255.0
        jittered = (color_jitter(rgb, params) * 255.0 - mean) / std
        image = jnp.where(params["jitter"], jittered, image)
    if blur:
        blurred = gaussian_blur(image, params["sigma"], two_d=blur_2d)
        image = jnp.where(params["blur"], blurred, image)
    return image


def strong_augment(
    key: jax.Array, images: jax.Array, jitter: bool = True, blur: bool = True
) -> jax.Array:
    """Strong augmentation of a normalised NHWC batch, an independent draw per image."""
    params = jax.vmap(draw_strong_params)(jax.random.split(key, images.shape[0]))
    return jax.vmap(lambda x, p: apply_strong(x, p, jitter, blur))(images, params)


# --- draws shared by a batch (DACS, MIC) --------------------------------------------------

# DACS (DAFormer) flips its jitter and blur coins once per batch and calls kornia per image;
# MIC calls kornia once on the whole batch, so its op order and blur sigma are shared too.
DACS_SHARED = ("jitter", "blur")
MIC_SHARED = ("jitter", "blur", "order", "sigma")


def share_over_batch(
    params: dict[str, jax.Array],
    key: jax.Array,
    fields: tuple[str, ...],
    jitter_prob: float = JITTER_PROB,
    strength: float = JITTER_STRENGTH,
    blur_prob: float = BLUR_PROB,
) -> dict[str, jax.Array]:
    """Per-image draws (N, ...) with ``fields`` replaced by one draw for the whole batch.

    The shared draw comes from ``key`` with the same law, so the other fields keep their
    per-image keys (and values) untouched.
    """
    shared = draw_strong_params(key, jitter_prob, strength, blur_prob)
    return {
        name: jnp.broadcast_to(shared[name], value.shape) if name in fields else value
        for name, value in params.items()
    }


def draw_batch_params(
    key: jax.Array,
    batch_size: int,
    shared: tuple[str, ...],
    jitter_prob: float = JITTER_PROB,
    strength: float = JITTER_STRENGTH,
    blur_prob: float = BLUR_PROB,
) -> dict[str, jax.Array]:
    """A batch's draws: per image, then ``shared`` fields drawn once (see MIC_SHARED)."""
    image_key, batch_key = jax.random.split(key)
    params = jax.vmap(lambda k: draw_strong_params(k, jitter_prob, strength, blur_prob))(
        jax.random.split(image_key, batch_size)
    )
    return share_over_batch(params, batch_key, shared, jitter_prob, strength, blur_prob)
