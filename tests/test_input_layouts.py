"""Tiny dataset trees in every converted layout, and the readers' checks on them."""

from __future__ import annotations

import os

import pytest

from input_pipeline import datasets
from tests.support import (
    write_cityscapes,
    write_gta,
    write_mapillary,
    write_synscapes,
    write_synthia,
)


@pytest.mark.parametrize(
    "name,writer,split,count",
    [
        ("gta", write_gta, "train", 3),
        ("synscapes", write_synscapes, "train", 3),
        ("synthia", write_synthia, "train", 2),
        ("cityscapes", write_cityscapes, "val", 2),
        ("mapillary", write_mapillary, "train", 2),
        ("mapillary", write_mapillary, "val", 2),
    ],
)
def test_every_layout_pairs_images_with_their_labels(tmp_path, name, writer, split, count):
    writer(str(tmp_path))
    files = datasets.list_files(str(tmp_path), name, split)
    assert len(files) == count
    for image, label in zip(files.images, files.labels, strict=True):
        stem = os.path.basename(image).split(".")[0].replace("_leftImg8bit", "")
        assert os.path.basename(label).startswith(stem)
        assert os.path.isfile(label)
    if name == "mapillary":
        assert files.images[0].endswith(("training/images/m0.jpg", "half/val_img/v0.jpg"))


def test_scale_table_and_override(tmp_path):
    write_cityscapes(str(tmp_path))
    write_mapillary(str(tmp_path))
    assert datasets.list_files(str(tmp_path), "cityscapes", "train").scale == (1024, 512)
    mapillary = datasets.list_files(str(tmp_path), "mapillary", "train")
    assert (mapillary.scale, mapillary.min_size) == ((1024, 512), 512)
    assert datasets.list_files(str(tmp_path), "mapillary", "val").min_size is None
    overridden = datasets.with_scale_overrides(mapillary, {"mapillary": None})
    assert (overridden.scale, overridden.min_size) == (None, None)
    assert datasets.DATASETS["toy_source"].train_scale is None


def test_missing_directory_names_dir_layout_and_readme(tmp_path):
    with pytest.raises(datasets.DatasetError) as err:
        datasets.list_files(str(tmp_path), "gta")
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "gta") in msg
    assert "labels/*_labelTrainIds.png" in msg and "data/README.md" in msg and "GTA5" in msg


def test_empty_split_names_directory(tmp_path):
    write_cityscapes(str(tmp_path), splits=("train",))
    os.makedirs(tmp_path / "cityscapes" / "leftImg8bit" / "val")
    with pytest.raises(datasets.DatasetError, match="no images in .*leftImg8bit/val"):
        datasets.list_files(str(tmp_path), "cityscapes", "val")


def test_image_without_label_names_both_files(tmp_path):
    d = write_gta(str(tmp_path))
    os.remove(f"{d}/labels/00001_labelTrainIds.png")
    with pytest.raises(datasets.DatasetError, match="00001.png has no .*00001_labelTrainIds.png"):
        datasets.list_files(str(tmp_path), "gta")


def test_label_without_image_names_the_label(tmp_path):
    d = write_gta(str(tmp_path))
    os.remove(f"{d}/images/00002.png")
    with pytest.raises(datasets.DatasetError, match="00002_labelTrainIds.png.*2 images vs 3"):
        datasets.list_files(str(tmp_path), "gta")


def test_target_training_needs_no_labels(tmp_path):
    d = write_cityscapes(str(tmp_path), splits=("train",))
    import shutil

    shutil.rmtree(f"{d}/gtFine")
    files = datasets.list_files(str(tmp_path), "cityscapes", "train", with_labels=False)
    assert files.labels is None and len(files) == 2


def test_unknown_dataset_name():
    with pytest.raises(datasets.DatasetError, match="unknown dataset 'gtav'"):
        datasets.list_files("data", "gtav")
