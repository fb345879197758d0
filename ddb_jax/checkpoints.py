"""Model directories: Flax variables (orbax) plus the model config that built them.

A *model directory* is what ``tools/convert_checkpoint.py`` writes and what every
stage can load as ``init_from``, a teacher, or a model to evaluate:

    OUT/model.json        model config + provenance (source file, prefix, kind)
    OUT/variables/        orbax StandardCheckpointer tree {'params', 'batch_stats'}

It is written into a temporary sibling and renamed into place, so a crash never
leaves a half-written ``OUT`` and an existing ``OUT`` is replaced only whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


KEY_DEFAULTS = {"base_channels": 64}


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: model directories are written by process 0
    only and read by each process on its own, so no cross-process barrier may run."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"model_dir_{me}"
        )
    )


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or does not fit the config."""


def save_model_dir(
    out_dir: str,
    variables: dict[str, Any],
    model_cfg: ml_collections.ConfigDict,
    provenance: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Writes ``variables`` and ``model_cfg`` to ``out_dir`` atomically."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        checkpointer = _local_checkpointer()
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), jax.device_get(variables))
        checkpointer.wait_until_finished()
        checkpointer.close()
        meta = {"model": model_cfg.to_dict(), "provenance": provenance or {}}
        with open(os.path.join(staging, MODEL_JSON), "w") as f:
            json.dump(meta, f, indent=2, default=list)
        if os.path.exists(out_dir):
            trash = f"{staging}.old"
            os.rename(out_dir, trash)
            os.rename(staging, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_model_config(model_dir: str) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
    """The model config and provenance stored in a model directory."""
    path = os.path.join(model_dir, MODEL_JSON)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{model_dir} is not a model directory (no {MODEL_JSON}); convert a .pth with "
            "tools/convert_checkpoint.py or point at a stage's export/ directory"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
        model = meta["model"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{path} is not a valid model description: {err}") from err
    # Keys added after a directory was written take the value every older model had.
    for key, value in KEY_DEFAULTS.items():
        model.setdefault(key, value)
    return ml_collections.ConfigDict(model), meta.get("provenance", {})


def load_model_dir(model_dir: str) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """Restores (variables as numpy, model config) from a model directory."""
    model_cfg, _ = read_model_config(model_dir)
    path = os.path.join(os.path.abspath(model_dir), VARIABLES_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{model_dir}: missing {VARIABLES_DIR}/ (incomplete write?)")
    try:
        with _local_checkpointer() as checkpointer:
            variables = checkpointer.restore(path)
    except Exception as err:
        raise CheckpointError(f"{path} could not be restored: {err}") from err
    return jax.tree_util.tree_map(np.asarray, variables), model_cfg


# Keys of config.model that fix the architecture (dtype, remat and dropout do not).
ARCHITECTURE_KEYS = (
    "backbone", "head", "num_classes", "base_channels", "head_channels", "mit_layout",
)  # fmt: skip


def check_compatible(
    stored: ml_collections.ConfigDict, wanted: ml_collections.ConfigDict, what: str
) -> None:
    """Refuses a model directory whose architecture differs from the config's."""
    diffs = [
        f"config.model.{k}: checkpoint {stored.get(k)!r} vs config {wanted.get(k)!r}"
        for k in ARCHITECTURE_KEYS
        if k in stored and stored.get(k) != wanted.get(k)
    ]
    if diffs:
        raise CheckpointError(f"{what} does not match the config:\n  " + "\n  ".join(diffs))


def tensor_shapes(tree) -> dict[str, tuple[int, ...]]:
    """Every leaf's path (``['params']['backbone']...``) and shape."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_tensors(wanted, loaded, what: str) -> None:
    """Refuses ``loaded`` unless it has exactly the tensors of ``wanted``, shape for shape.

    A clear error here (missing, unexpected and mis-shaped tensors listed after ``what``)
    instead of weights silently left random, or an opaque one when a step is traced.
    """
    want, have = tensor_shapes(wanted), tensor_shapes(loaded)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = [f"{k} {have[k]} vs model {want[k]}" for k in sorted(set(want) & set(have))
              if have[k] != want[k]]  # fmt: skip
    parts = [
        f"{label} ({len(keys)}): {', '.join(keys[:8])}"
        for label, keys in (
            ("missing tensors", missing),
            ("unexpected tensors", unexpected),
            ("shape conflicts", shapes),
        )
        if keys
    ]
    if parts:
        raise CheckpointError(f"{what}: " + "; ".join(parts))
