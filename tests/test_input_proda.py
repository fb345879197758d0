"""ProDA's training streams (input_pipeline/proda.py, proda_views.py, pil_resize.py): each
view equals Pillow's resize, crop and flip done by hand with the geometry the batch
reports; a soft label that stores its own coordinates arrives where the closed form of the
reference's three align_corners resizes puts it; a hard label arrives as Pillow's NEAREST
moves it, thresholded in float16; keys, shapes, dtypes; determinism and host slices."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD
from input_pipeline import datasets, pil_resize, proda_views, transforms
from input_pipeline import proda as proda_data
from tests.support import data_config, write_cityscapes, write_gta

CROP, FULL, SOURCE_SIZE, RESIZE = (16, 32), (32, 64), (24, 40), 128
STORED = (5, 9)  # the soft labels' "network resolution"
QUARTER = (CROP[0] // 4, CROP[1] // 4)
NUM_TARGETS, BATCH = 4, 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """GTA-like sources (20 x 36, loader size 24 x 40), Cityscapes-like targets at their
    fixed size, and both label folders: soft labels storing (row, column, image index),
    random hard labels with float16 confidences around the threshold."""
    root = tmp_path_factory.mktemp("data")
    write_gta(str(root), 3, h=20, w=36)
    write_cityscapes(str(root), NUM_TARGETS, splits=("train",), h=FULL[0], w=FULL[1])
    rng = np.random.default_rng(0)
    for i, image in enumerate(proda_data.target_images(config(root))):
        stem = proda_data.label_stem(image)
        soft = np.stack(np.broadcast_arrays(np.arange(STORED[0])[:, None],
                                            np.arange(STORED[1])[None], i), -1)  # fmt: skip
        (root / "soft").mkdir(exist_ok=True)
        np.save(root / "soft" / f"{stem}.npy", soft.astype(np.float16))
        (root / "pseudo").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 19, FULL).astype(np.uint8)).save(
            root / "pseudo" / f"{stem}.png"
        )
        confidence = rng.uniform(0.9, 1.0, FULL).astype(np.float16)
        np.save(root / "pseudo" / f"{stem}_conf.npy", confidence)
    return root


def config(root):
    return data_config(
        root,
        source=("gta",),
        target=("cityscapes",),
        crop_size=CROP,
        proda_resize=RESIZE,
        proda_full_size=FULL,
        proda_source_size=SOURCE_SIZE,
    )


def labels_cfg(root):
    return ml_collections.ConfigDict(dict(soft_labels=str(root / "soft"),
                                          pseudo_labels=str(root / "pseudo")))  # fmt: skip


def batches(root, kind, count=3, seed=0, **slicing):
    ds = proda_data.make_proda_dataset(
        kind, config(root), labels_cfg(root), slicing.pop("per_host_batch", BATCH), seed, **slicing
    )
    return list(ds.take(count).as_numpy_iterator())  # fmt: skip


@pytest.fixture(scope="module")
def stage1(root):
    return batches(root, "proda")


@pytest.fixture(scope="module")
def stage2(root):
    return batches(root, "proda_distill")


def elements(batch_list):
    for batch in batch_list:
        for j in range(len(batch["target_image"])):
            yield {key: value[j] for key, value in batch.items()}


def normalized(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)


def by_hand(image: np.ndarray, resized, origin, flip, resample) -> np.ndarray:
    """Pillow's resize to (h, w) = ``resized``, the crop at ``origin``, the flip."""
    h, w = (int(v) for v in resized)
    out = np.asarray(Image.fromarray(image).resize((w, h), resample))
    out = out[origin[0] : origin[0] + CROP[0], origin[1] : origin[1] + CROP[1]]
    return out[:, ::-1] if flip else out


def target_of(root, element) -> tuple[int, str, np.ndarray]:
    """(index, path, uint8 pixels) of the target file an element was made from: its green
    channel is 10 x the index (tests.support.scene), constant, so it survives any resize."""
    green = element["target_image"][..., 1] * IMAGE_STD[1] + IMAGE_MEAN[1]
    index = int(round(float(green.mean()))) // 10
    path = proda_data.target_images(config(root))[index]
    return index, path, np.asarray(Image.open(path))


