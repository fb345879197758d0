"""PhotoMetricDistortion: OpenCV's 8-bit HSV conversions on every input, bit-exact parity
with the mmseg transcription (torch_ref/photometric.py) under shared draws, the laws of
the draws, determinism per (seed, k), and the training stream with the key on and off.

Images are 64 pixels wide (or a multiple): OpenCV's HSV->BGR truncates in its vector
loop but rounds in the scalar tail of a row (``width mod`` its SIMD block, at most 64
pixels on x86); the reference's 512-wide crops have no tail (test_opencv_rounds_only_...).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import tensorflow as tf

cv2 = pytest.importorskip("cv2")

from configs.default import get_config  # noqa: E402
from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD  # noqa: E402
from input_pipeline import photometric, train, transforms  # noqa: E402
from tests.support import save_gray, save_rgb, write_cityscapes  # noqa: E402
from torch_ref import photometric as reference  # noqa: E402

SIGMAS = 5.0  # statistical bounds: 5 standard deviations of the estimator
WIDTH = 64  # a whole SIMD block of OpenCV's HSV->BGR on SSE, AVX2 and AVX-512


def _rows(colours: np.ndarray) -> np.ndarray:
    """uint8 colours (N, 3) as an image of WIDTH-pixel rows, padded with black."""
    pad = -len(colours) % WIDTH
    colours = np.concatenate([colours, np.zeros((pad, 3), colours.dtype)])
    return colours.reshape(-1, WIDTH, 3).astype(np.uint8)


def _edge_colours(rng: np.random.Generator) -> np.ndarray:
    """Greys, saturated and near-saturated colours, ties of the max and min channel."""
    levels = [0, 1, 2, 127, 128, 253, 254, 255]
    grid = np.array(list(itertools.product(levels, repeat=3)))
    greys = np.repeat(np.arange(256)[:, None], 3, axis=1)
    v = rng.integers(1, 256, 300)
    x = rng.integers(0, 256, 300) % v
    ties = np.concatenate(
        [np.stack(p, -1) for p in [(v, v, x), (v, x, v), (x, v, v), (x, x, v), (v, x, x)]]
    )
    noise = rng.integers(0, 256, (1000, 3))
    return np.concatenate([grid, greys, ties, noise])


@tf.function
def _rgb_to_hsv(image):
    return photometric.rgb_to_hsv(image)


@tf.function
def _hsv_to_rgb(hsv):
    return photometric.hsv_to_rgb(hsv)


@tf.function
def _distort(image, draws):
    return photometric.distort(image, draws)


def test_rgb_to_hsv_is_opencv_on_every_colour():
    r, g, b = np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing="ij")
    rgb = np.stack([r, g, b], -1).reshape(4096, 4096, 3)
    expected = cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2HSV)
    np.testing.assert_array_equal(_rgb_to_hsv(rgb).numpy(), expected)


def test_hsv_to_rgb_is_opencv_on_every_8_bit_hsv():
    """Every uint8 triple: H in 0..179 (OpenCV's 8-bit hue range) and past it, all S, V."""
    h, s, v = np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing="ij")
    hsv = np.stack([h, s, v], -1).reshape(4096, 4096, 3)
    expected = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1]
    np.testing.assert_array_equal(_hsv_to_rgb(hsv).numpy(), expected)


def test_opencv_rounds_only_in_the_scalar_tail_of_a_row():
    """The one difference left: OpenCV's last ``width mod block`` pixels of a row round
    to nearest (by at most one level); every whole 64-pixel block matches exactly."""
    rng = np.random.default_rng(0)
    hsv = np.stack(
        [rng.integers(0, 180, (500, 100)), *rng.integers(0, 256, (2, 500, 100))], -1
    ).astype(np.uint8)
    ours = _hsv_to_rgb(hsv).numpy().astype(int)
    opencv = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1].astype(int)
    np.testing.assert_array_equal(ours[:, :64], opencv[:, :64])
    assert np.abs(ours - opencv).max() == 1  # the tail rounds up where we truncate


def _reference_draws(draws: dict) -> reference.Draws:
    return reference.Draws(**{k: np.asarray(v).item() for k, v in draws.items()})


def _tf_draws(d: reference.Draws) -> dict[str, tf.Tensor]:
    dtypes = {"beta": tf.float32, "contrast_alpha": tf.float32, "saturation_alpha": tf.float32}
    dtypes["hue_delta"] = tf.int32
    return {k: tf.constant(getattr(d, k), dtypes.get(k, tf.bool)) for k in photometric.DRAW_NAMES}


def _run_reference(image_rgb: np.ndarray, draws: reference.Draws) -> np.ndarray:
    bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    return reference.photometric_distortion(bgr, draws)[..., ::-1]


