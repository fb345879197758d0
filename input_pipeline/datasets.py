"""Readers of the converted dataset layouts: file lists, checked before any long work.

Plain tf.data over the converted files (no TFDS builders): the datasets cannot be
downloaded automatically (licences), the reference's layouts are what users already
have on disk, and a TFDS build would copy hundreds of GB of PNGs. A dataset ``name``
lives at ``f"{root}/{subdir}"`` (``subdir`` is the name except for the toy domains); the
root may be a local directory or a bucket (``gs://...``, through :mod:`ddb_jax.paths`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ddb_jax import errors, label_sets, paths

README = "data/README.md"


class DatasetError(errors.InputError, ValueError):
    """A dataset directory is missing, empty or inconsistent; the message names the files."""


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """Where images and labels of one layout live, relative to the dataset directory."""

    title: str  # the section of data/README.md that explains how to prepare it
    description: str  # the expected tree, shown in errors


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    layout: str  # gta | synscapes | synthia | cityscapes | mapillary | idd
    subdir: str
    # mmcv keep-ratio resize target (long edge, short edge), or None to keep the image size.
    train_scale: tuple[int, int] | None
    eval_scale: tuple[int, int] | None
    # mmseg Resize(min_size=...): the short edge becomes exactly this (Mapillary training).
    train_min_size: int | None = None


LAYOUTS: Mapping[str, LayoutSpec] = {
    "gta": LayoutSpec("GTA5", "images/*.png and labels/*_labelTrainIds.png"),
    "synscapes": LayoutSpec("Synscapes", "img/rgb/*.png and img/class/*_gt_labelTrainIds.png"),
    "synthia": LayoutSpec("SYNTHIA", "RGB/*.png and GT/LABELS/*_labelTrainIds.png"),
    "cityscapes": LayoutSpec(
        "Cityscapes",
        "leftImg8bit/{split}/{city}/*_leftImg8bit.png and "
        "gtFine/{split}/{city}/*_gtFine_labelTrainIds.png",
    ),
    "mapillary": LayoutSpec(
        "Mapillary Vistas",
        "training/images/*.jpg with cityscapes_trainIdLabel/train/label/*.png, and "
        "half/val_img/*.jpg with half/val_label/*.png",
    ),
    "idd": LayoutSpec(
        "IDD",
        "leftImg8bit/{split}/{sequence}/*_leftImg8bit.png and "
        "gtFine/{split}/{sequence}/*_gtFine_labelTrainIds.png",
    ),
}
# A label set's files (config.data.label_set, ddb_jax/label_sets.py): the 19-class names plus
# _<set> (gtFine/.../*_gtFine_labelTrainIds_mtaf7.png), Mapillary's in <set>_label/ and
# half/val_label_<set>/. Written by the layout's converter with --label-set.

DATASETS: Mapping[str, DatasetSpec] = {
    "gta": DatasetSpec("gta", "gta", (1280, 720), (1280, 720)),
    "synscapes": DatasetSpec("synscapes", "synscapes", (1280, 720), (1280, 720)),
    "synthia": DatasetSpec("synthia", "synthia", (1280, 760), (1280, 760)),
    "cityscapes": DatasetSpec("cityscapes", "cityscapes", (1024, 512), (1024, 512)),
    "mapillary": DatasetSpec("mapillary", "mapillary", (1024, 512), (1024, 512), 512),
    "idd": DatasetSpec("idd", "idd", (1280, 720), (1280, 720)),  # mostly 1920x1080 images
    # Toy domains (python -m input_pipeline.toy): small images keep their size.
    "toy_source": DatasetSpec("gta", "toy/gta", None, None),
    "toy_target": DatasetSpec("cityscapes", "toy/cityscapes", None, None),
    # --extra-sources synthia,synscapes: SYNTHIA- and Synscapes-like sources.
    "toy_synthia": DatasetSpec("synthia", "toy/synthia", None, None),
    "toy_synscapes": DatasetSpec("synscapes", "toy/synscapes", None, None),
    # --hr: 512x256 scenes needing detail and context (input_pipeline/toy_hr.py).
    "toy_hr_source": DatasetSpec("gta", "toy/gta_hr", None, None),
    "toy_hr_target": DatasetSpec("cityscapes", "toy/cityscapes_hr", None, None),
    # --extra-targets idd: an IDD-like second target (input_pipeline/toy_idd.py).
    "toy_idd": DatasetSpec("idd", "toy/idd", None, None),
}


@dataclasses.dataclass(frozen=True)
class FileList:
    """One split of one dataset: parallel lists of image and (optional) label files."""

    name: str
    directory: str
    images: tuple[str, ...]
    labels: tuple[str, ...] | None
    scale: tuple[int, int] | None
    min_size: int | None

    def __len__(self) -> int:
        return len(self.images)


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def dataset_dir(root: str, name: str) -> str:
    return paths.join(root, dataset_spec(name).subdir)


def _require_dir(path: str, name: str, layout: str) -> None:
    if not paths.isdir(path):
        spec = LAYOUTS[layout]
        raise DatasetError(
            f"dataset {name!r}: directory {path} does not exist. Expected the {layout} layout: "
            f"{spec.description}. See section '{spec.title}' of {README} on preparing it."
        )


def _glob(pattern: str) -> list[str]:
    return paths.glob(pattern)


def _pair(
    name: str,
    images: Sequence[str],
    label_dir: str,
    label_for: dict[str, str],
    label_glob: str,
    missing_hint: str = f"did the converter run? see {README}",
) -> tuple[str, ...]:
    """Labels in image order; every image needs its label and every label its image.

    One listing of the label directory answers both (not a request per file: in a bucket
    every existence check is a round trip)."""
    present = set(_glob(paths.join(label_dir, label_glob)))
    missing = [img for img in images if label_for[img] not in present]
    if missing:
        raise DatasetError(
            f"dataset {name!r}: {len(missing)} image(s) without a label, e.g. {missing[0]} "
            f"has no {label_for[missing[0]]} ({missing_hint})"
        )
    expected = set(label_for.values())
    orphans = sorted(present - expected)
    if orphans:
        raise DatasetError(
            f"dataset {name!r}: {len(orphans)} label(s) without an image, e.g. {orphans[0]}; "
            f"{len(images)} images vs {len(images) + len(orphans)} labels"
        )
    return tuple(label_for[img] for img in images)


def _label_set_hint(name: str, layout: str, label_set: str) -> str:
    """How to write a label set's files, for the one-line error when they are missing."""
    if name.startswith("toy"):
        return f"label set {label_set!r}: the toy generator does not write it"
    return (
        f"label set {label_set!r}: run python tools/convert_datasets/{layout}.py "
        f"<data root>/{dataset_spec(name).subdir} --label-set {label_set}"
    )