def test_pil_resize_is_pillows():
    rng = np.random.default_rng(1)
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(3, 40, 2))
        size = (int(rng.integers(h, 90)), int(rng.integers(2, 90)))  # height grows: every
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # Pillow's pass order
        want = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        got = pil_resize.resize_bilinear(tf.constant(image), tf.constant(size)).numpy()
        np.testing.assert_array_equal(got, want)
        origin = (int(rng.integers(0, size[0] - 1)), int(rng.integers(0, size[1] - 1)))
        crop = (min(3, size[0] - origin[0]), min(4, size[1] - origin[1]))
        part = pil_resize.resize_bilinear(tf.constant(image), tf.constant(size),
                                          tf.constant(origin), crop).numpy()  # fmt: skip
        rows, cols = slice(origin[0], origin[0] + crop[0]), slice(origin[1], origin[1] + crop[1])
        np.testing.assert_array_equal(part, want[rows, cols])
        label = rng.integers(0, 256, (h, w), dtype=np.uint8)
        small = (int(rng.integers(1, 90)), int(rng.integers(1, 90)))
        want = np.asarray(Image.fromarray(label).resize(small[::-1], Image.NEAREST))
        np.testing.assert_array_equal(
            pil_resize.resize_nearest(tf.constant(label), tf.constant(small)).numpy(), want
        )


def test_keys_shapes_and_dtypes(stage1, stage2):
    common = {
        "source_image": ((BATCH, *CROP, 3), np.float32), "source_label": ((BATCH, *CROP), np.int32),
        "target_image": ((BATCH, *CROP, 3), np.float32), "target_resized": ((BATCH, 2), np.int32),
        "target_crop": ((BATCH, 2), np.int32), "target_flip": ((BATCH,), np.bool_),
    }  # fmt: skip
    for batch, own in (
        (stage1[0], {"target_full": ((BATCH, *FULL, 3), np.float32),
                     "target_soft_label": ((BATCH, *QUARTER, 3), np.float32)}),
        (stage2[0], {"target_label": ((BATCH, *QUARTER), np.int32)}),
    ):  # fmt: skip
        want = {**common, **own}
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want


def test_weak_view_full_image_and_soft_label_follow_the_geometry(root, stage1):
    flips = set()
    for element in elements(stage1):
        index, _, image = target_of(root, element)
        h, w = element["target_resized"]
        y1, x1 = element["target_crop"]
        assert int(RESIZE * 0.5) <= w <= int(RESIZE * 1.5) and h == int(w / (FULL[1] / FULL[0]))
        assert 0 <= y1 <= h - CROP[0] and 0 <= x1 <= w - CROP[1]
        flip = bool(element["target_flip"])
        flips.add(flip)
        np.testing.assert_array_equal(element["target_full"], normalized(image))
        want = by_hand(image, (h, w), (y1, x1), flip, Image.BILINEAR)
        np.testing.assert_array_equal(element["target_image"], normalized(want))
        # The stored map holds its own (row, column): bilinear resizes of a linear map are
        # exact, so each quarter pixel holds where the three resizes take it from.
        rows = y1 + np.arange(QUARTER[0]) * (CROP[0] - 1) / (QUARTER[0] - 1)
        cols = np.arange(QUARTER[1]) * (CROP[1] - 1) / (QUARTER[1] - 1)
        cols = x1 + (CROP[1] - 1 - cols if flip else cols)
        soft = element["target_soft_label"]
        np.testing.assert_allclose(soft[..., 0], np.broadcast_to(
            (rows * (STORED[0] - 1) / (h - 1))[:, None], QUARTER), atol=1e-4)  # fmt: skip
        np.testing.assert_allclose(soft[..., 1], np.broadcast_to(
            (cols * (STORED[1] - 1) / (w - 1))[None], QUARTER), atol=1e-4)  # fmt: skip
        np.testing.assert_allclose(soft[..., 2], index, atol=1e-5)  # this image's file
    assert flips == {False, True}


