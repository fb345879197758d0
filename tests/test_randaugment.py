"""ProDA's strong view (RandAugmentMC(2, 10), 'crc') against PIL itself.

Every comparison feeds one fixed draw to ``apply_strong`` and to a PIL transcription of the
reference's ``RandAugmentMC.__call__`` below (``PIL.Image``, ``ImageOps``, ``ImageEnhance``,
``ImageDraw`` on the same uint8 image, the op's parameter computed from the draw's
magnitude as the reference computes it). Every batch at one image size has ``BATCH``
images, so each size compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from ddb_jax.ops import denormalize_image, normalize_image
from ddb_jax.uda import randaugment
from ddb_jax.uda import randaugment_ops as pixel
from ddb_jax.uda.randaugment import GEOMETRIC, NOT_APPLIED, OP, OP_NAMES, PARAMETER_MAX, POOL

SHAPES = ((24, 32), (23, 37))  # (H, W); the second odd in both, so centres fall mid-pixel
BATCH = 48
GREY = (127, 127, 127)
apply_strong = jax.jit(randaugment.apply_strong)
draw_strong = jax.jit(randaugment.draw_strong, static_argnums=(1, 2, 3, 4, 5))

# PIL's resampling computes the source point and the bilinear weights in float64, ours in
# float32 (randaugment_ops.affine). Only a value that lands within float32's error of a
# whole level can truncate differently, so every pixel is within one level; those are
# common for the shears, whose factors are decimals (0.03 k) and whose weights are then
# often exact fractions that make an integer level difference a whole number (observed:
# up to 2.6% of the pixels, bound 4%); rare for rotations (observed < 0.02%, bound 0.5%).
# Translations move by whole pixels (weights 0): exact. Every other op is exact: PIL's
# integer LUTs and fixed-point greyscale are integer arithmetic here, its float32 blend is
# rounded as PIL rounds it (randaugment_ops.blend), and the autocontrast LUT carries the
# entries where PIL's float64 LUT falls below the exact one.
OFF_BY_ONE_FRACTION = {"rotate": 0.005, "shear_x": 0.04, "shear_y": 0.04}


# --- the reference, on PIL ------------------------------------------------------------------


def _pil_affine(img: Image.Image, coefficients: tuple) -> Image.Image:
    return img.transform(
        img.size, Image.AFFINE, coefficients, resample=Image.BILINEAR, fillcolor=GREY
    )


def pil_op(img: Image.Image, name: str, v: int, negated: bool):
    """One pool op as the reference applies it: (image, the value it returns)."""
    _, max_v, bias = POOL[OP[name]]
    sign = -1 if negated else 1
    if max_v is None:
        ops = {"auto_contrast": ImageOps.autocontrast, "equalize": ImageOps.equalize}
        return ops.get(name, lambda image: image)(img), None
    real = float(v) * max_v / PARAMETER_MAX + bias
    whole = int(v * max_v / PARAMETER_MAX) + bias
    enhancers = {
        "brightness": ImageEnhance.Brightness,
        "color": ImageEnhance.Color,
        "contrast": ImageEnhance.Contrast,
        "sharpness": ImageEnhance.Sharpness,
    }
    if name in enhancers:
        return enhancers[name](img).enhance(real), real
    if name == "posterize":
        return ImageOps.posterize(img, whole), whole
    if name == "solarize":
        return ImageOps.solarize(img, 256 - whole), 256 - whole
    if name == "rotate":
        return img.rotate(sign * whole, resample=Image.BILINEAR, fillcolor=GREY), sign * whole
    if name == "shear_x":
        return _pil_affine(img, (1, sign * real, 0, 0, 1, 0)), sign * real
    if name == "shear_y":
        return _pil_affine(img, (1, 0, 0, sign * real, 1, 0)), sign * real
    shift = int(sign * real * img.size[0 if name == "translate_x" else 1])
    along = (1, 0, shift, 0, 1, 0) if name == "translate_x" else (1, 0, 0, 0, 1, shift)
    return _pil_affine(img, along), shift


def pil_strong(pixels: np.ndarray, draw: dict, i: int):
    """Image ``i`` of ``draw`` through the reference: (uint8 image, its params dict)."""
    img = Image.fromarray(pixels)
    record = {name: NOT_APPLIED for name in GEOMETRIC}
    if draw["hflip"][i]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    rounds = zip(*(draw[k][i] for k in ("ops", "magnitudes", "applied", "negated")), strict=True)
    for op, v, applied, negated in rounds:
        if applied:
            img, value = pil_op(img, OP_NAMES[op], int(v), bool(negated))
            if OP_NAMES[op] in GEOMETRIC:
                record[OP_NAMES[op]] = value
    w, h = img.size
    size = min(w, h) // 3
    cx, cy = (float(c) for c in draw["cutout_centre"][i])
    x0, y0 = int(max(0, cx - size / 2.0)), int(max(0, cy - size / 2.0))
    box = (x0, y0, int(min(w, x0 + size)), int(min(h, y0 + size)))
    img = img.copy()
    ImageDraw.Draw(img).rectangle(box, GREY)
    return np.asarray(img), {"hflip": bool(draw["hflip"][i]), **record, "cutout": box}


# --- helpers --------------------------------------------------------------------------------


def sample_images(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """BATCH uint8 images: smooth structure plus noise, each channel in its own sub-range
    (autocontrast has work to do), every third image with a flat blue channel (the
    unchanged cases of autocontrast and equalize)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    images = []
    for i in range(BATCH):
        wave = np.sin(xx / rng.uniform(3, 9))[..., None] + np.cos(yy / rng.uniform(3, 9))[..., None]
        lo = rng.integers(0, 80, 3)
        hi = rng.integers(150, 256, 3)
        unit = np.clip(0.5 + 0.2 * wave + rng.normal(0, 0.15, (h, w, 3)), 0, 1)
        image = np.round(lo + unit * (hi - lo)).astype(np.uint8)
        if i % 3 == 2:
            image[..., 2] = 77
        images.append(image)
    return np.stack(images)


