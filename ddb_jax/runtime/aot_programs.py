"""Compile-only check of a stage's evaluation program for a named target.

The evaluate stage and the training loop's evaluations run
:func:`ddb_jax.evaluation.evaluate.batch_confusion` on one device per process, one image at a
time: the forward (whole, sliding windows as one batch, or ADVENT's corners-aligned whole),
the resize to the label's size, the softmax and the confusion matrix. This compiles that
very function for the first device of a target (:mod:`ddb_jax.runtime.aot`) with the
config's ``eval`` settings, an image of ``image_size`` (after the eval scale; Cityscapes:
512x1024 for the reference's test pipeline, 1024x2048 at full resolution) and a label of
``label_size`` (the stored labels: 1024x2048), and reports the same figures as the training
step's check.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import SingleDeviceSharding

from ddb_jax.runtime import aot


def compile_evaluation(
    config: ml_collections.ConfigDict,
    target: str,
    image_size: tuple[int, int],
    label_size: tuple[int, int],
    compiler_options: dict | None = None,
) -> dict[str, Any]:
    """Compiles ``config``'s evaluation of one ``image_size`` image against a ``label_size``
    label for one device of ``target``; the report (JSON-able, per device)."""
    from ddb_jax import models
    from ddb_jax.evaluation import evaluate

    spec = aot.get_target(target)
    device = aot.target_devices(spec)[0]
    start = time.perf_counter()
    model = models.build_model(config.model)
    sharding = SingleDeviceSharding(device)
    variables = aot.with_sharding(
        models.variable_shapes(model, tuple(config.data.crop_size)), sharding
    )
    image = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32, sharding=sharding)
    label = jax.ShapeDtypeStruct((1, *label_size), jnp.int32, sharding=sharding)
    settings = {
        "mode": config.eval.mode, "crop": tuple(config.eval.crop_size),
        "stride": tuple(config.eval.stride), "flip": bool(config.eval.flip),
    }  # fmt: skip
    lowered = evaluate.batch_confusion.lower(
        variables, image, label, apply_fn=model.apply,
        num_classes=config.model.num_classes, **settings,
    )  # fmt: skip
    lowered_s = time.perf_counter() - start
    compiled = lowered.compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - start - lowered_s
    return {
        "target": {**dataclasses.asdict(spec), "devices_used": 1},
        "program": "evaluation",
        "model": {k: config.model.get(k) for k in ("backbone", "head", "dtype")},
        "eval": {**settings, "crop": list(settings["crop"]), "stride": list(settings["stride"])},
        "image_size": list(image_size),
        "label_size": list(label_size),
        "predicted": {
            "variables_bytes": aot.tree_bytes(variables),
            "input_bytes": aot.tree_bytes((image, label)),
            "in_layouts": aot.arguments_in_layouts(
                {"variables": variables, "image": image, "label": label}, compiled
            ),
        },
        **aot.program_figures(compiled, spec),
        "lower_s": round(lowered_s, 2),
        "compile_s": round(compile_s, 2),
        "jax": jax.__version__,
    }


def markdown(report: dict[str, Any]) -> str:
    """The evaluation report as a markdown table."""
    target, model, settings = report["target"], report["model"], report["eval"]
    mode = settings["mode"]
    if mode == "slide":
        mode += f" {settings['crop']} windows, stride {settings['stride']}"
    rows = [
        ("target", f"{target['name']}, one device ({target['device']})"),
        ("evaluation", f"{model['backbone']} + {model['head']}, {model['dtype']}: {mode}"
                       + (", flipped too" if settings["flip"] else "")),
        ("image / label", f"{report['image_size']} / {report['label_size']}"),
        *aot.figure_rows(report),
    ]  # fmt: skip
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)
