"""ProDA's strong view, ``RandAugmentMC(n=2, m=10)`` in its 'crc' form, on device.

Per image, as the reference draws it: a horizontal flip with probability 0.5; then ``n``
ops drawn with replacement from FixMatch's pool of 14, each with a magnitude ``v`` in
1..m-1 (numpy's ``randint(1, m)``), applied with probability 0.5, and, for the geometric
ones, negated with probability 0.5; then a grey square of side ``min(H, W) // 3`` cut out
around a uniform centre. The pixel ops are ``randaugment_ops`` (PIL's arithmetic).

``draw_strong`` (key -> every random choice) is apart from ``apply_strong`` (images and a
draw -> strong images and the geometric record), so a test can feed one draw to this code
and to PIL. Images are float32 [B, H, W, 3] RGB in 0..255 (``ops.denormalize_image`` of
the network input; ``ops.normalize_image`` takes the result back); they are rounded to
uint8 levels first, as the reference starts from a uint8 image.

``params`` records what the label maps need, in the reference's units: ``hflip``; the
signed shear factor, translation in whole pixels (``int(v * size)``) and rotation in
degrees (counter-clockwise), ``NOT_APPLIED`` (1e4) for an op not applied (when an op comes
twice, the last one applied, as the reference's dict keeps it); ``cutout`` the (x0, y0,
x1, y1) box, corners included.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax.uda import randaugment_ops as pixel

PARAMETER_MAX = 10
NOT_APPLIED = 1e4
# FixMatch's pool, in its order: (name, max_v, bias).
POOL = (
    ("auto_contrast", None, None),
    ("brightness", 0.9, 0.05),
    ("color", 0.9, 0.05),
    ("contrast", 0.9, 0.05),
    ("equalize", None, None),
    ("identity", None, None),
    ("posterize", 4, 4),
    ("rotate", 30, 0),
    ("sharpness", 0.9, 0.05),
    ("shear_x", 0.3, 0),
    ("shear_y", 0.3, 0),
    ("solarize", 256, 0),
    ("translate_x", 0.3, 0),
    ("translate_y", 0.3, 0),
)
OP_NAMES = tuple(name for name, _, _ in POOL)
OP = {name: i for i, name in enumerate(OP_NAMES)}
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
ENHANCE = ("brightness", "color", "contrast", "sharpness")
ENHANCE_BASES = (pixel.brightness_base, pixel.color_base, pixel.contrast_base, pixel.sharpness_base)
# Each op's branch of _apply_op: the five geometric ops share one affine sampler and the
# four enhance ops one blend (under vmap every branch runs, so fewer branches cost less).
BRANCHES = ("auto_contrast", "enhance", "equalize", "identity", "posterize", "affine", "solarize")
OP_BRANCH = np.array(
    [
        BRANCHES.index("affine" if n in GEOMETRIC else "enhance" if n in ENHANCE else n)
        for n in OP_NAMES
    ],
    np.int32,
)
ENHANCE_KIND = np.array([ENHANCE.index(n) if n in ENHANCE else 0 for n in OP_NAMES], np.int32)


def draw_strong(
    key: jax.Array, batch_size: int, height: int, width: int, n: int = 2, m: int = 10
) -> dict[str, jax.Array]:
    """Every random choice of the strong view for a batch: ``hflip`` bool [B]; per round
    [B, n]: ``ops`` (pool index), ``magnitudes`` (1..m-1), ``applied``, ``negated`` (the
    geometric ops' sign); ``cutout_centre`` float32 [B, 2], (x, y) in pixels."""
    if n < 1 or not 2 <= m <= PARAMETER_MAX:
        raise ValueError(f"RandAugmentMC needs n >= 1 and 2 <= m <= 10, got n={n}, m={m}")
    keys = jax.random.split(key, 6)
    rounds = (batch_size, n)
    centre = jax.random.uniform(keys[5], (batch_size, 2), jnp.float32)
    return {
        "hflip": jax.random.bernoulli(keys[0], 0.5, (batch_size,)),
        "ops": jax.random.randint(keys[1], rounds, 0, len(POOL), jnp.int32),
        "magnitudes": jax.random.randint(keys[2], rounds, 1, m, jnp.int32),
        "applied": jax.random.bernoulli(keys[3], 0.5, rounds),
        "negated": jax.random.bernoulli(keys[4], 0.5, rounds),
        "cutout_centre": centre * jnp.array([width, height], jnp.float32),
    }


def _rotation(degrees: float, height: int, width: int) -> tuple[float, ...]:
    """``Image.rotate(degrees)``'s matrix, as PIL builds it, in the centred form of
    ``randaugment_ops.affine``."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return a, b, a * cx + b * cy + c, d, e, d * cx + e * cy + f


@functools.cache
def _tables(height: int, width: int) -> dict[str, np.ndarray]:
    """Every op's parameter by [op, magnitude, negated], computed in float64 as the
    reference does (its ``int(...)`` truncations included): ``value`` what it records
    (or the enhance factor, bits, threshold), ``matrix`` the affine map."""
    value = np.zeros((len(POOL), PARAMETER_MAX, 2), np.float64)
    matrix = np.zeros((len(POOL), PARAMETER_MAX, 2, 6), np.float64)
    cx, cy = width / 2, height / 2
    for op, (name, max_v, bias) in enumerate(POOL):
        for v in range(PARAMETER_MAX):
            for negated in (0, 1):
                sign = -1 if negated else 1
                matrix[op, v, negated] = (1, 0, cx, 0, 1, cy)
                if max_v is None:
                    continue
                as_float = float(v) * max_v / PARAMETER_MAX + bias
                as_int = int(v * max_v / PARAMETER_MAX) + bias
                if name in ENHANCE:
                    value[op, v, negated] = as_float
                elif name == "posterize":
                    value[op, v, negated] = as_int
                elif name == "solarize":
                    value[op, v, negated] = 256 - as_int
                elif name == "rotate":
                    value[op, v, negated] = sign * as_int
                    matrix[op, v, negated] = _rotation(sign * as_int, height, width)
                elif name.startswith("shear"):
                    shear = sign * as_float
                    value[op, v, negated] = shear
                    if name == "shear_x":
                        matrix[op, v, negated] = (1, shear, cx + shear * cy, 0, 1, cy)
                    else:
                        matrix[op, v, negated] = (1, 0, cx, shear, 1, cy + shear * cx)
                else:
                    size = width if name == "translate_x" else height
                    shift = int(sign * as_float * size)
                    value[op, v, negated] = shift
                    if name == "translate_x":
                        matrix[op, v, negated] = (1, 0, cx + shift, 0, 1, cy)
                    else:
                        matrix[op, v, negated] = (1, 0, cx, 0, 1, cy + shift)
    return {"value": value.astype(np.float32), "matrix": matrix.astype(np.float32)}


def _apply_op(image: jax.Array, op: jax.Array, value: jax.Array, matrix: jax.Array) -> jax.Array:
    """One pool op on one image; ``value``/``matrix`` are its rows of ``_tables``."""

    def enhance(img: jax.Array) -> jax.Array:
        base = jax.lax.switch(jnp.asarray(ENHANCE_KIND)[op], ENHANCE_BASES, img)
        return pixel.blend(base, img, value)

    branches = {
        "auto_contrast": pixel.autocontrast,
        "enhance": enhance,
        "equalize": pixel.equalize,
        "identity": lambda img: img,
        "posterize": lambda img: pixel.posterize(img, value.astype(jnp.int32)),
        "affine": lambda img: pixel.affine(img, matrix),
        "solarize": lambda img: pixel.solarize(img, value),
    }
    return jax.lax.switch(jnp.asarray(OP_BRANCH)[op], [branches[b] for b in BRANCHES], image)


def cutout_box(centre: jax.Array, height: int, width: int) -> jax.Array:
    """The reference's CutoutAbs box (x0, y0, x1, y1), int32, for a centre (x, y)."""
    size = min(height, width) // 3
    corner = jnp.floor(jnp.maximum(centre - size / 2.0, 0.0)).astype(jnp.int32)
    far = jnp.minimum(corner + size, jnp.array([width, height], jnp.int32))
    return jnp.concatenate([corner, far])


def _strong_one(
    image: jax.Array, draw: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    height, width = image.shape[:2]
    tables = _tables(height, width)
    image = pixel.quantize(image)
    image = jnp.where(draw["hflip"], image[:, ::-1], image)
    record = {name: jnp.float32(NOT_APPLIED) for name in GEOMETRIC}
    for i in range(draw["ops"].shape[0]):
        op, v, negated = draw["ops"][i], draw["magnitudes"][i], draw["negated"][i]
        row = (op, v, negated.astype(jnp.int32))
        value = jnp.asarray(tables["value"])[row]
        changed = _apply_op(image, op, value, jnp.asarray(tables["matrix"])[row])
        image = jnp.where(draw["applied"][i], changed, image)
        for name in GEOMETRIC:
            chosen = draw["applied"][i] & (op == OP[name])
            record[name] = jnp.where(chosen, value, record[name])
    box = cutout_box(draw["cutout_centre"], height, width)
    params = {"hflip": draw["hflip"], **record, "cutout": box}
    return pixel.cutout(image, box), params


def apply_strong(
    images: jax.Array, draw: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The strong views of ``images`` (float32 [B, H, W, 3], RGB, 0..255) under ``draw``
    (from :func:`draw_strong`): float32 images of whole levels 0..255, and ``params``
    {'hflip': bool [B], 'shear_x', 'shear_y', 'translate_x', 'translate_y', 'rotate':
    float32 [B], 'cutout': int32 [B, 4]}. Jittable; shapes are static."""
    return jax.vmap(_strong_one)(images, draw)
