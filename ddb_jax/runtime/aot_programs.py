"""Compile-only checks of the programs besides the train step: evaluation and the prototype pass.

The evaluate stage and the training loop's evaluations run
:func:`ddb_jax.evaluation.evaluate.batch_confusion` on one device per process, one image at a
time: the forward (whole, sliding windows as one batch, or ADVENT's corners-aligned whole),
the resize to the label's size, the softmax and the confusion matrix. This compiles that
very function for the first device of a target (:mod:`ddb_jax.runtime.aot`) with the
config's ``eval`` settings, an image of ``image_size`` (after the eval scale; Cityscapes:
512x1024 for the reference's test pipeline, 1024x2048 at full resolution) and a label of
``label_size`` (the stored labels: 1024x2048), and reports the same figures as the training
step's check. The prototype stage's pass
(:func:`ddb_jax.offline.prototype_stage.make_update_step`: a batch of target crops through
the segmentor, class-mean features, the table's ordered update) compiles over the whole
target, its batch (``prototypes.batch_size``) split over the devices as the stage splits it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from ddb_jax.runtime import aot, aot_figures, gpu_targets


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
    device = (aot.target_devices(spec) or jax.devices())[0]
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
    compiled, options = gpu_targets.compile_lowered(lowered, spec.platform, compiler_options)
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
            "in_layouts": aot_figures.arguments_in_layouts(
                {"variables": variables, "image": image, "label": label}, compiled
            ),
        },
        **aot_figures.program_figures(compiled, spec),
        "lower_s": round(lowered_s, 2),
        "compile_s": round(compile_s, 2),
        "compiler_options": options,
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
        *aot_figures.figure_rows(report),
    ]  # fmt: skip
    return aot_figures.table(rows)


def compile_prototypes(
    config: ml_collections.ConfigDict, target: str, compiler_options: dict | None = None
) -> dict[str, Any]:
    """Compiles the prototype pass's update of one global batch of ``config`` (crops of
    ``data.crop_size``, ``prototypes.batch_size`` of them) for ``target``; the report."""
    from ddb_jax import models
    from ddb_jax.offline import prototype_stage
    from ddb_jax.train import setup

    spec = aot.get_target(target)
    devices = aot.target_devices(spec) or jax.devices()
    start = time.perf_counter()
    mesh = setup.make_mesh(config, batch_key="prototypes.batch_size", devices=devices)
    replicated, data = (
        NamedSharding(mesh, PartitionSpec()),
        NamedSharding(mesh, PartitionSpec("data")),
    )
    model = models.build_model(config.model)
    crop, batch = tuple(config.data.crop_size), config.prototypes.batch_size
    variables = models.variable_shapes(model, crop)
    outputs = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((1, *crop, 3), jnp.float32), train=False), variables
    )
    classes, channels = outputs["logits"].shape[-1], outputs["feature"].shape[-1]
    table = jax.ShapeDtypeStruct((classes, channels), jnp.float32, sharding=replicated)
    counts = jax.ShapeDtypeStruct((classes,), jnp.float32, sharding=replicated)
    images = {
        "image": jax.ShapeDtypeStruct((batch, *crop, 3), jnp.float32, sharding=data),
        "valid": jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=data),
        "index": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data),
    }
    variables = aot.with_sharding(variables, replicated)
    step = prototype_stage.make_update_step(
        model.apply, int(config.prototypes.min_pixels), int(config.prototypes.count_cap), mesh,
        at_image_size=config.prototypes.get("mode", "ddb") == "ddb",
    )  # fmt: skip
    lowered = step.lower(variables, table, counts, images)
    lowered_s = time.perf_counter() - start
    compiled, options = gpu_targets.compile_lowered(lowered, spec.platform, compiler_options)
    compile_s = time.perf_counter() - start - lowered_s
    n = len(mesh.devices.flat)
    return {
        "target": dataclasses.asdict(spec),
        "program": "prototypes",
        "model": {k: config.model.get(k) for k in ("backbone", "head", "dtype")},
        "batch_size": batch,
        "batch_per_device": batch // n,
        "crop_size": list(crop),
        "mesh_devices": n,
        "predicted": {
            "variables_bytes": aot.tree_bytes(variables),
            "table_bytes": aot.tree_bytes((table, counts)),
            "batch_bytes_per_device": aot.tree_bytes(images) // n,
            "in_layouts": aot_figures.arguments_in_layouts(
                {"variables": variables, "table": table, "counts": counts, "batch": images},
                compiled,
            ),
        },
        **aot_figures.program_figures(compiled, spec),
        "lower_s": round(lowered_s, 2),
        "compile_s": round(compile_s, 2),
        "compiler_options": options,
        "jax": jax.__version__,
    }


def prototypes_markdown(report: dict[str, Any]) -> str:
    """The prototype pass's report as a markdown table."""
    target, model = report["target"], report["model"]
    rows = [
        ("target", f"{target['name']} ({target['topology']}, {target['device']})"),
        ("prototype pass", f"{model['backbone']} + {model['head']}, {model['dtype']}"),
        ("batch", f"{report['batch_size']} ({report['batch_per_device']} per device), "
                  f"crop {report['crop_size']}"),
        *aot_figures.figure_rows(report),
    ]  # fmt: skip
    return aot_figures.table(rows)
