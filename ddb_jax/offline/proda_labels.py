"""Stages 'proda_soft_labels' and 'proda_pseudo_labels': ProDA's offline pseudo-labels
(microsoft/ProDA ``generate_pseudo_label.py``), read by its training stages through
:mod:`input_pipeline.proda`.

The model in ``config.checkpoint`` runs in inference mode over every target training image,
whole, at ``data.proda_full_size`` (the reference's test-time size, Cityscapes' 1024 x
2048), without augmentation, ``config.batch_size`` images per global batch. Per image:

- ``proda_soft_labels`` (``--soft``): the softmax of the logits at the network's output
  resolution, ``<workdir>/soft_labels/<name>.npy``, float16 (h, w, K);
- ``proda_pseudo_labels`` (``--flip``): the softmax of the image's logits and of its
  mirror's, each resized to the image (bilinear, align_corners=True), the mirror's flipped
  back, averaged; the argmax as a train-id PNG ``<name>.png`` (uint8) and the maximum, the
  confidence, ``<name>_conf.npy`` (float16, the image's size).

``<name>`` is the image's file name without its extension. No threshold is applied here:
as in the reference, the stage that reads the labels ignores the pixels whose stored
confidence is <= ``data.proda_threshold`` (0.95; ``input_pipeline/proda.py``).

A re-run writes only the images whose files are missing (each file is written whole or not
at all); in a multi-host job each process writes the images of its slice of every batch.
``done`` is written last, once every process has finished, so a resumed pipeline knows the
stage finished. Differences from the reference: the soft labels are float16 in (h, w, K)
(the reference: float32 in (K, h, w)); no colour PNGs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from ddb_jax import checkpoints, errors, paths
from ddb_jax.inference import label_images
from ddb_jax.ops import resize_bilinear_corners
from ddb_jax.runtime import deadline, hosts

FOLDERS = {"proda_soft_labels": "soft_labels", "proda_pseudo_labels": "pseudo_labels"}
DONE = "done"  # written last: the stage finished
# The training stage kind that reads each folder (its file names: input_pipeline/proda.py).
READERS = {"proda_soft_labels": "proda", "proda_pseudo_labels": "proda_distill"}


class ProdaLabelsError(errors.UsageError, ValueError):
    """A label stage's setting is unusable; the message names the config key."""


def output_dir(workdir: str, kind: str) -> str:
    """The folder ``kind`` writes: what ``config.proda.soft_labels`` / ``pseudo_labels`` of
    the stages that read it name."""
    return paths.join(workdir, FOLDERS[kind])


def check_config(config: ml_collections.ConfigDict) -> None:
    """The stage kind and the model directory, before anything is read or written."""
    if config.stage not in FOLDERS:
        raise ProdaLabelsError(f"config.stage={config.stage!r} is not one of {list(FOLDERS)}")
    model = config.checkpoint
    if not model:
        raise ProdaLabelsError(
            f"stage '{config.stage}' needs a model: --config.checkpoint=MODEL_DIR (the "
            "previous ProDA stage's export/ or a converted checkpoint)"
        )
    if not paths.isfile(paths.join(model, checkpoints.MODEL_JSON)):
        state = "does not exist" if not paths.exists(model) else "is not a model directory"
        raise checkpoints.CheckpointError(
            f"config.checkpoint={model} {state} (a stage's export/ or a converted checkpoint)"
        )


# --- on the devices -----------------------------------------------------------------------


def make_logits_fn(apply_fn: Callable, mesh: Mesh) -> Callable:
    """jit(logits(variables, images)): float32 logits at the network's resolution, sharded
    over the batch (both stages and both views run this one program)."""

    def logits(variables, images):
        return apply_fn(variables, images, train=False)["logits"].astype(jnp.float32)

    return jax.jit(logits, out_shardings=NamedSharding(mesh, PartitionSpec("data")))


def soft_labels(logits: jax.Array) -> jax.Array:
    """The softmax over classes, float16 (the stored soft label)."""
    return jax.nn.softmax(logits, axis=-1).astype(jnp.float16)


def flip_averaged(logits: jax.Array, mirror_logits: jax.Array, size: tuple[int, int]):
    """(labels uint8, confidence float16) at ``size``: both softmaxes resized with
    align_corners=True, the mirror's flipped back, averaged; argmax and maximum."""
    probs = resize_bilinear_corners(jax.nn.softmax(logits, axis=-1), size)
    mirror = resize_bilinear_corners(jax.nn.softmax(mirror_logits, axis=-1), size)
    mean = (probs + mirror[:, :, ::-1]) / 2
    return jnp.argmax(mean, -1).astype(jnp.uint8), jnp.max(mean, -1).astype(jnp.float16)


