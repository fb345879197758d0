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
from absl import logging

from ddb_jax import checkpoints, evaluate, models


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


def evaluate_targets(apply_fn, variables, config: ml_collections.ConfigDict) -> dict:
    """mIoU per target dataset (each evaluated separately) plus their mean."""
    from input_pipeline import evaluation as eval_data

    results = {}
    for name in config.data.target:
        dataset = eval_data.make_eval_dataset(config.data, name, split=config.eval.split)
        result = evaluate.evaluate(
            apply_fn,
            variables,
            dataset.as_numpy_iterator(),
            config.model.num_classes,
            mode=config.eval.mode,
            crop=config.eval.crop_size,
            stride=config.eval.stride,
            flip=config.eval.flip,
        )
        results[name] = result
    return results


def summarize(results: dict) -> dict:
    """JSON-friendly {target: {'miou', 'iou': {class: value}}} plus the mean over targets."""
    summary = {
        name: {
            "miou": r["miou"],
            "aacc": r["aacc"],
            "iou": dict(zip(evaluate.CITYSCAPES_CLASSES, map(float, r["iou"]), strict=False)),
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
    results = evaluate_targets(apply_fn, variables, config)
    os.makedirs(workdir, exist_ok=True)
    for name, result in results.items():
        table = evaluate.format_iou_table(result, title=f"{name} ({config.checkpoint})")
        print(table)
        with open(os.path.join(workdir, f"eval_{name}.md"), "w") as f:
            f.write(table + "\n")
    summary = summarize(results)
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("evaluation: %s", {k: v["miou"] for k, v in summary.items()})
    return summary
