"""What every training stage sets up the same way: mesh, initial variables, data, evaluation."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator

import jax
import ml_collections
from jax.sharding import Mesh

from ddb_jax import checkpoints, errors, models, paths
from ddb_jax.runtime import deadline, hosts


class MeshError(errors.UsageError, ValueError):
    """The devices cannot be arranged as config.mesh_devices / the batch size ask."""


def make_mesh(
    config: ml_collections.ConfigDict, batch_key: str = "batch_size", devices=None
) -> Mesh:
    """1-D 'data' mesh over all devices (or the first ``config.mesh_devices``), or over
    ``devices`` (the group the pipeline gave a stage that runs beside others).

    With several processes the mesh must hold the same number of devices of every
    process (each feeds its slice of the batch to its own devices), so
    ``config.mesh_devices`` is then 0 (all) or a multiple of the process count that
    takes the first devices of each process. ``batch_key`` (dotted, under ``config``)
    names the global batch the mesh must divide: every stage shares this one mesh.
    """
    count = jax.process_count()
    if config.mesh_devices < 0:
        raise MeshError(f"config.mesh_devices={config.mesh_devices}; use 0 (all) or more")
    if devices is not None:
        devices = list(devices)
    elif count == 1:
        devices = jax.devices()
        if config.mesh_devices:
            devices = devices[: config.mesh_devices]
    else:
        per_process = jax.local_device_count()
        if config.mesh_devices:
            if config.mesh_devices % count or config.mesh_devices // count > per_process:
                raise MeshError(
                    f"config.mesh_devices={config.mesh_devices} cannot be split evenly over "
                    f"{count} processes of {per_process} devices each; use 0 (all devices) "
                    f"or a multiple of {count} up to {count * per_process}"
                )
            per_process = config.mesh_devices // count
        by_process: dict[int, list] = {}
        for device in jax.devices():
            by_process.setdefault(device.process_index, []).append(device)
        devices = [d for p in sorted(by_process) for d in by_process[p][:per_process]]
    per_process = collections.Counter(d.process_index for d in devices)
    if len(set(per_process.values())) > 1:
        raise MeshError(
            f"the stage's devices are spread unevenly over processes {dict(per_process)}: "
            "each process feeds an equal slice of the batch to its own devices"
        )
    batch_size = functools.reduce(getattr, batch_key.split("."), config)
    if batch_size % len(devices):
        raise MeshError(
            f"config.{batch_key}={batch_size} is not divisible by the {len(devices)} "
            "devices of the mesh; change the batch size or set config.mesh_devices"
        )
    return Mesh(devices, ("data",))


def _read_init_from(init_from: str) -> tuple[dict, ml_collections.ConfigDict]:
    if not paths.exists(init_from):
        # Checked first (and named by its key): load_model_dir would only say that the
        # path is not a model directory, as if it existed.
        raise checkpoints.CheckpointError(
            f"config.init_from={init_from} does not exist (a model directory: "
            "tools/convert_checkpoint.py's output or a stage's export/)"
        )
    return checkpoints.load_model_dir(init_from)


def merge_variables(base: dict, loaded: dict) -> dict:
    """``base`` with every leaf present in ``loaded`` replaced (an ImageNet backbone, say)."""
    if not isinstance(loaded, dict):
        return jax.numpy.asarray(loaded, base.dtype) if hasattr(base, "dtype") else loaded
    merged = dict(base)
    for name, sub in loaded.items():
        if name not in base:
            raise KeyError(f"loaded variables have {name!r}, which the model lacks")
        merged[name] = merge_variables(base[name], sub)
    return merged


def initial_variables(config: ml_collections.ConfigDict, model, key: jax.Array) -> dict:
    """Random init, then ``config.init_from`` (ImageNet backbone or a whole model) on top.

    A whole model must supply every tensor of the model; a backbone-only directory
    (ImageNet weights) every tensor of the backbone: missing, unexpected and mis-shaped
    tensors are listed with the directory, so weights are never silently left random.
    """
    if config.init_from:
        with deadline.storage(config.init_from, "reading config.init_from"):
            loaded, stored_cfg = _read_init_from(config.init_from)
    variables = jax.device_get(models.init_variables(model, key))
    if not config.init_from:
        return variables
    is_backbone = models.backbone_predicate(model)
    whole = any(not is_backbone(name) for name in loaded.get("params", {}))
    checked = checkpoints.ARCHITECTURE_KEYS if whole else ("backbone", "mit_layout")
    setting = checkpoints.model_setting
    diffs = [k for k in checked if setting(stored_cfg, k) != setting(config.model, k)]
    if diffs:
        raise checkpoints.CheckpointError(
            f"config.init_from={config.init_from} was built for another model: "
            + ", ".join(
                f"model.{k} {setting(stored_cfg, k)!r} vs {setting(config.model, k)!r}"
                for k in diffs
            )
        )
    wanted = variables
    if not whole:  # backbone-only (ImageNet weights): compare the backbone's modules
        wanted = {
            collection: {name: v for name, v in tree.items() if is_backbone(name)}
            for collection, tree in variables.items()
        }
        wanted = {k: v for k, v in wanted.items() if v}
    checkpoints.check_tensors(
        wanted, loaded, f"config.init_from={config.init_from} does not fit the model"
    )
    return merge_variables(variables, loaded)


def batch_stream(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable[[int], Iterator]:
    """``make_batches(start_step)``: global batches (sharded over 'data') from ``start_step``.

    Global batch k feeds step k + 1; the stream starts at ``start_step`` without decoding
    the batches before it (element k is a function of (seed, k)). Each process of the mesh
    reads its own contiguous slice of every global batch.
    """
    from input_pipeline import daf as daf_data
    from input_pipeline import proda as proda_data
    from input_pipeline import sharding as data_sharding
    from input_pipeline import train as train_data

    stage_hosts = hosts.Hosts.of(mesh)
    per_host_batch = config.batch_size // stage_hosts.count

    def make_batches(start_step: int) -> Iterator[dict]:
        slicing = dict(process_index=stage_hosts.index, process_count=stage_hosts.count,
                       start_batch=start_step)  # fmt: skip
        if config.stage in daf_data.KINDS:  # DAF/IDA's pseudo-labelled and split streams
            dataset = daf_data.make_daf_dataset(
                config.stage, config.data, config.daf, per_host_batch, config.seed, **slicing
            )
        elif config.stage in proda_data.KINDS:  # ProDA's own loaders and its label files
            dataset = proda_data.make_proda_dataset(
                config.stage, config.data, config.proda, per_host_batch, config.seed, **slicing
            )
        else:
            dataset = train_data.make_train_dataset(
                config.data, per_host_batch, config.seed, **slicing
            )
        for batch in dataset.as_numpy_iterator():
            yield data_sharding.to_global(batch, mesh)

    return make_batches


def student_evaluator(
    config: ml_collections.ConfigDict, apply_fn: Callable, stage_hosts: hosts.Hosts | None = None
) -> Callable:
    """``evaluate(variables) -> {target: mIoU, ..., 'miou': mean over targets}``, on this
    process's first device of the stage (each process of the stage evaluates its slice of
    the files)."""

    def evaluate(variables) -> dict:
        from ddb_jax.evaluation import eval_stage, evaluate

        results = eval_stage.evaluate_targets(apply_fn, variables, config, stage_hosts=stage_hosts)
        summary = {name: float(r["miou"]) for name, r in results.items()}
        summary["miou"] = sum(summary.values()) / len(summary)
        summary.update(evaluate.protocol_scalars(results))  # '<target>/<protocol>': mIoU
        return summary

    return evaluate