def make_label_fn(kind: str, apply_fn: Callable, mesh: Mesh, size: tuple[int, int]) -> Callable:
    """``labels(variables, images) -> arrays``, batch-sharded: ``(soft,)`` or ``(labels,
    confidence)`` (the mirror is the reference's ``fliplr``: the batch flipped left to right)."""
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    logits_fn = make_logits_fn(apply_fn, mesh)
    if kind == "proda_soft_labels":
        soft = jax.jit(soft_labels, out_shardings=sharded)
        return lambda variables, images: (soft(logits_fn(variables, images)),)
    mirrored = jax.jit(lambda x: x[:, :, ::-1], out_shardings=sharded)
    average = jax.jit(flip_averaged, static_argnums=2, out_shardings=(sharded, sharded))

    def labels(variables, images):
        mirror_logits = logits_fn(variables, mirrored(images))
        return average(logits_fn(variables, images), mirror_logits, size)

    return labels


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in batch order (its slice)."""
    rows = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(rows[start]) for start in sorted(rows)])


# --- files --------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    return buffer.getvalue()


def image_files(kind: str, out: str, image: str) -> tuple[str, ...]:
    from input_pipeline import proda as proda_data

    return proda_data.label_files(READERS[kind], out, image)


def write_image(kind: str, out: str, image: str, arrays: tuple[np.ndarray, ...]) -> None:
    """One image's files: the soft label, or the confidence and then the PNG."""
    files = image_files(kind, out, image)
    with deadline.storage(out, f"writing the labels of {paths.basename(image)}"):
        if kind == "proda_soft_labels":
            paths.write_bytes(files[0], npy_bytes(arrays[0]))
        else:
            paths.write_bytes(files[1], npy_bytes(arrays[1]))
            paths.write_bytes(files[0], label_images.png_bytes(arrays[0]))


def pending(kind: str, out: str, images: list[str], stage_hosts: hosts.Hosts) -> list[int]:
    """Indices of the images whose files are not all written, as every process of the stage
    sees them (one listing each, then agreed: an image counts when any process misses it)."""
    with deadline.storage(out, "listing the labels written"):
        present = set(paths.listdir(out))
    missing = np.array([
        any(paths.basename(f) not in present for f in image_files(kind, out, image))
        for image in images
    ], np.int32)  # fmt: skip
    missing = stage_hosts.gather(missing).max(0) > 0
    return [int(i) for i in np.flatnonzero(missing)]


# --- the stage ----------------------------------------------------------------------------


def compute_and_write(config, out: str, images: list[str], mesh: Mesh) -> None:
    """The model over ``images`` (this process's slice of each batch), their files written
    while the next batch runs."""
    from ddb_jax.offline import prototype_stage
    from input_pipeline import proda as proda_data
    from input_pipeline import sharding

    kind, stage_hosts = config.stage, hosts.Hosts.of(mesh)
    with deadline.storage(config.checkpoint, "reading the model"):
        apply_fn, variables = prototype_stage.load_model(config.checkpoint, config)
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    label_fn = make_label_fn(kind, apply_fn, mesh, tuple(config.data.proda_full_size))
    dataset = proda_data.make_full_image_dataset(
        config.data, images, config.batch_size // stage_hosts.count, stage_hosts.index,
        stage_hosts.count,
    )  # fmt: skip

    def write(batch, results) -> None:
        rows = [local_rows(r) for r in results]
        for j, (k, valid) in enumerate(zip(batch["index"], batch["valid"], strict=True)):
            if valid:
                write_image(kind, out, images[int(k) % len(images)], tuple(r[j] for r in rows))

    previous = None
    batches = tqdm(
        deadline.bounded(dataset.as_numpy_iterator(), str(config.data.root),
                         "reading the target images"),
        total=-(-len(images) // config.batch_size), desc=kind, unit="batch",
        disable=not stage_hosts.is_primary,
    )  # fmt: skip
    for batch in batches:
        on_devices = sharding.to_global({"image": batch["image"]}, mesh)["image"]
        results = label_fn(variables, on_devices)  # runs while the previous batch is written
        if previous is not None:
            write(*previous)
        previous = (batch, results)
    if previous is not None:
        write(*previous)


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> str:
    """Stage entry point: writes ``workdir/<folder>/`` (:data:`FOLDERS`); returns it."""
    from ddb_jax.offline import prototype_stage
    from ddb_jax.train import setup
    from ddb_jax.train import workdir as workdir_lib
    from input_pipeline import datasets
    from input_pipeline import proda as proda_data

    check_config(config)
    with deadline.storage(str(config.data.root), "checking the model and the datasets"):
        prototype_stage.check_model_dir(config.checkpoint, config)
        datasets.check_available(config.data, eval_split=None, sources=False)
        images = proda_data.target_images(config.data)
    out = output_dir(workdir, config.stage)
    with deadline.storage(workdir, "recording the config"):
        if paths.exists(paths.join(out, DONE)):
            print(f"{config.stage}: {out} is complete; nothing to do", flush=True)
            return out
        workdir_lib.record_config(workdir, config)
    mesh = setup.make_mesh(config, devices=devices)
    stage_hosts = hosts.Hosts.of(mesh)
    todo = pending(config.stage, out, images, stage_hosts)
    logging.info("%s: %d of %d images to label into %s", config.stage, len(todo), len(images), out)
    if todo:
        compute_and_write(config, out, [images[i] for i in todo], mesh)
    stage_hosts.barrier(f"{config.stage} {out} written")
    if stage_hosts.is_primary:
        summary = {"stage": config.stage, "checkpoint": config.checkpoint, "images": len(images),
                   "size": list(config.data.proda_full_size)}  # fmt: skip
        with deadline.storage(out, "writing the done marker"):
            paths.write_text(paths.join(out, DONE), json.dumps(summary, indent=2) + "\n")
    return out
