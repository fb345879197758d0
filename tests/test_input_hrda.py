"""HRDA's inputs: the pseudo-label margins of the target images ('target_valid'), rare class
sampling with a crop ratio above 1, and the high-resolution toy domains (toy_hr.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import datasets, rcs, toy, toy_hr, train
from tests.support import data_config, save_gray, save_rgb, write_cityscapes

MARGINS = (10, 20, 30, 40)  # top, bottom, left, right
H, W = toy.HEIGHT, toy.WIDTH


def _first(cfg, batch=8, seed=0):
    return next(train.make_train_dataset(cfg, batch, seed=seed).as_numpy_iterator())


@pytest.fixture(scope="module")
def ramp_root(tmp_path_factory, toy_root):
    """The toy source, and as target images of the toy's size whose red channel is the
    column and green the row: every pixel of a crop names where it was in the image."""
    root = tmp_path_factory.mktemp("ramp")
    os.makedirs(root / "toy")
    os.symlink(toy_root / "toy" / "gta", root / "toy" / "gta")
    ys, xs = np.mgrid[0:H, 0:W]
    ramp = np.stack([xs, ys, np.zeros_like(xs)], -1)
    for i in range(3):
        stem = f"toycity_{i:06d}_000019_leftImg8bit.png"
        save_rgb(str(root / "toy/cityscapes/leftImg8bit/train/toycity" / stem), ramp)
    return root


def _config(root, **overrides):
    return data_config(root, source=("toy_source",), target=("toy_target",), **overrides)


@pytest.mark.parametrize(
    "crop, scale",
    [((160, 96), None), ((48, 48), (128, 64))],  # taller than the image: padded; half size
)
def test_target_valid_is_zero_exactly_in_the_margins_of_the_image_as_read(ramp_root, crop, scale):
    cfg = _config(ramp_root, crop_size=crop, target_pseudo_margins=MARGINS)
    cfg.resize_scales = {"toy_target": scale}
    batch = _first(cfg, batch=16)
    valid, image = batch["target_valid"], batch["target_image"]
    assert valid.shape == (16, *crop) and valid.dtype == np.float32
    assert image.dtype == np.uint8  # the pixels as read (normalised on the device)
    x, y = image[..., 0].astype(int), image[..., 1].astype(int)  # where each pixel was
    top, bottom, left, right = MARGINS
    inside = (y >= top) & (y < H - bottom) & (x >= left) & (x < W - right)
    expected = inside.astype(np.float32)
    rows = H if scale is None else scale[1]  # rows of the (resized) image; below: padding
    expected[:, rows:] = 255.0
    np.testing.assert_array_equal(valid, expected)
    assert {0.0, 1.0} <= set(np.unique(valid))
    assert (255.0 in valid) == (crop[0] > rows)
    flipped = x[:, 0, 0] > x[:, 0, -1]
    assert flipped.any() and not flipped.all()  # both orientations were checked
    hits_side = ((x < left) | (x >= W - right))[:, :rows].any((1, 2))
    assert hits_side.any() and not hits_side.all()  # crops at the sides and inside


def test_margins_change_no_image_and_add_one_key(toy_root):
    cfg = _config(toy_root, crop_size=(64, 64))
    plain = _first(cfg, batch=4)
    sizes = {"source_image_size", "target_image_size"}  # the uint8 images' unpadded sizes
    assert set(plain) == {"source_image", "source_label", "target_image", *sizes}
    cfg.target_pseudo_margins = MARGINS
    with_mask = _first(cfg, batch=4)
    assert set(with_mask) == {*plain, "target_valid"}
    for key, value in plain.items():
        np.testing.assert_array_equal(with_mask[key], value)
    cfg.per_target_streams = True
    with pytest.raises(train.StreamConfigError, match="target_pseudo_margins"):
        train.make_train_dataset(cfg, 4, seed=0)


def test_aot_batch_shapes_hold_the_mask_when_margins_are_set():
    from configs.default import get_config
    from ddb_jax.runtime import aot

    config = get_config()
    config.data.target_crop_size = (32, 64)
    assert "target_valid" not in aot.batch_shapes(config)
    config.data.target_pseudo_margins = (30, 240, 30, 30)
    shape = aot.batch_shapes(config)["target_valid"]
    assert shape.shape == (config.batch_size, 32, 64) and shape.dtype == np.float32


def test_rcs_crop_ratio_above_one_asks_for_more_pixels_than_min_pixels(tmp_path):
    """HRDA's min_crop_ratio 2: a crop must hold more than 2 x min_pixels of the class."""
    d = os.path.join(tmp_path, "gta")
    label = np.zeros((32, 32), np.uint8)
    label[:, 16:] = 2
    label[:8, :8] = 6  # 64 px in a corner: a 24x24 crop holds > 40 with p = 8/81
    save_rgb(f"{d}/images/00000.png", np.zeros((32, 32, 3)))
    save_gray(f"{d}/labels/00000_labelTrainIds.png", label)
    rcs.write_class_stats(d, [("labels/00000_labelTrainIds.png", {0: 448, 2: 512, 6: 64})])
    write_cityscapes(str(tmp_path), n=1)
    cfg = data_config(tmp_path, crop_size=(24, 24), rare_class_sampling=True,
                      rcs_temperature=0.01, rcs_min_pixels=20, cat_max_ratio=1.0)  # fmt: skip
    counts = {}
    for ratio in (2.0, 0.0):
        cfg.rcs_min_crop_ratio = ratio
        batch = _first(cfg, batch=32)
        counts[ratio] = int(np.sum((batch["source_label"] == 6).sum((1, 2)) > 40))
    # Expected 32 * (1 - (73/81)^11) = 21.8 with the re-crops vs 32 * 8/81 = 3.2 without.
    assert counts[2.0] >= 15 and counts[0.0] <= 9, counts


