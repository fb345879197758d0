"""The prototype table on disk: ``prototypes.npz`` written by stage 'prototypes', read by CKD.

    prototypes  (K, C) float32   class centroids of the model's decode-head feature
    counts      (K,)   float32   image vectors averaged into each row (capped at 3000,
                                 docs/method.md §1.4)
    model_dir   ()     str       the model they were computed with (provenance)

Written whole or not at all (:mod:`ddb_jax.paths`), so a reader never sees half a table.
A table
converted from the reference's ``.pth`` (:func:`load_reference_pth`, which stores no
counts) has count 0 for all-zero rows (a class never seen) and -1 (unknown) elsewhere.
"""

from __future__ import annotations

import io

import numpy as np

from ddb_jax import errors, paths

PROTOTYPES_FILE = "prototypes.npz"
UNKNOWN_COUNT = -1.0


class PrototypeError(errors.InputError, ValueError):
    """A prototype file is missing, unreadable or does not fit the model."""


def save_prototypes(path: str, table, counts, model_dir: str = "") -> None:
    """Atomically writes the table and counts (and the model they describe) to ``path``."""
    table = np.asarray(table, np.float32)
    counts = np.asarray(counts, np.float32)
    if table.ndim != 2 or counts.shape != table.shape[:1]:
        raise ValueError(f"prototype table {table.shape} and counts {counts.shape} do not fit")
    paths.save_npz(path, prototypes=table, counts=counts, model_dir=np.asarray(model_dir))


def load_prototypes(
    path: str, num_classes: int, channels: int | None = None, produced_by: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """(table (K, C), counts (K,)) from ``path``, checked against the model's K and C.

    ``produced_by`` names what writes the file (a pipeline stage), for the error message.
    """
    hint = f" (it is written by {produced_by})" if produced_by else ""
    if not paths.isfile(path):
        raise PrototypeError(f"prototype file {path!r} does not exist{hint}")
    try:
        with np.load(io.BytesIO(paths.read_bytes(path))) as data:
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


def load_reference_pth(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(table (K, C), counts (K,)) from a file of the reference's ``cal_prototype.py``.

    That tool saves only the table, ``torch.save(objective_vectors)`` (a (19, 256) float
    tensor, often on a GPU); counts are 0 for all-zero rows and ``UNKNOWN_COUNT`` otherwise.
    torch is imported here only (a test dependency); the file is loaded tensors-only.
    """
    try:
        import torch
    except ImportError as err:
        raise PrototypeError(
            f"reading {path} needs PyTorch, which is not installed: pip install torch==2.13.0"
        ) from err
    if not paths.isfile(path):
        raise PrototypeError(f"reference prototype file {path!r} does not exist")
    try:
        data = io.BytesIO(paths.read_bytes(path))
        value = torch.load(data, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        first = str(err).splitlines()[0] if str(err) else ""
        raise PrototypeError(
            f"{path} is not a readable PyTorch file ({type(err).__name__}: {first})"
        ) from err
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
        what = (
            f"a {tuple(value.shape)} {value.dtype} tensor"
            if isinstance(value, torch.Tensor)
            else f"a {type(value).__name__}"
        )
        raise PrototypeError(
            f"{path} holds {what}, not the (classes, channels) float tensor that the "
            "reference's cal_prototype.py saves"
        )
    table = value.detach().to(torch.float32).cpu().numpy()
    if not np.all(np.isfinite(table)):
        raise PrototypeError(f"{path} has non-finite prototypes")
    counts = np.where(np.any(table != 0, axis=1), UNKNOWN_COUNT, 0.0).astype(np.float32)
    return table, counts
