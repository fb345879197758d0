"""Stage 'evaluate': a model directory on each target's validation set, per-class IoU tables.

Used for converted PyTorch checkpoints (configs/test_cityscapes.py) and for our own
stages. Tables are printed and written to ``workdir/eval_<target>.md`` and
``workdir/eval_results.json``.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddb_jax import checkpoints, evaluate, labels, models


def load_for_evaluation(model_dir: str, config: ml_collections.ConfigDict):
    """(apply_fn, variables) of a model directory, refusing another class count."""
    variables, stored = checkpoints.load_model_dir(model_dir)
    if stored.num_classes != config.model.num_classes:
        raise checkpoints.CheckpointError(
            f"{model_dir} predicts {stored.num_classes} classes but config.model.num_classes is "
            f"{config.model.num_classes}"
        )
    if "decode_head" not in variables.get("params", {}):
        raise checkpoints.CheckpointError(
            f"{model_dir} holds only a backbone (an ImageNet file?); it cannot be evaluated"
        )
    stored.dtype = config.model.dtype
    model = models.build_model(stored)
    return model.apply, variables


def sum_over_processes(confusion: np.ndarray) -> np.ndarray:
    """The sum of every process's int64 confusion matrix (the identity on one process).

    JAX collectives run in 32 bits (x64 off) and a matrix entry can pass 2**31 pixels
    (Mapillary's 2000 validation images), so the counts travel as two 31-bit halves.
    """
    if jax.process_count() == 1:
        return confusion
    confusion = np.asarray(confusion, np.int64)
    if confusion.min() < 0 or confusion.max() >= 2**62:
        raise ValueError("confusion counts outside 0..2**62 cannot be gathered")
    halves = np.stack([confusion >> 31, confusion & (2**31 - 1)]).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(halves), np.int64)
    return (gathered[:, 0].sum(0) << 31) + gathered[:, 1].sum(0)


def host_local(variables):
    """A copy of (replicated, possibly multi-host) variables on this host's first device.

    Each host evaluates its own slice of the validation set with a purely local program;
    only the confusion matrices are combined across hosts.
    """
    if jax.process_count() == 1:
        return variables
    return jax.device_put(jax.device_get(variables), jax.local_devices()[0])


def prediction_writer(out_dir: str):
    """``on_prediction`` for :func:`evaluate.evaluate`: each prediction as a Cityscapes-palette
    PNG ``out_dir/<image name>`` (every process writes the files of its own slice)."""
    from PIL import Image

    palette = labels.palette_256()
    os.makedirs(out_dir, exist_ok=True)

    def write(batch, prediction: np.ndarray) -> None:
        for name, train_ids in zip(batch["name"], prediction, strict=True):
            base = os.path.splitext(name.decode() if isinstance(name, bytes) else str(name))[0]
            path = os.path.join(out_dir, f"{base}.png")
            Image.fromarray(palette[train_ids.astype(np.uint8)]).save(f"{path}.tmp.png")
            os.replace(f"{path}.tmp.png", path)

    return write


def evaluate_targets(
    apply_fn, variables, config: ml_collections.ConfigDict, predictions_dir: str | None = None
) -> dict:
    """mIoU per target dataset (each evaluated separately) plus their mean.

    With several processes each evaluates its slice of the files and the confusion
    matrices are summed over processes; every process returns the same result.
    ``predictions_dir``: also write colourised predictions to ``<dir>/<target>/``.
    """
    from input_pipeline import evaluation as eval_data

    variables = host_local(variables)
    results = {}
    for name in config.data.target:
        dataset = eval_data.make_eval_dataset(
            config.data,
            name,
            split=config.eval.split,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        result = evaluate.evaluate(
            apply_fn,
            variables,
            dataset.as_numpy_iterator(),
            config.model.num_classes,
            mode=config.eval.mode,
            crop=config.eval.crop_size,
            stride=config.eval.stride,
            flip=config.eval.flip,
            on_prediction=(
                prediction_writer(os.path.join(predictions_dir, name)) if predictions_dir else None
            ),
        )
        if jax.process_count() > 1:
            confusion = sum_over_processes(result["confusion"])
            result = evaluate.iou_from_confusion(confusion)
            result["confusion"] = confusion
        results[name] = result
    return results


def summarize(results: dict) -> dict:
    """JSON-friendly {target: {'miou', 'iou': {class: value}}} plus the mean over targets."""
    summary = {
        name: {
            "miou": r["miou"],
            "aacc": r["aacc"],
            "iou": dict(zip(labels.CITYSCAPES_CLASSES, map(float, r["iou"]), strict=False)),
        }
        for name, r in results.items()
    }
    if len(results) > 1:
        summary["mean"] = {"miou": sum(r["miou"] for r in results.values()) / len(results)}
    return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    if not config.checkpoint:
        raise ValueError("stage 'evaluate' needs --config.checkpoint=MODEL_DIR")
    apply_fn, variables = load_for_evaluation(config.checkpoint, config)
    variables = jax.device_put(variables)
    predictions_dir = os.path.join(workdir, "predictions") if config.eval.save_predictions else None
    results = evaluate_targets(apply_fn, variables, config, predictions_dir)
    summary = summarize(results)
    if jax.process_index() != 0:  # every process has the same results; one writes them
        return summary
    os.makedirs(workdir, exist_ok=True)
    for name, result in results.items():
        table = evaluate.format_iou_table(result, title=f"{name} ({config.checkpoint})")
        print(table)
        with open(os.path.join(workdir, f"eval_{name}.md"), "w") as f:
            f.write(table + "\n")
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("evaluation: %s", {k: v["miou"] for k, v in summary.items()})
    return summary
