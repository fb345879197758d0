"""SYNTHIA depth: the converter's reading (DADA's cv2 IMREAD_ANYDEPTH), the toy's depth
maps, and 'source_depth' in the training batches (DADA's inverse depth, aligned with the
label through resize, crop, flip and pad)."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import toy, toy_depth, train, transforms
from tests.support import data_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def converter():
    folder = os.path.join(ROOT, "tools", "convert_datasets")
    if folder not in sys.path:  # the script's own folder, as when it runs (its sibling modules)
        sys.path.append(folder)
    path = os.path.join(folder, "synthia.py")
    spec = importlib.util.spec_from_file_location("synthia_converter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "3", "--num-val", "1",
              "--extra-sources", "synthia"])  # fmt: skip
    return root


def test_converter_reads_depth_as_cv2_anydepth(tmp_path):
    conv = converter()
    rgb = np.array([[[1000, 1000, 1000], [100, 2000, 30000]]], np.uint16)
    tf.io.write_file(str(tmp_path / "c.png"), tf.io.encode_png(rgb))
    tf.io.write_file(str(tmp_path / "g.png"), tf.io.encode_png(rgb[..., :1]))
    # cv2's fixed-point BT.601 gray: equal channels give their value.
    r, g, b = 100, 2000, 30000
    expected = (r * 4899 + g * 9617 + b * 1868 + 8192) >> 14
    np.testing.assert_array_equal(
        conv.read_synthia_depth(str(tmp_path / "c.png")), [[1000, expected]]
    )
    np.testing.assert_array_equal(conv.read_synthia_depth(str(tmp_path / "g.png")), [[1000, 100]])


def test_toy_depth_is_ground_by_row_and_constant_per_object():
    label = np.full((20, 10), toy_depth.SKY, np.uint8)
    label[8:] = toy_depth.ROAD
    label[12:16, 2:6] = 13  # a car whose foot is row 15
    depth = toy_depth.toy_depth(label)
    assert (depth[label == toy_depth.SKY] == toy_depth.FAR).all()
    road = depth[8:, 8]
    assert (np.diff(road.astype(int)) <= 0).all() and road[0] > road[-1]
    assert (depth[12:16, 2:6] == depth[15, 8]).all()  # the ground depth at its foot


def test_toy_synthia_depth_round_trips_through_the_converter(toy_root):
    directory = toy_root / "toy" / "synthia"
    raw = converter().read_synthia_depth(str(directory / "Depth" / "0000001.png"))
    converted = tf.io.decode_png(
        tf.io.read_file(str(directory / "Depth" / f"0000001{transforms.DEPTH_SUFFIX}")),
        dtype=tf.uint16,
    ).numpy()
    assert converted.shape[-1] == 1 and converted.dtype == np.uint16
    np.testing.assert_array_equal(converted[..., 0], raw)
    path = tf.constant(str(directory / "RGB" / "0000001.png"))
    assert transforms.depth_path(path).numpy().decode().endswith("Depth/0000001_depth16.png")


def test_depth_follows_the_labels_crop_flip_and_pad():
    rng = np.random.default_rng(0)
    label = tf.constant(rng.integers(0, 19, (12, 20)), tf.uint8)
    image = tf.constant(rng.integers(0, 255, (12, 20, 3)), tf.uint8)
    depth = tf.cast(label, tf.uint16)  # depth = label: where each pixel went is visible
    for i in range(6):
        seed = tf.constant([i, 7], tf.int64)
        want_image, want_label = transforms.crop_flip_pad(image, label, (16, 16), 1.0, seed)
        got_image, got_label, got_depth = transforms.crop_flip_pad_depth(
            image, label, depth, (16, 16), 1.0, seed
        )
        np.testing.assert_array_equal(got_image, want_image)
        np.testing.assert_array_equal(got_label, want_label)
        inside = want_label.numpy() != 255
        np.testing.assert_allclose(
            got_depth.numpy()[inside], 65536.0 / (want_label.numpy()[inside] + 1.0), rtol=1e-7
        )
        assert (got_depth.numpy()[~inside] == transforms.DEPTH_PAD).all()


def test_batches_hold_source_depth_aligned_with_the_labels(toy_root):
    def batches(**extra):
        cfg = data_config(toy_root, source=("toy_synthia",), target=("toy_target",),
                          crop_size=(64, 96), **extra)  # fmt: skip
        it = train.make_train_dataset(cfg, 3, seed=1).as_numpy_iterator()
        return [next(it) for _ in range(2)]

    plain, with_depth = batches(), batches(source_depth=True)
    for a, b in zip(plain, with_depth, strict=True):
        assert "source_depth" not in a and set(b) == set(a) | {"source_depth"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        depth, label = b["source_depth"], b["source_label"]
        assert depth.dtype == np.float32 and depth.shape == label.shape
        np.testing.assert_array_equal(depth[label == toy_depth.SKY], 1.0)  # 65536 / 65536
        road = depth[label == toy_depth.ROAD]  # nearer than the background, up to the horizon
        assert (road >= np.float32(65536.0 / (toy_depth.BACKGROUND + 1))).all() and road.max() > 10
