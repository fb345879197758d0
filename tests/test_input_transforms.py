"""Pipeline ops: mmcv rounding, cat_max_ratio rule, flip, normalise, pad, file errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD
from input_pipeline import transforms
from tests.support import save_gray, save_rgb

SEED = tf.constant([7, 0], tf.int64)


@pytest.mark.parametrize(
    "hw,scale,min_size,expected",
    [
        ((1052, 1914), (1280, 720), 0, (704, 1280)),  # GTA: long edge binds
        ((1024, 2048), (1024, 512), 0, (512, 1024)),  # Cityscapes
        ((760, 1280), (1280, 760), 0, (760, 1280)),  # SYNTHIA unchanged
        ((3000, 4000), (1024, 512), 512, (512, 683)),  # Mapillary: short edge 512
        ((4000, 3000), (1024, 512), 512, (683, 512)),  # portrait
        ((128, 256), (0, 0), 0, (128, 256)),  # no scale: keep size
    ],
)
def test_rescale_size_matches_mmcv(hw, scale, min_size, expected):
    size = transforms.rescale_size(tf.constant(hw[0]), tf.constant(hw[1]), scale, min_size)
    assert tuple(size.numpy()) == expected


def test_resize_label_is_cv2_nearest():
    label = tf.constant(np.arange(16, dtype=np.uint8).reshape(4, 4))
    down = transforms.resize_label(label, tf.constant([2, 2])).numpy()
    np.testing.assert_array_equal(down, [[0, 2], [8, 10]])
    up = transforms.resize_label(tf.constant([[1, 2]], tf.uint8), tf.constant([1, 5])).numpy()
    np.testing.assert_array_equal(up, [[1, 1, 1, 2, 2]])  # floor(x * 2/5)


def test_resize_image_bilinear_half_pixel_rounded():
    image = tf.constant([[[0, 0, 0], [100, 100, 100]]], tf.uint8)  # 1x2
    out = transforms.resize_image(image, tf.constant([1, 4])).numpy()[0, :, 0]
    np.testing.assert_array_equal(out, [0, 25, 75, 100])


@pytest.mark.parametrize(
    "counts,balanced",
    [
        ({0: 70, 1: 30}, True),
        ({0: 80, 1: 20}, False),
        ({0: 75, 1: 25}, False),  # strictly below the ratio
        ({0: 100}, False),  # one class only
        ({255: 60, 0: 30, 1: 10}, False),  # ignore excluded: 30/40 = 0.75
        ({255: 60, 0: 25, 1: 15}, True),  # 25/40
        ({255: 100}, False),
    ],
)
def test_crop_balance_rule(counts, balanced):
    label = np.concatenate([np.full(n, c, np.uint8) for c, n in counts.items()])
    assert bool(transforms.crop_is_balanced(tf.constant(label), 0.75)) is balanced


def test_random_crop_follows_mmseg_retry_loop():
    """The chosen offset is the first balanced proposal among 10 checks, else the 11th."""
    label = np.zeros((40, 40), np.uint8)
    label[30:, 30:] = 5  # balanced crops only near the bottom-right corner
    crop_size = (12, 12)
    shape = tf.constant([40, 40])
    outcomes = set()
    for s in range(40):
        seed = tf.constant([s, 3], tf.int64)
        proposals = [
            transforms.crop_offset(shape, crop_size, transforms.fold_seed(seed, i)).numpy()
            for i in range(11)
        ]
        balanced = [
            bool(transforms.crop_is_balanced(transforms.crop(label, p, crop_size), 0.75))
            for p in proposals
        ]
        first = next((i for i in range(10) if balanced[i]), 10)
        got = transforms.random_crop_offset(tf.constant(label), crop_size, 0.75, seed).numpy()
        np.testing.assert_array_equal(got, proposals[first])
        assert (proposals[first] <= 28).all()
        outcomes.add(first if first < 10 else "unchecked")
    assert 0 in outcomes and len(outcomes) > 2  # both immediate and retried crops occur


def test_crop_offsets_cover_the_margin_uniformly():
    offsets = np.array(
        [
            transforms.crop_offset(tf.constant([10, 6]), (8, 8), tf.constant([s, 1], tf.int64))
            for s in range(300)
        ]
    )
    assert set(offsets[:, 0]) == {0, 1, 2} and set(offsets[:, 1]) == {0}


def test_flip_moves_image_and_label_together_and_pad_values():
    h, w = 6, 10
    label = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    label[0, 0] = 255
    image = np.stack([label.astype(np.float32)] * 3, -1).astype(np.uint8)
    flips = 0
    for s in range(20):
        img, lab = transforms.crop_flip_pad(
            tf.constant(image), tf.constant(label), (8, 8), 1.0, tf.constant([s, 0], tf.int64)
        )
        img, lab = img.numpy(), lab.numpy()
        assert img.shape == (8, 8, 3) and lab.dtype == np.int32
        # Crop (6, 8) of (6, 10), padded to (8, 8); the image still encodes its label.
        raw = img[:h, :, 0] * IMAGE_STD[0] + IMAGE_MEAN[0]
        np.testing.assert_allclose(raw, lab[:h].astype(np.float32), atol=1e-3)
        assert set(np.unique(lab[:h])) <= set(range(w)) | {255}
        np.testing.assert_array_equal(img[h:], 0.0)  # padding rows, normalised space
        np.testing.assert_array_equal(lab[h:], 255)
        flips += int(lab[1, 0] > lab[1, 7])
    assert 4 <= flips <= 16


def test_normalize_uses_ddb_constants():
    image = tf.constant([[IMAGE_MEAN, [255, 0, 0]]], tf.float32)
    out = transforms.normalize(tf.cast(tf.round(image), tf.uint8)).numpy()
    np.testing.assert_allclose(
        out[0, 0], (np.round(IMAGE_MEAN) - IMAGE_MEAN) / IMAGE_STD, atol=1e-6
    )
    np.testing.assert_allclose(out[0, 1, 0], (255 - IMAGE_MEAN[0]) / IMAGE_STD[0], 1e-6)


def test_same_seed_same_crop_different_seed_differs():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a = [transforms.crop_flip_pad(image, None, (8, 8), 1.0, SEED)[0].numpy() for _ in range(2)]
    b = transforms.crop_flip_pad(image, None, (8, 8), 1.0, tf.constant([8, 0], tf.int64))[0]
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b.numpy())


# --- bad files -------------------------------------------------------------------------


def _truncate(path, keep=0.6):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_error_names_file(tmp_path, suffix):
    path = str(tmp_path / f"broken{suffix}")
    save_rgb(path, np.random.default_rng(0).integers(0, 255, (32, 32, 3)))
    transforms.read_image(tf.constant(path), suffix == ".jpg")  # intact: fine
    _truncate(path)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"(?s)truncated.*broken{suffix}"):
        transforms.read_image(tf.constant(path), suffix == ".jpg")


def test_truncated_label_error_names_file(tmp_path):
    path = str(tmp_path / "lab_labelTrainIds.png")
    save_gray(path, np.random.default_rng(0).integers(0, 19, (32, 32)))
    _truncate(path)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="(?s)truncated.*lab_labelTrainIds.png"
    ):
        transforms.read_label(tf.constant(path))


def test_unknown_label_ids_error_names_file(tmp_path):
    path = str(tmp_path / "ids.png")
    save_gray(path, np.array([[0, 18, 255], [3, 26, 1]]))  # 26: a raw id, not a train id
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)outside 0..18 and 255.*ids.png"):
        transforms.read_label(tf.constant(path))


def test_colour_label_error_names_file(tmp_path):
    path = str(tmp_path / "colour.png")
    save_rgb(path, np.zeros((4, 4, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)1-channel.*colour.png"):
        transforms.read_label(tf.constant(path))


def test_size_mismatch_error_names_both_files():
    image, label = tf.zeros((4, 6, 3), tf.uint8), tf.zeros((4, 5), tf.uint8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)sizes differ.*img.png.*lab.png"):
        transforms.assert_same_size(image, label, tf.constant("img.png"), tf.constant("lab.png"))
