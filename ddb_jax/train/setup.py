"""What every training stage sets up the same way: mesh, model, initial state, data, evaluation."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddb_jax import checkpoints, models
from ddb_jax.train import optim
from ddb_jax.train.state import TrainState, create_train_state, merge_variables


@dataclasses.dataclass
class Run:
    model: Any
    tx: Any
    state: TrainState
    mesh: Mesh
    replicated: NamedSharding
    batch_sharding: NamedSharding
    make_batches: Callable[[int], Iterator[dict]]
    evaluate_student: Callable[[TrainState], dict]


def build(model_cfg: ml_collections.ConfigDict):
    return models.build_model(model_cfg)


def make_mesh(config: ml_collections.ConfigDict, batch_key: str = "batch_size") -> Mesh:
    """1-D 'data' mesh over all devices (or the first ``config.mesh_devices``).

    With several processes the mesh must hold the same number of devices of every
    process (each feeds its slice of the batch to its own devices), so
    ``config.mesh_devices`` is then 0 (all) or a multiple of the process count that
    takes the first devices of each process. ``batch_key`` (dotted, under ``config``)
    names the global batch the mesh must divide: every stage shares this one mesh.
    """
    count = jax.process_count()
    if config.mesh_devices < 0:
        raise ValueError(f"config.mesh_devices={config.mesh_devices}; use 0 (all) or more")
    if count == 1:
        devices = jax.devices()
        if config.mesh_devices:
            devices = devices[: config.mesh_devices]
    else:
        per_process = jax.local_device_count()
        if config.mesh_devices:
            if config.mesh_devices % count or config.mesh_devices // count > per_process:
                raise ValueError(
                    f"config.mesh_devices={config.mesh_devices} cannot be split evenly over "
                    f"{count} processes of {per_process} devices each; use 0 (all devices) "
                    f"or a multiple of {count} up to {count * per_process}"
                )
            per_process = config.mesh_devices // count
        by_process: dict[int, list] = {}
        for device in jax.devices():
            by_process.setdefault(device.process_index, []).append(device)
        devices = [d for p in sorted(by_process) for d in by_process[p][:per_process]]
    batch_size = functools.reduce(getattr, batch_key.split("."), config)
    if batch_size % len(devices):
        raise ValueError(
            f"config.{batch_key}={batch_size} is not divisible by the {len(devices)} "
            "devices of the mesh; change the batch size or set config.mesh_devices"
        )
    return Mesh(devices, ("data",))


def initial_variables(config: ml_collections.ConfigDict, model, key: jax.Array) -> dict:
    """Random init, then ``config.init_from`` (ImageNet backbone or a whole model) on top."""
    variables = jax.device_get(models.init_variables(model, key))
    if not config.init_from:
        return variables
    loaded, stored_cfg = checkpoints.load_model_dir(config.init_from)
    keys = ("backbone",) if "decode_head" not in loaded.get("params", {}) else None
    checked = checkpoints.ARCHITECTURE_KEYS if keys is None else ("backbone", "mit_layout")
    diffs = [k for k in checked if stored_cfg.get(k) != config.model.get(k)]
    if diffs:
        raise checkpoints.CheckpointError(
            f"config.init_from={config.init_from} was built for another model: "
            + ", ".join(
                f"model.{k} {stored_cfg.get(k)!r} vs {config.model.get(k)!r}" for k in diffs
            )
        )
    check_same_tensors(variables, loaded, config.init_from)
    return merge_variables(variables, loaded)


def _paths_and_shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_same_tensors(model_vars: dict, loaded: dict, source: str) -> None:
    """Refuses an init whose tensors are not exactly the model's (or its backbone's).

    A whole model must supply every tensor of the model; a backbone-only directory
    (ImageNet weights) every tensor of the backbone. Missing, unexpected and mis-shaped
    tensors are listed with ``source``, so weights are never silently left random.
    """
    if "decode_head" in loaded.get("params", {}):
        wanted = model_vars
    else:  # backbone-only: compare the backbone subtrees
        wanted = {k: {"backbone": v["backbone"]} for k, v in model_vars.items() if "backbone" in v}
    want, have = _paths_and_shapes(wanted), _paths_and_shapes(loaded)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{label} tensors ({len(keys)}): {', '.join(keys[:8])}")
        if shapes:
            parts.append(
                "shape conflicts: "
                + ", ".join(f"{k} {have[k]} vs model {want[k]}" for k in shapes[:8])
            )
        raise checkpoints.CheckpointError(
            f"config.init_from={source} does not fit the model: " + "; ".join(parts)
        )


def prepare_run(config: ml_collections.ConfigDict) -> Run:
    """Mesh, model, optimiser, replicated initial state, sharded data and evaluation."""
    from input_pipeline import sharding as data_sharding
    from input_pipeline import train as train_data

    mesh = make_mesh(config)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    model = build(config.model)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = initial_variables(config, model, init_key)
    tx, _ = optim.make_optimizer(config.optim, config.num_steps)
    state = jax.device_put(create_train_state(variables, tx, state_key), replicated)
    per_host_batch = config.batch_size // jax.process_count()

    def make_batches(start_step: int) -> Iterator[dict]:
        # Global batch k feeds step k + 1; the stream starts at start_step without decoding
        # the batches before it (element k is a function of (seed, k)).
        dataset = train_data.make_train_dataset(
            config.data,
            per_host_batch,
            config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            start_batch=start_step,
        )
        for batch in dataset.as_numpy_iterator():
            yield data_sharding.to_global(batch, mesh)

    def evaluate_student(state: TrainState) -> dict:
        from ddb_jax import eval_stage

        results = eval_stage.evaluate_targets(model.apply, state.variables(), config)
        summary = {name: float(r["miou"]) for name, r in results.items()}
        summary["miou"] = sum(summary.values()) / len(summary)
        return summary

    return Run(model, tx, state, mesh, replicated, batch_sharding, make_batches, evaluate_student)
