"""The converters' ``--label-set NAME`` option: a second label file per image, in a label
set's classes (ddb_jax/label_sets.py), written from the same raw ids.

The 19-class files and their class statistics stay as they are; a label set's files are
named like them plus ``_NAME`` (e.g. ``*_labelTrainIds_mtaf7.png``) and get no statistics
(rare class sampling counts the 19 classes).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence

import numpy as np

from ddb_jax import label_sets
from ddb_jax import labels as label_tables
from input_pipeline import conversion


def add_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--label-set",
        default="",
        choices=["", *sorted(label_sets.LABEL_SETS)],
        help="also write each label in this label set's classes (ddb_jax/label_sets.py), "
        "as <19-class name>_<label set>.png; read with config.data.label_set",
    )
    return parser


def exclude(suffix_19: str) -> tuple[str, ...]:
    """Output names a raw-label search must skip: the 19-class suffix and every set's."""
    return (suffix_19, *(set_path(suffix_19, name) for name in label_sets.LABEL_SETS))


def set_path(path_19: str, name: str) -> str:
    """The label set's file beside a 19-class label file ``path_19`` (a .png)."""
    return path_19[: -len(".png")] + label_sets.label_suffix(name) + ".png"


def _map_file(path, table, read_raw, valid_ids, unknown_to_ignore) -> np.ndarray:
    return label_tables.map_ids(read_raw(path), table, valid_ids, path, unknown_to_ignore)


def id_mapper(
    name: str,
    layout: str,
    read_raw: Callable[[str], np.ndarray],
    valid_ids: Sequence[int],
    unknown_to_ignore: bool,
) -> Callable[[str], np.ndarray]:
    """``raw label path -> class ids`` of set ``name`` with its ``layout`` table (picklable:
    the converters map over worker processes)."""
    table = dict(label_sets.raw_table(name, layout))  # raises early when the set lacks one
    return functools.partial(
        _map_file,
        table=table,
        read_raw=read_raw,
        valid_ids=tuple(valid_ids),
        unknown_to_ignore=unknown_to_ignore,
    )


def write(
    name: str, tasks_19: Sequence[tuple[str, str]], fn: Callable, nproc: int, desc: str
) -> None:
    """Writes set ``name``'s file for each ``(raw, 19-class output)`` pair."""
    tasks = [(raw, set_path(out, name)) for raw, out in tasks_19]
    conversion.convert_labels(tasks, fn, nproc, f"{desc} ({name})")


def convert_cityscapes_ids(args, layout: str, tasks_19: Sequence[tuple[str, str]], desc: str):
    """``--label-set`` for the datasets whose labels are Cityscapes ids (GTA5, Cityscapes)."""
    if not args.label_set:
        return
    fn = id_mapper(
        args.label_set,
        layout,
        conversion.read_label_png,
        label_tables.CITYSCAPES_VALID_IDS,
        args.unknown_to_ignore,
    )
    write(args.label_set, tasks_19, fn, args.nproc, desc)
