"""A toy IDD: a second target domain of the toy's size in the IDD layout, so MTAF's
three-target setting (GTA5 -> Cityscapes, Mapillary, IDD) and the IDD converter run on
the toy.

    python -m input_pipeline.toy --out data/toy --extra-targets idd

writes toy/idd ("toy_idd"): toy scenes (:func:`toy.draw_scene`) rendered as the toy
target with a stronger appearance shift (another look, the same layout statistics),
stored as IDD ships them, leftImg8bit/{train,val}/0/*_leftImg8bit.png with
gtFine/{train,val}/0/*_gtFine_labelids.png in IDD's 40 fine ids, then converted by
tools/convert_datasets/idd.py with ``--label-set mtaf7`` (train ids and MTAF's 7 classes).
A random stream of its own: the other toy files do not change.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from ddb_jax import labels as label_tables
from input_pipeline import conversion, toy

IDD_STREAM = 200  # the random stream's key next to the seed (toy_hr uses 100)
NAME = "idd"
SHIFT_SCALE = 1.5  # the appearance shift relative to the toy target's
EGO_VEHICLE_ID = 36  # IDD's fine id of the ego vehicle (the hood): 255 in every table
SEQUENCE = "0"


def to_idd_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> IDD fine ids (every train id has one; ignore -> ego vehicle)."""
    lut = np.full(256, EGO_VEHICLE_ID, np.uint8)
    for raw, train_id in label_tables.IDD_ID_TO_TRAIN_ID.items():
        lut[train_id] = raw
    return lut[train_ids]


def _write(rng: np.random.Generator, root: str, split: str, count: int, shift: float) -> None:
    for i in range(count):
        train_ids, image = toy.plain_scene(rng, "target", shift * SHIFT_SCALE)
        train_ids[len(train_ids) - len(train_ids) // 16 :] = toy.IGNORE  # the hood
        stem = f"{split}/{SEQUENCE}/{i:06d}"
        toy._save_rgb(image, os.path.join(root, "leftImg8bit", f"{stem}_leftImg8bit.png"))
        path = os.path.join(root, "gtFine", f"{stem}_gtFine_labelids.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        conversion.save_label_png(to_idd_ids(train_ids), path)


def generate(
    out: str, seed: int = 0, num_train: int = 200, num_val: int = 50, shift: float = 1.0
) -> list[str]:
    """Writes and converts out/idd (train + val); returns its directory."""
    rng = np.random.default_rng([seed, IDD_STREAM])
    root = os.path.join(out, NAME)
    for split, count in (("train", num_train), ("val", num_val)):
        _write(rng, root, split, count, shift)
    tool = os.path.join(toy.REPO, "tools", "convert_datasets", "idd.py")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [toy.REPO, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, tool, root, "--nproc", "1", "--label-set", "mtaf7"],
        cwd=toy.REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {root} failed:\n{done.stderr[-3000:]}")
    return [root]


def generate_extra_targets(names: str, out: str, seed: int, num_train: int, num_val: int,
                           shift: float) -> list[str]:  # fmt: skip
    """``--extra-targets`` of input_pipeline/toy.py: comma-separated, of 'idd'."""
    wanted = [n for n in names.split(",") if n]
    unknown = [n for n in wanted if n != NAME]
    if unknown:
        raise ValueError(f"unknown toy targets {unknown}; the extra targets: ['{NAME}']")
    return generate(out, seed, num_train, num_val, shift) if wanted else []
