"""Maps moved like ProDA's strong view: the reference's ``label_strong_T`` (microsoft/ProDA
``models/adaptation_modelv2.py``, with ``affine_sample`` of ``data/randaugment.py``).

The strong view is the weak crop after a horizontal flip, up to two geometric RandAugment
ops and a cutout. A map in the weak crop's frame (a label map, or the EMA's prototype
distances) follows it, in the reference's order: the flip, then ShearX, ShearY,
TranslateX, TranslateY and Rotate (each when its parameter is not 1e4), each an
``F.affine_grid`` + ``F.grid_sample(mode='nearest')`` resampling with zero padding, then the
cutout box set to 0; every value is shifted by +1 first so that 0 marks padding, which
becomes ``fill`` at the end. The parameters (``strong_params``, one entry per image):

    hflip        bool    [B]     flipped left-right
    shear_x      float32 [B]     signed shear factor, 1e4 = not applied
    shear_y      float32 [B]     likewise
    translate_x  float32 [B]     whole pixels of the strong image, 1e4 = not applied
    translate_y  float32 [B]     likewise
    rotate       float32 [B]     degrees, 1e4 = not applied
    cutout       int32   [B, 4]  (x0, y0, x1, y1) in pixels of the strong image

Nearest resamplings compose: the ops are folded into one source index per output pixel
(float32 sampling grids, as the reference's ``torch.Tensor(theta)``) and the map is gathered
once. ``align_corners`` of the grid: False by default (torch >= 1.3's default; the
reference's pinned packages date it to 2020, and its translation and shear offsets are the
exact PIL-to-grid mapping only for align_corners=False); True is torch <= 1.2's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NOT_APPLIED = 1e4
AFFINE_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")  # reference order
STRONG_PARAMS = ("hflip", *AFFINE_OPS, "cutout")
TRANSLATIONS = ("translate_x", "translate_y")


def _grid_line(steps: int, align_corners: bool) -> np.ndarray:
    """torch's ``linspace_from_neg_one`` in float32: the normalised pixel centres."""
    if steps <= 1:
        return np.zeros(steps, np.float32)
    line = np.linspace(-1.0, 1.0, steps).astype(np.float32)
    if not align_corners:
        line = line * np.float32(steps - 1) / np.float32(steps)
    return line.astype(np.float32)


def affine_theta(
    kind: str, value: jax.Array, size: tuple[int, int], translate_x_by_width: bool = False
) -> jax.Array:
    """``affine_sample``'s theta (B, 2, 3), float32, for one op of ``AFFINE_OPS``.

    Built in float64 where available (the reference's numpy) and rounded to float32. The
    shears are made aspect-correct (``t01 H / W``, ``t10 W / H``) and, with the
    translations, re-centred from PIL's top-left origin to the grid's centre. Reference
    quirk: a translation of ``v`` pixels moves by ``2 v / H`` in normalised units on both
    axes, so TranslateX shifts by ``v W / H`` pixels; ``translate_x_by_width`` uses ``2 v / W``.
    """
    h, w = size
    v = value.astype(jnp.result_type(float))
    one, zero = jnp.ones_like(v), jnp.zeros_like(v)
    if kind == "rotate":
        angle = v / 180 * np.pi
        t = [[jnp.cos(angle), -jnp.sin(angle), zero], [jnp.sin(angle), jnp.cos(angle), zero]]
    else:
        t = {
            "shear_x": [[one, v, zero], [zero, one, zero]],
            "shear_y": [[one, zero, zero], [v, one, zero]],
            "translate_x": [[one, zero, v], [zero, one, zero]],
            "translate_y": [[one, zero, zero], [zero, one, v]],
        }[kind]
    t[0][1] = t[0][1] * h / w
    t[1][0] = t[1][0] * w / h
    if kind != "rotate":
        x_scale = w if kind == "translate_x" and translate_x_by_width else h
        t[0][2] = t[0][2] * 2 / x_scale + t[0][0] + t[0][1] - 1
        t[1][2] = t[1][2] * 2 / h + t[1][0] + t[1][1] - 1
    return jnp.stack([jnp.stack(row, -1) for row in t], -2).astype(jnp.float32)


