"""IDD as a dataset: its converter on a synthetic IDD tree (train ids and MTAF's 7 classes),
the reader's layout, and the toy IDD."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddb_jax import label_sets, labels
from input_pipeline import datasets, toy_idd
from tests.support import save_gray, save_rgb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# IDD's anue_labels.py: (name, fine id, csTrainId) of the ids with a Cityscapes train id.
IDD_CS_TRAIN_IDS = [
    ("road", 0, 0), ("sidewalk", 3, 1), ("non-drivable fallback", 5, 9), ("person", 6, 11),
    ("rider", 8, 12), ("motorcycle", 9, 17), ("bicycle", 10, 18), ("car", 12, 13),
    ("truck", 13, 14), ("bus", 14, 15), ("train", 17, 16), ("wall", 20, 3), ("fence", 21, 4),
    ("traffic sign", 24, 7), ("traffic light", 25, 6), ("pole", 26, 5), ("building", 29, 2),
    ("vegetation", 32, 8), ("sky", 33, 10),
]  # fmt: skip
# drivable fallback, curb, billboard / non-drivable fallback, autorickshaw, ego vehicle
RAW = np.array([[2, 19, 23], [5, 11, 36]], np.uint8)


def convert(data_dir, *args, check: bool = True):
    result = subprocess.run(
        [sys.executable, "tools/convert_datasets/idd.py", str(data_dir), "--nproc", "1", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_idd_train_ids_are_its_cs_train_id_column():
    assert labels.IDD_ID_TO_TRAIN_ID == {raw: train for _, raw, train in IDD_CS_TRAIN_IDS}
    assert sorted(labels.IDD_ID_TO_TRAIN_ID.values()) == list(range(labels.NUM_CLASSES))


def test_converter_writes_both_label_spaces_and_the_reader_pairs_them(tmp_path):
    d = tmp_path / "idd"
    for split, seqs in (("train", ("0", "12")), ("val", ("3",))):
        for seq in seqs:
            stem = f"{split}/{seq}/{seq}0042"
            save_rgb(f"{d}/leftImg8bit/{stem}_leftImg8bit.png", np.zeros((2, 3, 3)))
            save_gray(f"{d}/gtFine/{stem}_gtFine_labelids.png", RAW)
    convert(d, "--label-set", "mtaf7")
    stem = d / "gtFine/val/3/30042_gtFine_labelTrainIds"
    np.testing.assert_array_equal(read(f"{stem}.png"), [[255, 255, 255], [9, 255, 255]])
    np.testing.assert_array_equal(read(f"{stem}_mtaf7.png"), [[0, 1, 2], [255, 6, 255]])
    assert (d / "sample_class_stats.json").is_file()
    assert len(datasets.list_files(str(tmp_path), "idd", "train")) == 2
    files = datasets.list_files(str(tmp_path), "idd", "val", label_set="mtaf7")
    assert files.labels == (f"{stem}_mtaf7.png",) and files.scale == (1280, 720)


def test_unknown_ids_and_missing_label_set_fail_in_one_line(tmp_path):
    d = tmp_path / "idd"
    stem = "train/0/000001"
    save_rgb(f"{d}/leftImg8bit/{stem}_leftImg8bit.png", np.zeros((1, 2, 3)))
    save_gray(f"{d}/gtFine/{stem}_gtFine_labelids.png", np.array([[0, 41]]))
    os.makedirs(d / "gtFine/val")
    result = convert(d, check=False)
    assert result.returncode != 0 and "[41]" in result.stderr
    convert(d, "--unknown-to-ignore")
    with pytest.raises(datasets.DatasetError, match=r"idd.py <data root>/idd --label-set mtaf7"):
        datasets.list_files(str(tmp_path), "idd", "train", label_set="mtaf7")


def test_toy_idd(tmp_path):
    (root,) = toy_idd.generate(str(tmp_path / "toy"), num_train=2, num_val=1)
    assert root.endswith("toy/idd")
    files = datasets.list_files(str(tmp_path), "toy_idd", "val", label_set="mtaf7")
    assert len(files) == 1
    seven = read(files.labels[0])
    nineteen = read(files.labels[0].replace("_mtaf7", ""))
    valid = nineteen != 255
    # Through IDD's ids and MTAF's table, each train id lands in its MTAF category, except
    # terrain: IDD's non-drivable fallback, which MTAF's IDD table leaves out.
    mtaf = label_sets.raw_table("mtaf7", "cityscapes")
    expected = np.array([mtaf.get(labels.TRAIN_ID_TO_CITYSCAPES_ID[t], 255) for t in range(19)])
    expected[9] = 255
    np.testing.assert_array_equal(seven[valid], expected[nineteen[valid]])
    assert (seven[~valid] == 255).all()
    assert len(datasets.list_files(str(tmp_path), "toy_idd", "train")) == 2
    with pytest.raises(ValueError, match="unknown toy targets"):
        toy_idd.generate_extra_targets("mapillary", str(tmp_path), 0, 1, 1, 1.0)
