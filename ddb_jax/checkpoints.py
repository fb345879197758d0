"""Model directories: Flax variables (orbax) plus the model config that built them.

A *model directory* is what ``tools/convert_checkpoint.py`` writes and what every
stage can load as ``init_from``, a teacher, or a model to evaluate:

    OUT/model.json        model config + provenance (source file, prefix, kind)
    OUT/variables/        orbax StandardCheckpointer tree {'params', 'batch_stats'}

``model.json`` is written last and is what makes a directory a model directory: a crash
never leaves one that loads half-written (locally the directory is also written aside and
renamed into place, so an existing ``OUT`` is replaced only whole; on an object store,
where there is no atomic rename, see :func:`ddb_jax.paths.replace_dir`). Local paths and
URLs (``gs://``) alike, through :mod:`ddb_jax.paths`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ddb_jax import errors, paths

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


KEY_DEFAULTS = {"base_channels": 64}
# Held while an orbax save of this process is started, by model directories and train-state
# managers alike: orbax keys a save's signals by one process-wide operation id, which a save
# started at the same moment in another thread moves on (see ddb_jax.train.checkpointing).
SAVE_START = threading.Lock()


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: model directories are written by process 0
    only and read by each process on its own, so no cross-process barrier may run."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"model_dir_{me}"
        )
    )


class CheckpointError(errors.InputError, ValueError):
    """A model directory is missing, incomplete or does not fit the config."""


def save_model_dir(
    out_dir: str,
    variables: dict[str, Any],
    model_cfg: ml_collections.ConfigDict,
    provenance: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Writes ``variables`` and ``model_cfg`` to ``out_dir``, whole or detectably not."""
    out_dir = paths.resolve(out_dir)
    if paths.exists(paths.join(out_dir, MODEL_JSON)) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    host_variables = jax.device_get(variables)
    meta = {"model": model_cfg.to_dict(), "provenance": provenance or {}}

    def write(directory: str) -> None:
        checkpointer = _local_checkpointer()
        with SAVE_START:
            checkpointer.save(paths.join(directory, VARIABLES_DIR), host_variables)
        checkpointer.wait_until_finished()
        checkpointer.close()
        description = json.dumps(meta, indent=2, default=list)
        paths.write_text(paths.join(directory, MODEL_JSON), description)  # last: the marker

    paths.replace_dir(out_dir, write, MODEL_JSON)


def read_model_config(model_dir: str) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
    """The model config and provenance stored in a model directory."""
    path = paths.join(model_dir, MODEL_JSON)
    if not paths.isfile(path):
        raise CheckpointError(
            f"{model_dir} is not a model directory (no {MODEL_JSON}); convert a .pth with "
            "tools/convert_checkpoint.py or point at a stage's export/ directory"
        )
    try:
        meta = json.loads(paths.read_bytes(path))
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
    path = paths.join(paths.resolve(model_dir), VARIABLES_DIR)
    if not paths.isdir(path):
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