def fixed_draw(cases: list[dict], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """A draw of BATCH images from ``cases`` (each: ops, magnitudes, applied, negated, and
    optionally hflip and cutout_centre), padded with unapplied identities."""
    h, w = shape
    pad = {"ops": [OP["identity"]] * 2, "magnitudes": [1, 1], "applied": [False, False]}
    cases = cases + [pad] * (BATCH - len(cases))
    rng = np.random.default_rng(len(cases))
    column = lambda key, default, dtype: np.array([c.get(key, default) for c in cases], dtype)
    return {
        "hflip": column("hflip", False, bool),
        "ops": column("ops", None, np.int32),
        "magnitudes": column("magnitudes", None, np.int32),
        "applied": column("applied", None, bool),
        "negated": column("negated", [False, False], bool),
        "cutout_centre": np.array(
            [c.get("cutout_centre", rng.uniform(0, 1, 2) * (w, h)) for c in cases], np.float32
        ),
    }


def run_both(images: np.ndarray, draw: dict, from_normalised: bool = False):
    """Ours and the reference's (images, params) on one draw; ours as numpy."""
    inputs = jnp.asarray(images, jnp.float32)
    if from_normalised:  # the caller's path: network input -> 0..255 -> strong view
        inputs = denormalize_image(normalize_image(jnp.asarray(images)))
    ours, params = apply_strong(inputs, {k: jnp.asarray(v) for k, v in draw.items()})
    refs = [pil_strong(images[i], draw, i) for i in range(len(images))]
    return (
        np.asarray(ours),
        {k: np.asarray(v) for k, v in params.items()},
        np.stack([r[0] for r in refs]),
        [r[1] for r in refs],
    )


def single_op_cases(shape: tuple[int, int]) -> list[dict]:
    """Each pool op at magnitudes 1, 5 and 9, alternately negated (applied in round one,
    not in round two); then flips and cut-outs at the corners and the middle."""
    cases = []
    for op in range(len(POOL)):
        for j, v in enumerate((1, 5, 9)):
            cases.append(
                {
                    "ops": [op, OP["rotate"]],
                    "magnitudes": [v, 3],
                    "applied": [True, False],
                    "negated": [(op + j) % 2 == 1, False],
                }
            )
    identity = {"ops": [OP["identity"]] * 2, "magnitudes": [2, 2], "applied": [True, True]}
    h, w = shape
    for centre in ((0.0, 0.0), (w - 0.1, h - 0.1), (w / 2, h / 2), (2.0, h - 3.0)):
        cases.append({**identity, "hflip": True, "cutout_centre": centre})
    return cases


@functools.cache
def single_op_results(shape: tuple[int, int]):
    cases = single_op_cases(shape)
    draw = fixed_draw(cases, shape)
    return cases, draw, *run_both(sample_images(1, shape), draw)


def assert_params_equal(ours: dict, refs: list[dict]):
    for i, ref in enumerate(refs):
        assert bool(ours["hflip"][i]) == ref["hflip"]
        assert tuple(ours["cutout"][i].tolist()) == ref["cutout"]
        for name in GEOMETRIC:
            assert ours[name][i] == np.float32(ref[name]), (i, name)


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_each_op_matches_pil(shape):
    cases, _, ours, params, refs, ref_params = single_op_results(shape)
    for i, case in enumerate(cases[: 3 * len(POOL)]):
        name = OP_NAMES[case["ops"][0]]
        difference = np.abs(ours[i] - refs[i].astype(np.float32))
        if name in OFF_BY_ONE_FRACTION:
            assert difference.max() <= 1, (name, case)
            assert np.mean(difference > 0) <= OFF_BY_ONE_FRACTION[name], (name, case)
        else:
            assert difference.max() == 0, (name, case, np.mean(difference > 0))
    assert_params_equal(params, ref_params)


@pytest.mark.parametrize("shape", SHAPES)
def test_flip_and_cutout_match_pil(shape):
    cases, draw, ours, params, refs, ref_params = single_op_results(shape)
    first = 3 * len(POOL)
    np.testing.assert_array_equal(ours[first : len(cases)], refs[first : len(cases)])
    boxes = params["cutout"][first : len(cases)]
    h, w = shape
    assert boxes[0].tolist()[:2] == [0, 0] and boxes[1].tolist()[2:] == [w, h]
    assert_params_equal(params, ref_params)


def test_autocontrast_follows_pils_float64_lut():
    """Channels that hold every level of (lo, hi) pairs where PIL's float64 LUT is one below
    the exact stretch: ours is PIL's, and differs from the exact stretch."""
    slips = pixel._autocontrast_slips()
    pairs = np.unique(slips // 256)[::97][:12]
    channels = []
    for pair in pairs:
        lo, hi = divmod(int(pair), 256)
        channels.append(np.resize(np.arange(lo, hi + 1), 24 * 32).reshape(24, 32))
    images = np.stack(channels).reshape(4, 3, 24, 32).transpose(0, 2, 3, 1).astype(np.uint8)
    autocontrast = jax.jit(jax.vmap(pixel.autocontrast))
    ours = np.asarray(autocontrast(jnp.asarray(images, jnp.float32)))
    refs = np.stack([np.asarray(ImageOps.autocontrast(Image.fromarray(i))) for i in images])
    np.testing.assert_array_equal(ours, refs)
    lo = images.min(axis=(1, 2), keepdims=True).astype(int)
    hi = images.max(axis=(1, 2), keepdims=True).astype(int)
    assert np.any((images - lo) * 255 // (hi - lo) != refs)


@pytest.mark.parametrize("shape", SHAPES)
def test_random_chains_match_pil(shape):
    """Draws from draw_strong, fed as the caller feeds them (normalised network input back
    to 0..255): params equal; a chain of exact ops equal; a chain with resampling ops
    differing on no more pixels than its resampling ops' bounds together. A later op can
    widen a one-level difference: posterize in value (these draws hold a shear followed by
    a posterize); autocontrast, equalize and contrast, which read image statistics, in
    extent too (these draws hold none after a resampling op)."""
    key = jax.random.key(7)
    draw = {k: np.asarray(v) for k, v in draw_strong(key, BATCH, *shape, 2, 10).items()}
    images = sample_images(2, shape)
    ours, params, refs, ref_params = run_both(images, draw, from_normalised=True)
    assert_params_equal(params, ref_params)
    for i in range(BATCH):
        applied = [
            OP_NAMES[o] for o, a in zip(draw["ops"][i], draw["applied"][i], strict=True) if a
        ]
        differs = np.mean(ours[i] != refs[i])
        bound = sum(OFF_BY_ONE_FRACTION.get(name, 0.0) for name in applied)
        assert differs <= bound, (applied, differs)
    assert np.all(ours == np.round(ours)) and ours.min() >= 0 and ours.max() <= 255


def test_params_record_the_last_applied_op_and_not_applied():
    h, w = SHAPES[0]
    rotate, shear_x, translate_y = OP["rotate"], OP["shear_x"], OP["translate_y"]
    cases = [
        {"ops": [rotate, rotate], "magnitudes": [3, 5], "applied": [True, True]},
        {"ops": [rotate, rotate], "magnitudes": [3, 5], "applied": [True, False]},
        {"ops": [rotate, rotate], "magnitudes": [3, 5], "applied": [False, False]},
        {
            "ops": [shear_x, translate_y],
            "magnitudes": [4, 7],
            "applied": [True, True],
            "negated": [True, True],
        },
        {"ops": [translate_y, shear_x], "magnitudes": [7, 4], "applied": [False, True]},
    ]
    draw = fixed_draw(cases, (h, w))
    ours, params, _, ref_params = run_both(sample_images(3, (h, w)), draw)
    assert_params_equal(params, ref_params)
    assert set(params) == {"hflip", *GEOMETRIC, "cutout"}
    assert params["hflip"].dtype == bool and params["cutout"].dtype == np.int32
    assert params["cutout"].shape == (BATCH, 4) and ours.dtype == np.float32
    assert all(params[n].dtype == np.float32 and params[n].shape == (BATCH,) for n in GEOMETRIC)
    assert params["rotate"][:3].tolist() == [15.0, 9.0, NOT_APPLIED]  # int(v * 30 / 10)
    assert params["shear_x"][3] == np.float32(-0.12) and params["shear_x"][4] == np.float32(0.12)
    assert params["translate_y"][3] == -int(0.21 * h) and params["translate_y"][4] == NOT_APPLIED
    untouched = [n for n in GEOMETRIC if n not in ("rotate", "shear_x", "translate_y")]
    assert all(np.all(params[n] == NOT_APPLIED) for n in untouched)


def test_draw_distribution_matches_the_reference():
    """The reference's draws: flip, apply and sign with p 0.5, ops uniform over the 14,
    magnitudes uniform over 1..m-1 (numpy's randint(1, m)), the centre uniform over the
    image. Every count lies within 5 binomial standard deviations of its mean."""
    batch, n, (h, w) = 4000, 2, SHAPES[1]
    draw = {k: np.asarray(v) for k, v in draw_strong(jax.random.key(0), batch, h, w, n, 10).items()}

    def within_binomial(count: int, trials: int, p: float) -> bool:
        return abs(count - trials * p) <= 5 * np.sqrt(trials * p * (1 - p))

    assert draw["ops"].shape == draw["magnitudes"].shape == (batch, n)
    for key in ("hflip", "applied", "negated"):
        assert draw[key].dtype == bool and within_binomial(draw[key].sum(), draw[key].size, 0.5)
    counts = np.bincount(draw["ops"].ravel(), minlength=len(POOL))
    assert counts.size == len(POOL) and all(within_binomial(c, batch * n, 1 / 14) for c in counts)
    assert draw["magnitudes"].min() == 1 and draw["magnitudes"].max() == 9
    counts = np.bincount(draw["magnitudes"].ravel())[1:]
    assert all(within_binomial(c, batch * n, 1 / 9) for c in counts)
    centre = draw["cutout_centre"]
    assert np.all(centre >= 0) and np.all(centre <= (w, h))
    assert within_binomial(np.sum(centre[:, 0] < w / 2), batch, 0.5)
    small = np.asarray(randaugment.draw_strong(jax.random.key(1), 64, h, w, 3, 4)["magnitudes"])
    assert small.shape == (64, 3) and set(np.unique(small)) == {1, 2, 3}
    for bad_m in (1, 11):
        with pytest.raises(ValueError):
            randaugment.draw_strong(jax.random.key(0), 1, h, w, 2, bad_m)
