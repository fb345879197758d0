"""Machinery shared by tools/convert_datasets/*.py: find label files, convert in parallel.

Each converter supplies a per-file function ``raw label path -> train-id array``; this
module handles the output name, skipping files already converted (re-runs are cheap and
a killed run resumes), atomic writes, the tqdm progress bar and the RCS statistics.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from input_pipeline import rcs

TrainIdFn = Callable[[str], np.ndarray]


def find_files(root: str, suffix: str, exclude_suffixes: Sequence[str] = ()) -> list[str]:
    """Sorted files under ``root`` ending in ``suffix`` (recursively), minus excluded ones."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"directory {root} does not exist (see data/README.md)")
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(suffix) and not any(name.endswith(e) for e in exclude_suffixes):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def save_label_png(array: np.ndarray, path: str) -> None:
    """Writes an 8-bit grayscale PNG atomically (a half-written file is never left behind)."""
    tmp = path + ".tmp.png"
    Image.fromarray(np.asarray(array, np.uint8), mode="L").save(tmp)
    os.replace(tmp, path)


def read_label_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _convert_one(task: tuple[str, str], to_train_ids: TrainIdFn) -> tuple[str, dict[int, int]]:
    src, dst = task
    if os.path.isfile(dst):
        train_ids = read_label_png(dst)
    else:
        train_ids = to_train_ids(src)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        save_label_png(train_ids, dst)
    return dst, rcs.class_pixel_counts(train_ids)


def parallel_map(fn: Callable, tasks: Sequence, nproc: int, desc: str) -> list:
    """``[fn(t) for t in tasks]`` over ``nproc`` processes, with a progress bar."""
    if nproc > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(nproc) as pool:
            return list(tqdm(pool.imap(fn, tasks, chunksize=4), total=len(tasks), desc=desc))
    return [fn(t) for t in tqdm(tasks, desc=desc)]


def convert_labels(
    tasks: Sequence[tuple[str, str]],
    to_train_ids: TrainIdFn,
    nproc: int,
    desc: str,
) -> list[tuple[str, dict[int, int]]]:
    """Converts ``(raw, out)`` pairs, skipping existing outputs; returns per-file class stats."""
    return parallel_map(
        functools.partial(_convert_one, to_train_ids=to_train_ids), tasks, nproc, desc
    )


def convert_and_write_stats(
    tasks: Sequence[tuple[str, str]],
    to_train_ids: TrainIdFn,
    stats_dir: str,
    nproc: int,
    desc: str,
) -> None:
    if not tasks:
        raise FileNotFoundError(f"no label files to convert for {desc} (see data/README.md)")
    stats = convert_labels(tasks, to_train_ids, nproc, desc)
    rel = [(os.path.relpath(f, stats_dir), counts) for f, counts in stats]
    rcs.write_class_stats(stats_dir, rel)


def base_parser(description: str, dataset: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("data_dir", help=f"the {dataset} directory, e.g. data/{dataset}")
    parser.add_argument("--nproc", type=int, default=4, help="worker processes")
    parser.add_argument(
        "--unknown-to-ignore",
        action="store_true",
        help="map label ids outside the dataset's table to 255 instead of failing",
    )
    return parser


def cityscapes_ids_to_train_ids(path: str, unknown_to_ignore: bool) -> np.ndarray:
    """A label PNG in Cityscapes ids (Cityscapes, GTA, Synscapes) -> the 19 train ids."""
    from ddb_jax import labels as label_tables

    return label_tables.map_ids(
        read_label_png(path),
        label_tables.CITYSCAPES_ID_TO_TRAIN_ID,
        label_tables.CITYSCAPES_VALID_IDS,
        path,
        unknown_to_ignore,
    )
