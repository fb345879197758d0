"""Depth for the toy SYNTHIA-like source (``python -m input_pipeline.toy --extra-sources
synthia``), so that DAF's depth head has something learnable to regress.

Written as SYNTHIA ships it: Depth/<name>.png, a 16-bit RGB PNG with the depth (centimetres
in the release) in every channel; ``tools/convert_datasets/synthia.py`` turns it into the
one-channel file the input pipeline reads. The depth is a function of the label alone (no
random draw, so no other toy file changes): the ground recedes with its row above the
lowest horizon row, the sky is as far as 16 bits go, the background along the horizon
(buildings, vegetation, fences) at a constant distance, and every upright object (pole,
sign, light, person, car) at the ground depth of the foot of its column's run: a constant
depth per box.
"""

from __future__ import annotations

import os

import numpy as np

ROAD, SIDEWALK, SKY = 0, 1, 10  # Cityscapes train ids (input_pipeline/toy.py)
UPRIGHT = (5, 6, 7, 11, 13)  # pole, traffic light, traffic sign, person, car
FAR = 65535  # the sky: the largest 16-bit depth
BACKGROUND = 40_000  # buildings, vegetation, fences: 400 m
CAMERA = 60_000  # ground depth = CAMERA / (rows below the horizon + 1), 6 m at 100 rows
NEAREST = 100


def horizon_row(train_ids: np.ndarray) -> int:
    """The row above the first road or sidewalk row (the scene's horizon), or mid-height."""
    rows = np.flatnonzero(np.isin(train_ids, (ROAD, SIDEWALK)).any(axis=1))
    return int(rows[0]) - 1 if rows.size else train_ids.shape[0] // 2


def toy_depth(train_ids: np.ndarray) -> np.ndarray:
    """uint16 (H, W) depth of a toy scene (see the module docstring)."""
    height = train_ids.shape[0]
    horizon = horizon_row(train_ids)
    rows = np.arange(height)
    ground = np.clip(CAMERA / np.maximum(rows - horizon, 1), NEAREST, BACKGROUND)
    depth = np.where(rows[:, None] > horizon, ground[:, None], float(BACKGROUND))
    depth = np.broadcast_to(depth, train_ids.shape).copy()
    depth[train_ids == SKY] = FAR
    upright = np.isin(train_ids, UPRIGHT)
    foot = np.tile(rows[:, None], (1, train_ids.shape[1]))  # the run's lowest row, per pixel
    for r in range(height - 2, -1, -1):
        joined = upright[r] & upright[r + 1]
        foot[r] = np.where(joined, foot[r + 1], foot[r])
    depth = np.where(upright, ground[np.minimum(foot, height - 1)], depth)
    return np.round(depth).astype(np.uint16)


def write_depth(train_ids: np.ndarray, directory: str, index: int) -> None:
    """Depth/<index:07d>.png under ``directory``: 16-bit RGB, the depth in every channel."""
    import tensorflow as tf  # noqa: PLC0415  (heavy; only the SYNTHIA-like source needs it)

    path = os.path.join(directory, "Depth", f"{index:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    depth = toy_depth(train_ids)
    tf.io.write_file(path, tf.io.encode_png(np.repeat(depth[..., None], 3, axis=-1)))