def test_hard_label_moves_like_the_view_and_is_thresholded_in_float16(root, stage2):
    threshold = np.float16(config(root).proda_threshold)
    for element in elements(stage2):
        _, path, image = target_of(root, element)
        stem = root / "pseudo" / proda_data.label_stem(path)
        label = np.asarray(Image.open(f"{stem}.png")).copy()
        confidence = np.load(f"{stem}_conf.npy")
        label[confidence <= threshold] = 255
        geometry = element["target_resized"], element["target_crop"], element["target_flip"]
        want = by_hand(image, *geometry, Image.BILINEAR)
        np.testing.assert_array_equal(element["target_image"], normalized(want))
        want = by_hand(label, *geometry, Image.NEAREST)[::4, ::4]
        np.testing.assert_array_equal(element["target_label"], want)
        assert 0 < (want == 255).mean() < 1


def test_source_view_is_the_references_pipeline(root, stage1):
    files = datasets.list_files(str(root), "gta", "train", True)
    base = tf.constant([0, 0], tf.int64)
    for k, element in enumerate(elements(stage1)):
        index = int(
            proda_data._permuted(
                tf.constant(k, tf.int64),
                len(files.images),
                transforms.fold_seed(base, proda_data.SOURCE_STREAM),
            )
        )
        resized, origin, flip = (x.numpy() for x in proda_views.draw_geometry(
            transforms.fold_seed(base, proda_data.SOURCE_STREAM, k), SOURCE_SIZE, RESIZE, CROP,
            0.5))  # fmt: skip
        image = Image.open(files.images[index]).resize(SOURCE_SIZE[::-1], Image.BILINEAR)
        label = Image.open(files.labels[index]).resize(SOURCE_SIZE[::-1], Image.NEAREST)
        want = by_hand(np.asarray(image), resized, origin, flip, Image.BILINEAR)
        np.testing.assert_array_equal(element["source_image"], normalized(want))
        want = by_hand(np.asarray(label), resized, origin, flip, Image.NEAREST)
        np.testing.assert_array_equal(element["source_label"], want)


def test_deterministic_from_the_seed_and_sliced_by_host(root, stage1):
    again = batches(root, "proda", count=2)
    for first, second in zip(stage1, again, strict=False):
        for key in first:
            np.testing.assert_array_equal(first[key], second[key])
    other = batches(root, "proda", count=1, seed=1)[0]
    assert not np.array_equal(other["target_image"], stage1[0]["target_image"])
    halves = [batches(root, "proda", count=2, per_host_batch=2, process_index=p,
                      process_count=2) for p in (0, 1)]  # fmt: skip
    later = batches(root, "proda", count=1, start_batch=1)[0]
    for key in stage1[0]:
        for s in (0, 1):
            joined = np.concatenate([halves[0][s][key], halves[1][s][key]])
            np.testing.assert_array_equal(joined, stage1[s][key])
        np.testing.assert_array_equal(later[key], stage1[1][key])


def test_missing_labels_and_a_crop_too_large_are_one_line(root, tmp_path):
    empty = ml_collections.ConfigDict(dict(soft_labels=str(tmp_path), pseudo_labels=""))
    with pytest.raises(
        datasets.DatasetError,
        match=r"config.proda.soft_labels=.*: 4 label "
        r"file\(s\) of the 4 target images missing.*'proda_soft_labels'",
    ):
        proda_data.make_proda_dataset("proda", config(root), empty, 2, 0)
    with pytest.raises(datasets.DatasetError, match="config.proda.pseudo_labels is not set"):
        proda_data.make_proda_dataset("proda_distill", config(root), empty, 2, 0)
    small = config(root)
    small.proda_resize = 40
    with pytest.raises(
        proda_views.GeometryError,
        match=r"config.data.proda_resize=40 with "
        r"config.data.proda_source_size=\(24, 40\): the smallest resized image "
        r"\(12 x 20\) is smaller than config.data.crop_size=\(16, 32\)",
    ):
        proda_data.make_proda_dataset("proda", small, labels_cfg(root), 2, 0)
