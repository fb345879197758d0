"""Stage 'evaluate': a model directory on each target's validation set, per-class IoU tables.

Used for converted PyTorch checkpoints (configs/eval_cityscapes.py) and for our own
stages. Tables are printed and written to ``workdir/eval_<target>.md`` and
``workdir/eval_results.json``.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ddb_jax import checkpoints, errors, label_sets, labels, models, paths
from ddb_jax.evaluation import evaluate
from ddb_jax.inference import label_images
from ddb_jax.runtime import deadline, hosts

RESULT_JSON = "result.json"  # as a training stage's (ddb_jax.train.workdir)


class EvaluateConfigError(errors.UsageError, ValueError):
    """Stage 'evaluate' is missing a setting."""


def load_for_evaluation(model_dir: str, config: ml_collections.ConfigDict):
    """(apply_fn, variables) of a model directory, refusing another class count."""
    variables, stored = checkpoints.load_model_dir(model_dir)
    if stored.num_classes != config.model.num_classes:
        raise checkpoints.CheckpointError(
            f"{model_dir} predicts {stored.num_classes} classes but config.model.num_classes is "
            f"{config.model.num_classes}"
        )
    stored.dtype = config.model.dtype
    model = models.build_model(stored)
    is_backbone = models.backbone_predicate(model)
    if all(is_backbone(name) for name in variables.get("params", {})):
        raise checkpoints.CheckpointError(
            f"{model_dir} holds only a backbone (an ImageNet file?); it cannot be evaluated"
        )
    return model.apply, variables


def load_ensemble(config: ml_collections.ConfigDict):
    """(apply_fn, variables) of ``config.checkpoint``, or with ``eval.ensemble_checkpoint``
    of both models as one: their logits weighted by ``eval.ensemble_weights`` and summed
    (ADVENT's AdvEnt + MinEnt evaluation, ``eval_UDA.py``: the weighted sum of the two
    upsampled logits; upsampling is linear, so summing first is the same)."""
    apply_fn, variables = load_for_evaluation(config.checkpoint, config)
    second = config.eval.get("ensemble_checkpoint", "")
    if not second:
        return apply_fn, variables
    weights = tuple(float(w) for w in config.eval.ensemble_weights)
    if len(weights) != 2:
        raise EvaluateConfigError(
            f"config.eval.ensemble_weights={weights}: one weight for config.checkpoint and one "
            "for config.eval.ensemble_checkpoint"
        )
    other_fn, other_variables = load_for_evaluation(second, config)

    def ensemble_fn(both, images, train=False):
        first_logits = apply_fn(both[0], images, train=train)["logits"]
        second_logits = other_fn(both[1], images, train=train)["logits"]
        return {"logits": weights[0] * first_logits + weights[1] * second_logits}

    return ensemble_fn, (variables, other_variables)


def sum_over_processes(confusion: np.ndarray, stage_hosts: hosts.Hosts) -> np.ndarray:
    """The sum of the int64 confusion matrices of the stage's processes (the identity for
    one process).

    JAX collectives run in 32 bits (x64 off) and a matrix entry can pass 2**31 pixels
    (Mapillary's 2000 validation images), so the counts travel as two 31-bit halves.
    """
    if stage_hosts.count == 1:
        return confusion
    confusion = np.asarray(confusion, np.int64)
    if confusion.min() < 0 or confusion.max() >= 2**62:
        raise ValueError("confusion counts outside 0..2**62 cannot be gathered")
    halves = np.stack([confusion >> 31, confusion & (2**31 - 1)]).astype(np.int32)
    gathered = np.asarray(stage_hosts.gather(halves), np.int64)
    return (gathered[:, 0].sum(0) << 31) + gathered[:, 1].sum(0)


def on_one_device(variables, device=None):
    """A copy of (replicated, possibly multi-host) variables on ``device`` (this host's
    first by default).

    Each host evaluates its own slice of the validation set with a program of one device
    (a replicated one would run the same images on every device of the mesh); only the
    confusion matrices are combined across hosts.
    """
    device = device if device is not None else jax.local_devices()[0]
    return jax.device_put(jax.device_get(variables), device)


def prediction_writer(out_dir: str, label_set: str = ""):
    """``on_prediction`` for :func:`evaluate.evaluate`: each prediction as a PNG in the palette
    of ``label_set`` (Cityscapes' by default) ``out_dir/<image name>`` (every process writes
    the files of its own slice)."""
    with deadline.storage(out_dir, "creating the predictions' folder"):
        paths.makedirs(out_dir)

    def write(batch, prediction: np.ndarray) -> None:
        for name, train_ids in zip(batch["name"], prediction, strict=True):
            base = os.path.splitext(name.decode() if isinstance(name, bytes) else str(name))[0]
            path = paths.join(out_dir, f"{base}.png")
            with deadline.storage(out_dir, f"writing {base}.png"):
                label_images.write_png(path, label_images.colorize(train_ids, label_set))

    return write


def evaluate_targets(
    apply_fn,
    variables,
    config: ml_collections.ConfigDict,
    predictions_dir: str | None = None,
    stage_hosts: hosts.Hosts | None = None,
) -> dict:
    """mIoU per target dataset (each evaluated separately) plus their mean.

    On the first device each process has in the stage's mesh (``stage_hosts``; default:
    every process and device). With several processes each evaluates its slice of the
    files and the confusion matrices are summed over the stage's processes; each of them
    returns the same result. ``predictions_dir``: also write colourised predictions to
    ``<dir>/<target>/``.
    """
    from input_pipeline import evaluation as eval_data

    stage_hosts = stage_hosts or hosts.Hosts.everyone()
    variables = on_one_device(variables, stage_hosts.local_devices[0])
    results = {}
    for name in config.data.target:
        dataset = eval_data.make_eval_dataset(
            config.data,
            name,
            split=config.eval.split,
            process_index=stage_hosts.index,
            process_count=stage_hosts.count,
        )
        result = evaluate.evaluate(
            apply_fn,
            variables,
            deadline.bounded(
                dataset.as_numpy_iterator(),
                str(config.data.root),
                f"reading {name}'s {config.eval.split} images",
            ),  # fmt: skip
            config.model.num_classes,
            mode=config.eval.mode,
            crop=config.eval.crop_size,
            stride=config.eval.stride,
            flip=config.eval.flip,
            on_prediction=(
                prediction_writer(
                    paths.join(predictions_dir, name), config.data.get("label_set", "")
                )
                if predictions_dir
                else None
            ),
        )
        if stage_hosts.count > 1:
            confusion = sum_over_processes(result["confusion"], stage_hosts)
            result = evaluate.iou_from_confusion(confusion)
            result["confusion"] = confusion
        # The setting's extra mIoUs (SYNTHIA's 16/13 classes, 7 categories), same matrix.
        result["protocols"] = evaluate.protocol_scores(
            result["confusion"], config.eval.miou_protocols
        )
        results[name] = result
    return results


def summarize(results: dict, class_names: tuple[str, ...] = labels.CITYSCAPES_CLASSES) -> dict:
    """JSON-friendly {target: {'miou', 'iou': {class: value}}} plus the mean over targets, and
    each target's extra mIoUs ('protocols') when the setting asks for them. ``class_names``:
    the label set's (label_sets.class_names(config.data.label_set))."""
    summary = {
        name: {
            "miou": r["miou"],
            "aacc": r["aacc"],
            "iou": dict(zip(class_names, map(float, r["iou"]), strict=False)),
        }
        for name, r in results.items()
    }
    for name, r in results.items():
        if r.get("protocols"):  # {protocol: {'title', 'miou', 'iou': {class or category: IoU}}}
            summary[name]["protocols"] = r["protocols"]
    if len(results) > 1:
        summary["mean"] = {"miou": sum(r["miou"] for r in results.values()) / len(results)}
    return summary


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    if not config.checkpoint:
        raise EvaluateConfigError(
            "stage 'evaluate' needs a model: --config.checkpoint=MODEL_DIR (a stage's export/ "
            "or a .pth converted with tools/convert_checkpoint.py)"
        )
    with deadline.storage(config.checkpoint, "reading the model"):
        apply_fn, variables = load_ensemble(config)
    predictions_dir = paths.join(workdir, "predictions") if config.eval.save_predictions else None
    mesh = Mesh(np.asarray(devices if devices else jax.devices()), ("data",))
    stage_hosts = hosts.Hosts.of(mesh)
    results = evaluate_targets(apply_fn, variables, config, predictions_dir, stage_hosts)
    class_names = label_sets.class_names(config.data.get("label_set", ""))
    summary = summarize(results, class_names)
    if not stage_hosts.is_primary:  # every process has the same results; one writes them
        return summary
    # The same scalars as a training stage's result.json: the pipeline's summary row.
    scalars = {name: r["miou"] for name, r in results.items()}
    scalars["miou"] = sum(scalars.values()) / len(scalars)
    scalars.update(evaluate.protocol_scalars(results))
    with deadline.storage(workdir, "writing the evaluation's results"):
        paths.makedirs(workdir)
        for name, result in results.items():
            table = evaluate.format_iou_table(
                result, class_names, title=f"{name} ({config.checkpoint})"
            )
            print(table)
            paths.write_text(paths.join(workdir, f"eval_{name}.md"), table + "\n")
        paths.write_json(paths.join(workdir, "eval_results.json"), summary)
        paths.write_json(paths.join(workdir, RESULT_JSON), {"step": None, **scalars})
    logging.info("evaluation: %s", {k: v["miou"] for k, v in summary.items()})
    return summary