# (beta, contrast alpha, saturation alpha, hue delta): the ends of each range and inside.
VALUES = [
    (-32.0, 0.5, 0.5, -18),
    (float(np.nextafter(np.float32(32), 0)), 1.4999999, 1.4999999, 17),
    (0.37, 1.13, 0.71, 5),
    (-7.3, 0.83, 1.27, -1),
]


@pytest.mark.parametrize("values", VALUES)
def test_every_op_combination_matches_the_mmseg_transcription(values):
    """All 32 settings of the five coins, bit for bit on uint8."""
    image = _rows(_edge_colours(np.random.default_rng(1)))
    beta, contrast_alpha, saturation_alpha, hue_delta = values
    for coins in itertools.product([False, True], repeat=5):
        draws = reference.Draws(
            brightness=coins[0],
            beta=float(np.float32(beta)),
            contrast_first=coins[1],
            contrast=coins[2],
            contrast_alpha=float(np.float32(contrast_alpha)),
            saturation=coins[3],
            saturation_alpha=float(np.float32(saturation_alpha)),
            hue=coins[4],
            hue_delta=hue_delta,
        )
        ours = _distort(image, _tf_draws(draws)).numpy()
        np.testing.assert_array_equal(ours, _run_reference(image, draws), err_msg=str(draws))


def test_sampled_draws_match_the_transcription_on_random_images():
    rng = np.random.default_rng(2)
    for k in range(40):
        image = rng.integers(0, 256, (8, 2 * WIDTH, 3), np.uint8)
        draws = photometric.sample_draws(tf.constant([7, k], tf.int64))
        ours = _distort(image, draws).numpy()
        np.testing.assert_array_equal(ours, _run_reference(image, _reference_draws(draws)))


# --- the draws --------------------------------------------------------------------------

N_DRAWS = 20_000


@pytest.fixture(scope="module")
def draws():
    """Draws of N_DRAWS stream elements, element k seeded as crop_flip_pad seeds it."""
    base = tf.constant([11, 0], tf.int64)

    def element(k):
        seed = transforms.fold_seed(base, k)
        return photometric.sample_draws(transforms.fold_seed(seed, transforms.PHOTOMETRIC_OP))

    ds = tf.data.Dataset.range(N_DRAWS).map(element).batch(N_DRAWS)
    return {k: np.asarray(v) for k, v in next(iter(ds)).items()}


COINS = ("brightness", "contrast_first", "contrast", "saturation", "hue")


def test_coins_are_fair_and_independent(draws):
    half = SIGMAS * np.sqrt(0.25 / N_DRAWS)
    for name in COINS:
        assert abs(draws[name].mean() - 0.5) < half, name
    quarter = SIGMAS * np.sqrt(0.25 * 0.75 / N_DRAWS)
    for a, b in itertools.combinations(COINS, 2):
        both = np.mean(draws[a] & draws[b])
        assert abs(both - 0.25) < quarter, (a, b, both)