def list_files(
    root: str, name: str, split: str = "train", with_labels: bool = True, label_set: str = ""
) -> FileList:
    """Lists (and checks) one split of dataset ``name`` under ``root``; ``label_set`` (a
    name of :mod:`ddb_jax.label_sets`, '' = the 19 train ids) picks the label files."""
    spec = dataset_spec(name)
    directory = paths.join(root, spec.subdir)
    _require_dir(directory, name, spec.layout)
    layout = spec.layout
    if label_set and with_labels and not label_sets.label_set(label_set).covers(layout):
        raise DatasetError(f"label set {label_set!r} has no table for dataset {name!r}")
    tag = label_sets.label_suffix(label_set)

    if layout in ("gta", "synscapes", "synthia"):
        image_sub, label_sub, suffix = {
            "gta": ("images", "labels", "_labelTrainIds.png"),
            "synscapes": (
                paths.join("img", "rgb"),
                paths.join("img", "class"),
                "_gt_labelTrainIds.png",
            ),
            "synthia": ("RGB", paths.join("GT", "LABELS"), "_labelTrainIds.png"),
        }[layout]
        suffix = suffix[: -len(".png")] + tag + ".png"
        image_dir, label_dir = (
            paths.join(directory, image_sub),
            paths.join(directory, label_sub),
        )
        images = _glob(paths.join(image_dir, "*.png"))
        label_for = {
            img: paths.join(label_dir, paths.basename(img)[: -len(".png")] + suffix)
            for img in images
        }
        label_glob = "*" + suffix
    elif layout in ("cityscapes", "idd"):  # IDD: Cityscapes' tree and names
        image_dir = paths.join(directory, "leftImg8bit", split)
        label_dir = paths.join(directory, "gtFine", split)
        images = _glob(paths.join(image_dir, "*", "*_leftImg8bit.png"))
        label_for = {
            img: paths.join(
                label_dir,
                paths.basename(paths.dirname(img)),
                paths.basename(img)[: -len("_leftImg8bit.png")] + f"_gtFine_labelTrainIds{tag}.png",
            )
            for img in images
        }
        label_glob = paths.join("*", f"*_gtFine_labelTrainIds{tag}.png")
    elif layout == "mapillary":
        if split == "train":
            image_dir = paths.join(directory, "training", "images")
            labels_root = f"{label_set}_label" if label_set else "cityscapes_trainIdLabel"
            label_dir = paths.join(directory, labels_root, "train", "label")
        else:
            image_dir = paths.join(directory, "half", "val_img")
            label_dir = paths.join(directory, "half", "val_label" + tag)
        images = _glob(paths.join(image_dir, "*.jpg"))
        label_for = {
            img: paths.join(label_dir, paths.basename(img)[: -len(".jpg")] + ".png")
            for img in images
        }
        label_glob = "*.png"
    else:  # pragma: no cover - DATASETS only names the layouts above
        raise DatasetError(f"unknown layout {layout!r}")

    _require_dir(image_dir, name, layout)
    if not images:
        raise DatasetError(
            f"dataset {name!r}, split {split!r}: no images in {image_dir} "
            f"(expected {LAYOUTS[layout].description}; see {README})"
        )
    labels = None
    if with_labels:
        hint = _label_set_hint(name, layout, label_set) if label_set else None
        if label_set and not paths.isdir(label_dir):
            raise DatasetError(f"dataset {name!r}: no directory {label_dir} ({hint})")
        _require_dir(label_dir, name, layout)
        labels = _pair(name, images, label_dir, label_for, label_glob, *([hint] if hint else []))
    scale = spec.train_scale if split == "train" else spec.eval_scale
    min_size = spec.train_min_size if split == "train" else None
    return FileList(name, directory, tuple(images), labels, scale, min_size)


def check_available(data_cfg, eval_split: str | None = "val", sources: bool = True) -> None:
    """Lists every file set a stage will read (``sources``: the labelled source sets; the
    targets' training images; with ``eval_split``, their labelled split), so a wrong data
    root or a missing dataset fails at once, naming the directory, before any long work."""
    paths.check_bucket(data_cfg.root, "config.data.root")
    label_set = data_cfg.get("label_set", "")
    if sources:
        for name in data_cfg.source:
            list_files(data_cfg.root, name, "train", with_labels=True, label_set=label_set)
    for name in data_cfg.target:
        list_files(data_cfg.root, name, "train", with_labels=False)
        if eval_split:
            list_files(data_cfg.root, name, eval_split, with_labels=True, label_set=label_set)


def with_scale_overrides(files: FileList, overrides: Mapping | None) -> FileList:
    """Applies ``config.data.resize_scales[name]`` ((long, short) or None) when given."""
    if not overrides or files.name not in overrides:
        return files
    scale = overrides[files.name]
    scale = None if scale is None else (int(scale[0]), int(scale[1]))
    return dataclasses.replace(files, scale=scale, min_size=None)
