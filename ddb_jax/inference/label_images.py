"""Train-id maps as images: colour (Cityscapes palette, or a label set's), overlay, train-id
and label-id PNGs.

One place for the files a prediction becomes, so the evaluate stage, ``tools/predict.py``
and the demo's pictures draw the same colours and write the same bytes. NumPy and Pillow
only; files go through :mod:`ddb_jax.paths` (local paths and ``gs://`` alike, each file
written whole).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ddb_jax import label_sets, labels, paths

# Cityscapes label id of each train id (0..18); anything else becomes 0 ('unlabeled').
_LABEL_ID_LUT = np.zeros(256, np.uint8)
for _train_id, _label_id in labels.TRAIN_ID_TO_CITYSCAPES_ID.items():
    _LABEL_ID_LUT[_train_id] = _label_id


def colorize(train_ids: np.ndarray, label_set: str = "") -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours of ``label_set`` (config.data.label_set;
    '' = the Cityscapes palette of the 19 train ids); ignore and unknown ids black."""
    return label_sets.palette_256(label_set)[np.asarray(train_ids).astype(np.uint8)]


def overlay(
    image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5, label_set: str = ""
) -> np.ndarray:
    """The colour map (``label_set``'s palette) blended over the RGB image: ``(1 - alpha) *
    image + alpha * colour``, rounded to the nearest level (integer arithmetic, so the bytes
    are the same everywhere)."""
    if image.shape[:2] != np.shape(train_ids):
        raise ValueError(f"image {image.shape[:2]} and prediction {np.shape(train_ids)} differ")
    weight = int(round(alpha * 256))
    colour = colorize(train_ids, label_set).astype(np.int32)
    blended = (256 - weight) * image.astype(np.int32) + weight * colour
    return ((blended + 128) >> 8).astype(np.uint8)


def to_cityscapes_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> Cityscapes label ids (what the benchmark server scores)."""
    return _LABEL_ID_LUT[np.asarray(train_ids).astype(np.uint8)]


def png_bytes(array: np.ndarray) -> bytes:
    """An 8-bit PNG of an (H, W) grey or (H, W, 3) RGB uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str, array: np.ndarray) -> None:
    """Writes ``array`` as a PNG at ``path`` (whole or not at all; parents created)."""
    paths.write_bytes(path, png_bytes(array))


def read_png(path: str) -> np.ndarray:
    """The pixels of a PNG (or any image Pillow reads) as a uint8 array."""
    with Image.open(io.BytesIO(paths.read_bytes(path))) as image:
        return np.asarray(image)
