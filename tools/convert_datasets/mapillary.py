"""Converts Mapillary Vistas v1.2 labels to the 19 Cityscapes classes; halves validation.

    python tools/convert_datasets/mapillary.py data/mapillary [--nproc 4] [--version v1.2]

Reads config_{version}.json (class names), {training,validation}/{version}/labels/*.png
(palette PNGs whose index is the Mapillary class) and writes, as the DDB README lays out:
  cityscapes_trainIdLabel/{train,val}/label/*.png   train ids, full size
  half/val_img/*.jpg, half/val_label/*.png         validation at half size (bicubic / nearest)
plus the class statistics of the training split in data/mapillary. With --label-set mtaf7
(or dada7: the same table) also, by the references' table of Mapillary names:
  {label set}_label/{train,val}/label/*.png, half/val_label_{label set}/*.png
"""

from __future__ import annotations

import functools
import json
import os

import label_set_option
import numpy as np
from PIL import Image

from ddb_jax import label_sets
from ddb_jax import labels as label_tables
from input_pipeline import conversion


def load_names(data_dir: str, version: str) -> list[str]:
    """Mapillary's readable class names, in label index order."""
    path = os.path.join(data_dir, f"config_{version}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: it names Mapillary's classes (see data/README.md)"
        )
    with open(path) as f:
        return [label["readable"] for label in json.load(f)["labels"]]


def load_table(data_dir: str, version: str) -> np.ndarray:
    return label_tables.mapillary_to_train_id(load_names(data_dir, version))


def to_train_ids(path: str, table: np.ndarray, unknown_to_ignore: bool) -> np.ndarray:
    raw = conversion.read_label_png(path)
    if raw.ndim != 2:
        raise ValueError(f"{path}: expected a palette (index) PNG, got shape {raw.shape}")
    id_to_train = {i: int(t) for i, t in enumerate(table) if t != label_tables.IGNORE_LABEL}
    return label_tables.map_ids(raw, id_to_train, tuple(range(len(table))), path, unknown_to_ignore)


def halve(task: tuple[str, str, str, str]) -> None:
    """Half-size copy of one validation image (bicubic) and its label (nearest)."""
    image_in, label_in, image_out, label_out = task
    if os.path.isfile(image_out) and os.path.isfile(label_out):
        return
    with Image.open(image_in) as im:
        w, h = im.size
        small = im.resize((w // 2, h // 2), resample=Image.BICUBIC)
        small.save(image_out + ".tmp.jpg")
        os.replace(image_out + ".tmp.jpg", image_out)
    with Image.open(label_in) as lab:
        conversion.save_label_png(
            np.asarray(lab.resize((w // 2, h // 2), resample=Image.NEAREST)), label_out
        )


def halve_label(task: tuple[str, str]) -> None:
    """Half-size copy (nearest) of one label-set validation label."""
    label_in, label_out = task
    if os.path.isfile(label_out):
        return
    with Image.open(label_in) as lab:
        w, h = lab.size
        conversion.save_label_png(
            np.asarray(lab.resize((w // 2, h // 2), resample=Image.NEAREST)), label_out
        )


def convert_label_set(args, name: str) -> None:
    """``--label-set``: full-size labels of both splits and the half-size validation ones."""
    table = label_sets.mapillary_table(name, load_names(args.data_dir, args.version))
    fn = functools.partial(to_train_ids, table=table, unknown_to_ignore=args.unknown_to_ignore)
    for split, out_split in (("training", "train"), ("validation", "val")):
        raw = conversion.find_files(label_dir(args.data_dir, split, args.version), ".png")
        out_dir = os.path.join(args.data_dir, f"{name}_label", out_split, "label")
        tasks = [(f, os.path.join(out_dir, os.path.basename(f))) for f in raw]
        conversion.convert_labels(tasks, fn, args.nproc, f"{split} ({name})")
    half = os.path.join(args.data_dir, "half", f"val_label_{name}")
    os.makedirs(half, exist_ok=True)
    val_labels = conversion.find_files(out_dir, ".png")
    tasks = [(f, os.path.join(half, os.path.basename(f))) for f in val_labels]
    conversion.parallel_map(halve_label, tasks, args.nproc, f"half-size validation ({name})")


def label_dir(data_dir: str, split: str, version: str) -> str:
    versioned = os.path.join(data_dir, split, version, "labels")
    return versioned if os.path.isdir(versioned) else os.path.join(data_dir, split, "labels")


def main() -> None:
    parser = conversion.base_parser(__doc__.splitlines()[0], "mapillary")
    parser.add_argument("--version", default="v1.2")
    args = label_set_option.add_flag(parser).parse_args()
    table = load_table(args.data_dir, args.version)
    fn = functools.partial(to_train_ids, table=table, unknown_to_ignore=args.unknown_to_ignore)
    out_root = os.path.join(args.data_dir, "cityscapes_trainIdLabel")
    for split, out_split in (("training", "train"), ("validation", "val")):
        raw = conversion.find_files(label_dir(args.data_dir, split, args.version), ".png")
        out_dir = os.path.join(out_root, out_split, "label")
        tasks = [(f, os.path.join(out_dir, os.path.basename(f))) for f in raw]
        if out_split == "train":
            conversion.convert_and_write_stats(tasks, fn, args.data_dir, args.nproc, split)
        else:
            conversion.convert_labels(tasks, fn, args.nproc, split)

    image_dir = os.path.join(args.data_dir, "validation", "images")
    half_img = os.path.join(args.data_dir, "half", "val_img")
    half_lab = os.path.join(args.data_dir, "half", "val_label")
    os.makedirs(half_img, exist_ok=True)
    os.makedirs(half_lab, exist_ok=True)
    val_labels = os.path.join(out_root, "val", "label")
    tasks = []
    for image in conversion.find_files(image_dir, ".jpg"):
        stem = os.path.splitext(os.path.basename(image))[0]
        label = os.path.join(val_labels, stem + ".png")
        if not os.path.isfile(label):
            raise FileNotFoundError(f"{image} has no converted label {label}")
        tasks.append(
            (
                image,
                label,
                os.path.join(half_img, stem + ".jpg"),
                os.path.join(half_lab, stem + ".png"),
            )
        )
    conversion.parallel_map(halve, tasks, args.nproc, "half-size validation")
    if args.label_set:
        convert_label_set(args, args.label_set)


if __name__ == "__main__":
    main()
