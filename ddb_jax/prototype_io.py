"""The prototype table on disk: ``prototypes.npz`` written by stage 'prototypes', read by CKD.

    prototypes  (K, C) float32   class centroids of the model's decode-head feature
    counts      (K,)   float32   image vectors averaged into each row (capped at 3000, §1.4)
    model_dir   ()     str       the model they were computed with (provenance)

Written to a temporary file and renamed, so a reader never sees half a table.
"""

from __future__ import annotations

import os

import numpy as np

PROTOTYPES_FILE = "prototypes.npz"


class PrototypeError(ValueError):
    """A prototype file is missing, unreadable or does not fit the model."""


def save_prototypes(path: str, table, counts, model_dir: str = "") -> None:
    """Atomically writes the table and counts (and the model they describe) to ``path``."""
    table = np.asarray(table, np.float32)
    counts = np.asarray(counts, np.float32)
    if table.ndim != 2 or counts.shape != table.shape[:1]:
        raise ValueError(f"prototype table {table.shape} and counts {counts.shape} do not fit")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, prototypes=table, counts=counts, model_dir=np.asarray(model_dir))
    os.replace(tmp, path)


def load_prototypes(
    path: str, num_classes: int, channels: int | None = None, produced_by: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """(table (K, C), counts (K,)) from ``path``, checked against the model's K and C.

    ``produced_by`` names what writes the file (a pipeline stage), for the error message.
    """
    hint = f" (it is written by {produced_by})" if produced_by else ""
    if not os.path.isfile(path):
        raise PrototypeError(f"prototype file {path!r} does not exist{hint}")
    try:
        with np.load(path) as data:
            table = np.asarray(data["prototypes"], np.float32)
            counts = np.asarray(data["counts"], np.float32)
    except (OSError, ValueError, KeyError) as err:
        raise PrototypeError(f"{path} is not a prototype file{hint}: {err}") from err
    expected = (num_classes, channels if channels is not None else table.shape[-1])
    if table.shape != expected:
        raise PrototypeError(
            f"{path} holds a {table.shape[0]} x {table.shape[-1]} table but the model needs "
            f"{expected[0]} classes x {expected[1]} feature channels"
        )
    if not np.all(np.isfinite(table)):
        raise PrototypeError(f"{path} has non-finite prototypes")
    return table, counts