def _ks_uniform(x: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance of a sample to U(low, high)."""
    u = np.sort((x - low) / (high - low))
    n = len(u)
    return max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))


# KS critical value at p = 1e-6: sqrt(-ln(p / 2) / 2) / sqrt(n).
KS_BOUND = np.sqrt(-np.log(1e-6 / 2) / 2) / np.sqrt(N_DRAWS)


@pytest.mark.parametrize(
    "name, low, high",
    [("beta", -32.0, 32.0), ("contrast_alpha", 0.5, 1.5), ("saturation_alpha", 0.5, 1.5)],
)
def test_values_are_uniform_on_the_mmseg_ranges(draws, name, low, high):
    x = draws[name].astype(np.float64)
    assert low <= x.min() and x.max() < high
    width = high - low
    assert x.min() < low + 0.01 * width and x.max() > high - 0.01 * width
    assert abs(x.mean() - (low + high) / 2) < SIGMAS * width / np.sqrt(12 * N_DRAWS)
    assert _ks_uniform(x, low, high) < KS_BOUND


def test_hue_delta_is_numpy_randint_minus_18_to_18(draws):
    """numpy's randint(-18, 18) excludes 18: 36 equally likely integers -18..17."""
    delta = draws["hue_delta"]
    values, counts = np.unique(delta, return_counts=True)
    np.testing.assert_array_equal(values, np.arange(-18, 18))
    p = 1 / 36
    assert np.all(np.abs(counts - N_DRAWS * p) < SIGMAS * np.sqrt(N_DRAWS * p * (1 - p)))


def test_draws_are_a_pure_function_of_the_seed():
    seed = tf.constant([3, 9], tf.int64)
    a, b = photometric.sample_draws(seed), photometric.sample_draws(seed)
    c = photometric.sample_draws(tf.constant([3, 10], tf.int64))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


# --- the training stream ----------------------------------------------------------------

FILES, HEIGHT, FILE_WIDTH = 4, 16, 96


@pytest.fixture(scope="module")
def noise_root(tmp_path_factory):
    """GTA-layout noise images (every crop is unique) with a two-class label."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(5)
    label = np.zeros((HEIGHT, FILE_WIDTH), np.uint8)
    label[:, FILE_WIDTH // 2 :] = 1
    for i in range(FILES):
        save_rgb(f"{root}/gta/images/{i:05d}.png", rng.integers(0, 256, (HEIGHT, FILE_WIDTH, 3)))
        save_gray(f"{root}/gta/labels/{i:05d}_labelTrainIds.png", label)
    write_cityscapes(str(root), n=2)
    return root


def _cfg(root, distort: bool | None):
    cfg = get_config().data
    cfg.root = str(root)
    cfg.crop_size = (HEIGHT, WIDTH)
    cfg.num_parallel_calls = 2
    cfg.resize_scales = {"gta": None, "cityscapes": None}
    cfg.image_transfer = "float32"  # the tests invert Normalize, the key-off crops too
    if distort is None:
        del cfg["photometric_distortion"]
    else:
        cfg.photometric_distortion = distort
    return cfg


def _elements(cfg, n_batches: int, batch: int = 4, **kw) -> dict[str, np.ndarray]:
    ds = train.make_train_dataset(cfg, batch, seed=21, **kw).take(n_batches)
    batches = list(ds.as_numpy_iterator())
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _to_uint8(normalized: np.ndarray) -> np.ndarray:
    """Inverts Normalize (float32 error << 0.5 level)."""
    return np.round(normalized * np.array(IMAGE_STD) + np.array(IMAGE_MEAN)).astype(np.uint8)


def _is_a_crop_of_a_file(image: np.ndarray, root) -> bool:
    from PIL import Image

    for i in range(FILES):
        source = np.asarray(Image.open(os.path.join(root, f"gta/images/{i:05d}.png")))
        for x in range(FILE_WIDTH - WIDTH + 1):
            window = source[:, x : x + WIDTH]
            if np.array_equal(window, image) or np.array_equal(window[:, ::-1], image):
                return True
    return False


def test_key_off_leaves_the_source_crops_untouched(noise_root):
    off = _elements(_cfg(noise_root, False), 4)
    absent = _elements(_cfg(noise_root, None), 4)
    for k in off:
        np.testing.assert_array_equal(off[k], absent[k])
    for image in _to_uint8(off["source_image"]):
        assert _is_a_crop_of_a_file(image, noise_root)


def test_key_on_is_the_transcription_of_each_elements_draws(noise_root):
    """Element k: the key-off crop distorted by mmseg's transcription with the draws of
    (seed, k); labels and target images do not change."""
    n_batches = 8
    off = _elements(_cfg(noise_root, False), n_batches)
    on = _elements(_cfg(noise_root, True), n_batches)
    np.testing.assert_array_equal(on["source_label"], off["source_label"])
    np.testing.assert_array_equal(on["target_image"], off["target_image"])
    base = tf.constant([21, 0], tf.int64)
    changed = 0
    pairs = zip(on["source_image"], off["source_image"], strict=True)
    for k, (image_on, image_off) in enumerate(pairs):
        seed = transforms.fold_seed(base, train.SOURCE_STREAM, k)
        draws = photometric.sample_draws(transforms.fold_seed(seed, transforms.PHOTOMETRIC_OP))
        expected = _run_reference(_to_uint8(image_off), _reference_draws(draws))
        np.testing.assert_array_equal(_to_uint8(image_on), expected, err_msg=f"element {k}")
        changed += not np.array_equal(image_on, image_off)
    assert changed > 0


def test_element_k_depends_on_seed_and_k_only(noise_root):
    """Two hosts' slices concatenated are the one-process batch; resuming at a batch
    reproduces it; another seed changes the images."""
    cfg = _cfg(noise_root, True)
    single = _elements(cfg, 2)
    hosts = [_elements(cfg, 2, batch=2, process_index=p, process_count=2) for p in range(2)]
    for k in single:
        merged = np.concatenate(
            [np.concatenate([h[k][2 * s : 2 * s + 2] for h in hosts]) for s in range(2)]
        )
        np.testing.assert_array_equal(merged, single[k])
    resumed = _elements(cfg, 1, start_batch=1)
    np.testing.assert_array_equal(resumed["source_image"], single["source_image"][4:])
    other = train.make_train_dataset(cfg, 4, seed=22).take(1)
    assert not np.array_equal(next(iter(other))["source_image"], single["source_image"][:4])
