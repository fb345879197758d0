"""Dataset converters on tiny raw trees: specific pixels, stats, idempotence, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ddb_jax import labels as label_tables
from input_pipeline import datasets
from tests.support import save_gray, save_rgb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW = np.array([[7, 26, 0], [33, 24, 23]], np.uint8)  # road, car, void / bicycle, person, sky
TRAIN = np.array([[0, 13, 255], [18, 11, 10]], np.uint8)


def convert(tool: str, data_dir, *args, check=True):
    result = subprocess.run(
        [sys.executable, f"tools/convert_datasets/{tool}.py", str(data_dir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def read(path):
    return np.asarray(Image.open(path))


def test_gta_ids_stats_and_idempotence(tmp_path):
    d = tmp_path / "gta"
    for i in range(3):
        save_rgb(f"{d}/images/{i:05d}.png", np.zeros((2, 3, 3)))
        save_gray(f"{d}/labels/{i:05d}.png", RAW if i < 2 else np.full((2, 3), 7))
    convert("gta", d, "--nproc", "2")
    np.testing.assert_array_equal(read(d / "labels/00000_labelTrainIds.png"), TRAIN)
    stats = json.load(open(d / "sample_class_stats.json"))
    assert stats[0] == {"0": 1, "10": 1, "11": 1, "13": 1, "18": 1, "file": stats[0]["file"]}
    assert stats[0]["file"].endswith("labels/00000_labelTrainIds.png")
    with_class = json.load(open(d / "samples_with_class.json"))
    assert [n for _, n in with_class["0"]] == [1, 1, 6]
    # A second run skips finished files and rewrites the same statistics.
    out = d / "labels/00000_labelTrainIds.png"
    mtime = os.stat(out).st_mtime_ns
    convert("gta", d, "--nproc", "1")
    assert os.stat(out).st_mtime_ns == mtime
    assert json.load(open(d / "sample_class_stats.json")) == stats
    assert len(datasets.list_files(str(tmp_path), "gta")) == 3


def test_unknown_ids_fail_naming_the_file(tmp_path):
    d = tmp_path / "gta"
    save_gray(f"{d}/labels/00007.png", np.array([[7, 40]]))
    result = convert("gta", d, "--nproc", "1", check=False)
    assert result.returncode != 0
    assert "00007.png" in result.stderr and "[40]" in result.stderr
    convert("gta", d, "--nproc", "1", "--unknown-to-ignore")
    np.testing.assert_array_equal(read(d / "labels/00007_labelTrainIds.png"), [[0, 255]])


def test_synscapes_writes_reference_names(tmp_path):
    d = tmp_path / "synscapes"
    save_rgb(f"{d}/img/rgb/1.png", np.zeros((2, 3, 3)))
    save_gray(f"{d}/img/class/1.png", RAW)
    convert("synscapes", d, "--nproc", "1")
    np.testing.assert_array_equal(read(d / "img/class/1_gt_labelTrainIds.png"), TRAIN)
    assert len(datasets.list_files(str(tmp_path), "synscapes")) == 1


def test_cityscapes_converts_both_splits(tmp_path):
    d = tmp_path / "cityscapes"
    for split in ("train", "val"):
        stem = f"{split}/aachen/aachen_000000_000019"
        save_rgb(f"{d}/leftImg8bit/{stem}_leftImg8bit.png", np.zeros((2, 3, 3)))
        save_gray(f"{d}/gtFine/{stem}_gtFine_labelIds.png", RAW)
    convert("cityscapes", d, "--nproc", "1")
    out = d / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    np.testing.assert_array_equal(read(out), TRAIN)
    files = json.load(open(d / "sample_class_stats.json"))
    assert len(files) == 1 and "gtFine/train" in files[0]["file"]
    assert len(datasets.list_files(str(tmp_path), "cityscapes", "val")) == 1


def test_synthia_reads_the_first_channel_of_16_bit_pngs(tmp_path):
    d = tmp_path / "synthia"
    ids = np.array([[3, 21, 22], [1, 8, 0]], np.uint16)  # road, wall, lane marking / sky, car
    instance = np.full_like(ids, 1000)  # the other channels hold instance ids
    os.makedirs(d / "GT/LABELS")
    png = tf.io.encode_png(np.stack([ids, instance, instance], -1))
    tf.io.write_file(str(d / "GT/LABELS/0000000.png"), png)
    save_rgb(f"{d}/RGB/0000000.png", np.zeros((2, 3, 3)))
    convert("synthia", d, "--nproc", "1")
    out = read(d / "GT/LABELS/0000000_labelTrainIds.png")
    np.testing.assert_array_equal(out, [[0, 3, 255], [10, 13, 255]])
    assert len(datasets.list_files(str(tmp_path), "synthia")) == 1


MAPILLARY_NAMES = [
    "Bird",
    "Curb",
    "Road",
    "Lane Marking - General",
    "Traffic Sign (Front)",
    "Car",
    "Sky",
    "Bicyclist",
    "Utility Pole",
    "Unlabeled",
]


def test_mapillary_table_follows_the_name_rules():
    table = label_tables.mapillary_to_train_id(MAPILLARY_NAMES)
    np.testing.assert_array_equal(table, [255, 1, 0, 0, 7, 13, 10, 12, 5, 255])


def _save_palette(path, index):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(index.astype(np.uint8), mode="P")
    im.putpalette(list(np.random.default_rng(0).integers(0, 255, 768)))
    im.save(path)


def test_mapillary_palette_labels_and_half_validation(tmp_path):
    d = tmp_path / "mapillary"
    os.makedirs(d)
    json.dump(
        {"labels": [{"readable": n} for n in MAPILLARY_NAMES]}, open(d / "config_v1.2.json", "w")
    )
    index = np.tile(np.arange(10), (6, 1))[:, :8]  # 6 x 8
    for split in ("training", "validation"):
        save_rgb(f"{d}/{split}/images/x{split[0]}.jpg", np.full((6, 8, 3), 90))
        _save_palette(f"{d}/{split}/v1.2/labels/x{split[0]}.png", index)
    convert("mapillary", d, "--nproc", "1")
    train = read(d / "cityscapes_trainIdLabel/train/label/xt.png")
    np.testing.assert_array_equal(train[0], [255, 1, 0, 0, 7, 13, 10, 12])
    half_label = read(d / "half/val_label/xv.png")
    assert half_label.shape == (3, 4) and Image.open(d / "half/val_img/xv.jpg").size == (4, 3)
    assert set(np.unique(half_label)) <= {255, 1, 0, 7, 13, 10, 12}
    assert len(datasets.list_files(str(tmp_path), "mapillary", "train")) == 1
    assert len(datasets.list_files(str(tmp_path), "mapillary", "val")) == 1


def test_missing_directory_fails_naming_it(tmp_path):
    result = convert("gta", tmp_path / "nope", check=False)
    assert result.returncode != 0 and "nope/labels does not exist" in result.stderr


@pytest.mark.parametrize("valid", [label_tables.CITYSCAPES_VALID_IDS])
def test_every_cityscapes_train_id_has_one_raw_id(valid):
    lut = label_tables.build_lut(label_tables.CITYSCAPES_ID_TO_TRAIN_ID, 256)
    assert sorted(set(lut[list(valid)]) - {255}) == list(range(19))
