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
import re
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store

from ddb_jax import errors, paths
from ddb_jax.runtime import hosts

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


KEY_DEFAULTS = {"base_channels": 64}
# Held while an orbax save of this process is started, by model directories and train-state
# managers alike: orbax keys a save's signals by one process-wide operation id, which a save
# started at the same moment in another thread moves on (see ddb_jax.train.checkpointing).
SAVE_START = threading.Lock()


# Orbax's asynchronous directory creation signals between processes under keys named by the
# process-wide operation id alone (not the barrier prefix): the saves of two stages running
# on different processes of one job (or a model directory written by one process) would
# share and delete each other's keys, and a save would wait forever. The directories of a
# save are created in its blocking part instead (the writes stay asynchronous).
def async_options() -> ocp.AsyncOptions:
    """Orbax's async options with directories created synchronously (a new object: orbax
    edits the one it gets)."""
    return ocp.AsyncOptions(create_directories_asynchronously=False)


MIN_REPLICA_SLICE_BYTES = 256 * 1024  # see ddb_jax.train.checkpointing
_ARRAY_HANDLER_PRIMARY: list[int] = []  # the primary of the jax.Array handler we registered


def use_array_handler(primary_host: int) -> None:
    """Registers orbax's jax.Array handler as orbax does by default, but for
    ``primary_host``, the process that writes each array's metadata (orbax's default
    handler has process 0), and with replica slices of at least MIN_REPLICA_SLICE_BYTES.

    The primary is the first process of the stage this process runs (the pipeline may run
    a stage on processes 2 and 3 of a job). Registered again only when that changes (a
    process runs one stage at a time), so a handler the user's own code registers stays."""
    if _ARRAY_HANDLER_PRIMARY == [primary_host]:
        return
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            primary_host=primary_host,
            array_metadata_store=array_metadata_store.Store(primary_host=primary_host),
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        ),
        override=True,
    )
    _ARRAY_HANDLER_PRIMARY[:] = [primary_host]


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: model directories are written by process 0
    only and read by each process on its own, so no cross-process barrier may run."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        async_options=async_options(),
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"model_dir_{me}"
        ),
    )


class CheckpointError(errors.InputError, ValueError):
    """A model directory is missing, incomplete or does not fit the config."""


def save_model_dir(
    out_dir: str,
    variables: dict[str, Any],
    model_cfg: ml_collections.ConfigDict,
    provenance: dict[str, str] | None = None,
    overwrite: bool = False,
    stage_hosts: hosts.Hosts | None = None,
) -> None:
    """Writes ``variables`` and ``model_cfg`` to ``out_dir``, whole or detectably not.

    By this process alone (process 0 of a multi-host job), or, with ``stage_hosts`` of a
    stage that runs on some of a job's processes, by those processes together, each
    passing the stage's replicated arrays: orbax writes numpy arrays from process 0 only
    and refuses one process's own arrays in a multi-host job.
    """
    out_dir = paths.resolve(out_dir)
    if paths.exists(paths.join(out_dir, MODEL_JSON)) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    meta = {"model": model_cfg.to_dict(), "provenance": provenance or {}}
    if hosts.is_group(stage_hosts):
        _save_together(out_dir, variables, meta, stage_hosts)
        return
    host_variables = jax.device_get(variables)

    def write(directory: str) -> None:
        checkpointer = _local_checkpointer()
        with SAVE_START:
            checkpointer.save(paths.join(directory, VARIABLES_DIR), host_variables)
        checkpointer.wait_until_finished()
        checkpointer.close()
        description = json.dumps(meta, indent=2, default=list)
        paths.write_text(paths.join(directory, MODEL_JSON), description)  # last: the marker

    paths.replace_dir(out_dir, write, MODEL_JSON)


def _save_together(out_dir: str, variables, meta: dict, stage_hosts: hosts.Hosts) -> None:
    """The stage's processes write ``out_dir`` in place (its primary clears the old one
    first and writes ``model.json`` last, so a reader that finds it finds a complete
    directory); orbax's barriers and primary are the stage's."""
    key = "model_dir_" + re.sub(r"[^A-Za-z0-9]+", "_", out_dir)
    if stage_hosts.is_primary:
        paths.remove(paths.join(out_dir, MODEL_JSON))
        paths.rmtree(out_dir)
    stage_hosts.barrier(f"{key} cleared")
    use_array_handler(stage_hosts.primary)
    checkpointer = ocp.StandardCheckpointer(
        async_options=async_options(),
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=stage_hosts.primary,
            active_processes=set(stage_hosts.processes),
            barrier_sync_key_prefix=key,
        ),
    )
    with SAVE_START:
        checkpointer.save(paths.join(out_dir, VARIABLES_DIR), variables)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if stage_hosts.is_primary:
        paths.write_text(paths.join(out_dir, MODEL_JSON), json.dumps(meta, indent=2, default=list))
    stage_hosts.barrier(f"{key} written")


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
            # Into numpy arrays of the stored shapes: a directory written by several processes
            # records their devices, which orbax would otherwise insist on restoring onto.
            stored = checkpointer.metadata(path).item_metadata
            target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), stored)
            variables = checkpointer.restore(path, target)
    except Exception as err:
        raise CheckpointError(f"{path} could not be restored: {err}") from err
    return jax.tree_util.tree_map(np.asarray, variables), model_cfg


# Keys of config.model that fix the architecture (dtype, remat and dropout do not).
ARCHITECTURE_KEYS = (
    "backbone", "head", "num_classes", "base_channels", "head_channels", "mit_layout",
    "hrda.enabled", "advent_heads",
)  # fmt: skip


def model_setting(model_cfg: ml_collections.ConfigDict, key: str):
    """``model_cfg``'s value of an architecture key; 'hrda.enabled' is False and
    'advent_heads' 1 in model directories written before they existed."""
    if key == "hrda.enabled":
        return bool((model_cfg.get("hrda") or {}).get("enabled", False))
    if key == "advent_heads":
        return int(model_cfg.get("advent_heads", 1))
    return model_cfg.get(key)


def check_compatible(
    stored: ml_collections.ConfigDict, wanted: ml_collections.ConfigDict, what: str
) -> None:
    """Refuses a model directory whose architecture differs from the config's."""
    diffs = [
        f"config.model.{k}: checkpoint {model_setting(stored, k)!r} vs config "
        f"{model_setting(wanted, k)!r}"
        for k in ARCHITECTURE_KEYS
        if (k in stored or "." in k) and model_setting(stored, k) != model_setting(wanted, k)
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