# --- the high-resolution toy domains ------------------------------------------------------


def _hr_labels(root):
    files = [
        datasets.list_files(str(root), "toy_hr_source"),
        datasets.list_files(str(root), "toy_hr_target", "train"),
        datasets.list_files(str(root), "toy_hr_target", "val"),
    ]
    return files, [np.asarray(Image.open(p)) for f in files for p in f.labels]


def test_hr_domains_are_listed_at_twice_the_toy_size(toy_root):
    files, labels = _hr_labels(toy_root)
    assert [len(f) for f in files] == [8, 8, 4]
    assert all(lab.shape == (2 * H, 2 * W) for lab in labels)
    for f in files:
        assert np.asarray(Image.open(f.images[0])).shape == (2 * H, 2 * W, 3)
    # Rare class sampling's statistics of the training labels, as for the other toys.
    assert [len(rcs.load_class_stats([f.directory])) for f in files[:2]] == [8, 8]


def _runs(mask: np.ndarray) -> list[int]:
    """Lengths of the horizontal runs of True."""
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    return list(np.nonzero(edges == -1)[1] - np.nonzero(edges == 1)[1])


def test_hr_poles_and_fence_posts_are_a_few_pixels_wide(toy_root):
    _, labels = _hr_labels(toy_root)
    widths = [_runs(lab == toy.POLE) for lab in labels]
    assert all(w and max(w) <= toy_hr.MAX_POLE_WIDTH for w in widths)
    # Mostly the bare poles: 5-6 px, most of a stride-8 cell at full resolution, under half
    # of one at half resolution (toy.draw_scene's own poles are 1-3 px).
    runs = np.concatenate(widths)
    assert runs[runs >= toy_hr.POLE_WIDTHS[0]].sum() >= 0.6 * runs.sum()
    fences = [_runs(lab == toy.FENCE) for lab in labels]
    posts = toy_hr.FENCE_POST
    assert sum(w.count(posts) > 20 for w in fences) >= len(labels) // 2  # picket fences


def _marker_rows(lab: np.ndarray) -> tuple[int, np.ndarray]:
    """The class (sign or light) of the gantry plate and its rows: the rows of the top
    eighth that are that class across the whole width."""
    found = {}
    for cls in (toy.SIGN, toy.LIGHT):
        rows = np.nonzero((lab[: lab.shape[0] // 8] == cls).all(axis=1))[0]
        if len(rows):
            found[cls] = rows
    assert len(found) == 1, found
    return next(iter(found.items()))


def test_hr_ground_label_near_the_bottom_is_decided_by_the_distant_marker(toy_root):
    _, labels = _hr_labels(toy_root)
    markers = []
    for lab in labels:
        marker, rows = _marker_rows(lab)
        lo, hi = toy_hr.MARKER_HEIGHTS
        assert rows[0] == toy_hr.MARKER_TOP and lo <= len(rows) <= hi
        assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))  # one plate
        # No 128x128 detail crop holds both the marker and the lot; the whole height does.
        assert toy_hr.LOT_ROW - rows[-1] > 128
        bottom = lab[toy_hr.LOT_ROW :]
        present = {c for c in (toy.SIDEWALK, toy.TERRAIN) if (bottom == c).any()}
        assert present == {toy_hr.MARKER_CLASSES[marker]}
        markers.append(marker)
    assert set(markers) == {toy.SIGN, toy.LIGHT}


def test_hr_lot_looks_the_same_whichever_its_label(toy_root):
    files = datasets.list_files(str(toy_root), "toy_hr_source")
    colours = np.asarray([toy_hr.LOT_COLOUR, toy.SOURCE_PALETTE[toy.SIDEWALK],
                          toy.SOURCE_PALETTE[toy.TERRAIN]], np.float64)  # fmt: skip
    for image_path, label_path in zip(files.images, files.labels, strict=True):
        image, lab = np.asarray(Image.open(image_path)), np.asarray(Image.open(label_path))
        rows = slice(toy_hr.LOT_ROW, None)
        ground = np.isin(lab[rows], (toy.SIDEWALK, toy.TERRAIN))
        mean = image[rows][ground].mean(0)
        assert np.argmin(np.linalg.norm(colours - mean, axis=1)) == 0, mean
