"""Tiny dataset trees in every converted layout, and the readers' checks on them."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import datasets


def save_rgb(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = "JPEG" if path.endswith(".jpg") else "PNG"
    Image.fromarray(image.astype(np.uint8)).save(path, fmt)


def save_gray(path: str, label: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def scene(i: int, h: int = 16, w: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Image whose red channel encodes the label (10 * id) and green the file index."""
    label = np.zeros((h, w), np.uint8)
    label[: h // 2] = 10
    label[h // 2 :, : w // 2] = 0
    label[h // 2 :, w // 2 :] = 13
    label[0, 0] = 255
    image = np.stack(
        [
            np.where(label == 255, 250, label.astype(np.int32) * 10),
            np.full((h, w), 10 * i),
            np.tile(np.arange(w) * 5, (h, 1)),
        ],
        -1,
    )
    return image.astype(np.uint8), label


# Writers of the converted layouts: (root, n) -> dataset directory.
def write_gta(root: str, n: int = 3, name: str = "gta", h: int = 16, w: int = 24) -> str:
    d = os.path.join(root, name)
    for i in range(n):
        image, label = scene(i, h, w)
        save_rgb(f"{d}/images/{i:05d}.png", image)
        save_gray(f"{d}/labels/{i:05d}_labelTrainIds.png", label)
    return d


def write_synscapes(root: str, n: int = 3) -> str:
    d = os.path.join(root, "synscapes")
    for i in range(n):
        image, label = scene(i + 100)
        save_rgb(f"{d}/img/rgb/{i + 1}.png", image)
        save_gray(f"{d}/img/class/{i + 1}_gt_labelTrainIds.png", label)
    return d


def write_synthia(root: str, n: int = 2) -> str:
    d = os.path.join(root, "synthia")
    for i in range(n):
        image, label = scene(i)
        save_rgb(f"{d}/RGB/{i:07d}.png", image)
        save_gray(f"{d}/GT/LABELS/{i:07d}_labelTrainIds.png", label)
    return d


def write_cityscapes(root: str, n: int = 2, splits=("train", "val"), h=16, w=32) -> str:
    d = os.path.join(root, "cityscapes")
    for split in splits:
        for i in range(n):
            stem = f"{split}city_{i:06d}_000019"
            image, label = scene(i, h, w)
            save_rgb(f"{d}/leftImg8bit/{split}/{split}city/{stem}_leftImg8bit.png", image)
            save_gray(f"{d}/gtFine/{split}/{split}city/{stem}_gtFine_labelTrainIds.png", label)
    return d


def write_mapillary(root: str, n: int = 2) -> str:
    d = os.path.join(root, "mapillary")
    for i in range(n):
        image, label = scene(i, 20, 30)
        save_rgb(f"{d}/training/images/m{i}.jpg", image)
        save_gray(f"{d}/cityscapes_trainIdLabel/train/label/m{i}.png", label)
        save_rgb(f"{d}/half/val_img/v{i}.jpg", image)
        save_gray(f"{d}/half/val_label/v{i}.png", label)
    return d


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