def _nearest_source(theta: jax.Array, size: tuple[int, int], align_corners: bool):
    """For each output pixel (B, H, W): the nearest source row and column of
    ``grid_sample(affine_grid(theta))`` and whether it lies inside (else zero padding)."""
    h, w = size
    xs = jnp.asarray(_grid_line(w, align_corners))[None, None, :]
    ys = jnp.asarray(_grid_line(h, align_corners))[None, :, None]
    t = theta[:, :, :, None, None]
    gx = t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2]
    gy = t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]

    def unnormalise(g, n):
        if align_corners:
            return (g + 1) * np.float32((n - 1) / 2)
        return (g + 1) * np.float32(n / 2) - np.float32(0.5)

    # round(): half to even, as nearbyint; clipped first so the int cast cannot overflow.
    col = jnp.round(jnp.clip(unnormalise(gx, w), -2.0, w + 1.0)).astype(jnp.int32)
    row = jnp.round(jnp.clip(unnormalise(gy, h), -2.0, h + 1.0)).astype(jnp.int32)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return row, col, inside


def strong_source_index(
    params: dict[str, jax.Array],
    size: tuple[int, int],
    scale: int = 4,
    align_corners: bool = False,
    translate_x_by_width: bool = False,
) -> jax.Array:
    """The flat source index (B, H, W) int32 of every pixel of a map of ``size`` moved like
    the strong view (-1: padding or cutout). Translations and cutout are in pixels of the
    strong image: divided by ``scale`` and floored, as the reference's ``int(v // scale)``."""
    h, w = size
    batch = params["hflip"].shape[0]
    rows = jnp.broadcast_to(jnp.arange(h)[None, :, None], (batch, h, w))
    cols = jnp.broadcast_to(jnp.arange(w)[None, None, :], (batch, h, w))
    flip = params["hflip"].astype(bool)[:, None, None]
    index = rows * w + jnp.where(flip, w - 1 - cols, cols)
    for kind in AFFINE_OPS:
        value = params[kind]
        applied = value != NOT_APPLIED
        if kind in TRANSLATIONS:
            value = jnp.floor(value / scale)
        theta = affine_theta(kind, value, size, translate_x_by_width)
        row, col, inside = _nearest_source(theta, size, align_corners)
        flat = (jnp.clip(row, 0, h - 1) * w + jnp.clip(col, 0, w - 1)).reshape(batch, -1)
        moved = jnp.take_along_axis(index.reshape(batch, -1), flat, axis=1).reshape(index.shape)
        moved = jnp.where(inside, moved, -1)
        index = jnp.where(applied[:, None, None], moved, index)
    box = jnp.floor_divide(params["cutout"].astype(jnp.int32), scale)
    x0, y0, x1, y1 = (box[:, i, None, None] for i in range(4))
    cut = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return jnp.where(cut, -1, index)


def transform_like_strong(
    maps: jax.Array,
    params: dict[str, jax.Array],
    fill: float,
    scale: int = 4,
    align_corners: bool = False,
    translate_x_by_width: bool = False,
) -> jax.Array:
    """``label_strong_T(maps, params, padding=fill, scale)``: (B, H, W) label maps or
    (B, H, W, C) soft maps (every channel moved alike), same shape and dtype.

    As the reference: values shifted by +1, resampled (0 outside the image and in the
    cutout), 0 replaced by ``fill + 1``, shifted back by -1 (so a value of -1 would also
    become ``fill``, and float maps carry the rounding of the shift).
    """
    batch, h, w = maps.shape[:3]
    index = strong_source_index(params, (h, w), scale, align_corners, translate_x_by_width)
    shifted = maps + 1
    flat = shifted.reshape(batch, h * w, -1)
    gathered = jnp.take_along_axis(flat, jnp.maximum(index, 0).reshape(batch, -1, 1), axis=1)
    gathered = jnp.where(index.reshape(batch, -1, 1) >= 0, gathered, 0)
    gathered = jnp.where(gathered == 0, fill + 1, gathered).astype(maps.dtype)
    return (gathered - 1).reshape(maps.shape)
