"""Stage 'prototypes' (docs/method.md §1.4): class centroids of a model's decode-head
feature on the target.

The model in ``config.checkpoint`` runs in inference mode over the target training set
with its training augmentation (crop, flip), ``config.prototypes.num_passes`` passes in
file order (the reference's ``tools/cal_prototypes`` reads it with a non-shuffling
loader). Per image, logits and features are resized to the image size; each class
predicted on at least ``min_pixels`` pixels contributes its mean feature to a running-mean
table whose count is capped (then an EMA). One jitted function per batch does all of it,
table and counts in and out, so a pass stays on the device.

Order: the reference updates image by image. The last partial batch is padded and the
padding masked (``make_target_train_dataset(pad_last=True)``), so each image of each pass
counts exactly once. With several processes, host p feeds stream positions k = p, p+P, ...;
global batch s then holds exactly k in [s*B, (s+1)*B), and the jitted step sorts the
batch's per-image vectors by k (XLA gathers the sharded batch axis) before the update, so
the table is the sequential one whatever the number of hosts or devices.

``prototypes.mode = 'proda'`` computes ProDA's initial prototypes as its
``calc_prototype.py`` does instead: whole target images at ``data.proda_full_size`` without
augmentation (the same images in every pass), logits and features at the network's
resolution (no resize), so ``min_pixels`` counts pixels there; the rest is the same
(inference mode, argmax, running mean capped at ``count_cap``, ``num_passes`` passes in file
order). The reference's loader drops each pass's last partial batch (``n mod`` its batch
size of 4 images, 3 on Cityscapes); here every image counts. Its file holds the table
alone; here the counts too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from ddb_jax import checkpoints, errors, labels, models, paths
from ddb_jax.offline import prototype_io
from ddb_jax.ops import resize_bilinear
from ddb_jax.runtime import deadline, hosts
from ddb_jax.train import setup
from ddb_jax.train import workdir as workdir_lib
from ddb_jax.uda import prototypes
from input_pipeline import datasets, sharding

PROTOTYPE_MODES = ("ddb", "proda")  # config.prototypes.mode


class PrototypeStageError(errors.UsageError, ValueError):
    """A prototypes-stage setting is unusable; the message names the config key."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails on unusable settings before any file is read."""
    cfg = config.prototypes
    for key in ("num_passes", "batch_size", "min_pixels", "count_cap"):
        if int(cfg[key]) < 1:
            raise PrototypeStageError(f"config.prototypes.{key}={cfg[key]} must be >= 1")
    if cfg.get("mode", "ddb") not in PROTOTYPE_MODES:
        raise PrototypeStageError(f"config.prototypes.mode={cfg.mode!r}; one of {PROTOTYPE_MODES}")
    if not config.checkpoint:
        raise PrototypeStageError(
            "stage 'prototypes' needs a model: --config.checkpoint=MODEL_DIR "
            "(a self-training stage's export/ or a converted checkpoint)"
        )


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """The training stages' mesh (same device choice with several processes), checked
    against ``config.prototypes.batch_size``."""
    check_config(config)
    try:
        return setup.make_mesh(config, batch_key="prototypes.batch_size", devices=devices)
    except ValueError as err:
        raise PrototypeStageError(str(err)) from err


def check_model_dir(model_dir: str, config: ml_collections.ConfigDict):
    """The stored model config, after the cheap checks (no variables read).

    Refuses a missing or non-model directory, a backbone-only (ImageNet) directory and a
    class count other than ``config.model.num_classes``.
    """
    if not paths.isdir(model_dir):
        raise checkpoints.CheckpointError(f"model directory {model_dir} does not exist")
    stored, provenance = checkpoints.read_model_config(model_dir)
    if provenance.get("kind") == "backbone":
        raise _backbone_only(model_dir)
    if stored.num_classes != config.model.num_classes:
        raise checkpoints.CheckpointError(
            f"{model_dir} predicts {stored.num_classes} classes but config.model.num_classes "
            f"is {config.model.num_classes}"
        )
    return stored


def _backbone_only(model_dir: str) -> checkpoints.CheckpointError:
    return checkpoints.CheckpointError(
        f"{model_dir} holds only a backbone (an ImageNet file?); prototypes need a trained "
        "segmentor (a self-training stage's export/)"
    )


def load_model(model_dir: str, config: ml_collections.ConfigDict) -> tuple[Callable, dict]:
    """(apply_fn, numpy variables) of a segmentor model directory, checked as above."""
    stored = check_model_dir(model_dir, config)
    variables, stored = checkpoints.load_model_dir(model_dir)
    stored.dtype = config.model.dtype
    model = models.build_model(stored)
    is_backbone = models.backbone_predicate(model)
    if all(is_backbone(name) for name in variables.get("params", {})):
        raise _backbone_only(model_dir)
    return model.apply, variables


def image_outputs(
    apply_fn: Callable, variables: Any, images: jax.Array, at_image_size: bool = True
) -> tuple[jax.Array, jax.Array]:
    """(logits, feature), float32, both resized to the image size as the reference does
    (``at_image_size=False``: at the network's resolution, as ProDA's tool takes them)."""
    outputs = apply_fn(variables, images, train=False)
    logits, feature = outputs["logits"], outputs["feature"]
    size = images.shape[1:3]
    if not at_image_size:
        return logits.astype(jnp.float32), feature.astype(jnp.float32)
    return (
        resize_bilinear(logits.astype(jnp.float32), size),
        resize_bilinear(feature.astype(jnp.float32), size),
    )


def make_update_step(
    apply_fn: Callable, min_pixels: int, cap: int, mesh: Mesh | None = None,
    at_image_size: bool = True,
):  # fmt: skip
    """jit(step(variables, table, counts, batch) -> (table, counts)) for one global batch.

    ``batch``: 'image' (B, H, W, 3), 'valid' (B,) bool (False: padding, ignored) and
    'index' (B,) int32, the images' stream positions, which fix the update order.
    """

    def step(variables, table, counts, batch):
        logits, feature = image_outputs(apply_fn, variables, batch["image"], at_image_size)
        vectors, present = prototypes.class_mean_features(feature, logits, min_pixels)
        present = present & batch["valid"][:, None]
        order = jnp.argsort(batch["index"])
        return prototypes.update_prototype_table(table, counts, vectors[order], present[order], cap)

    if mesh is None:
        return jax.jit(step)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, out_shardings=(replicated, replicated))


def target_image_count(config: ml_collections.ConfigDict) -> int:
    """Images in the target training set(s); a missing dataset is a DatasetError."""
    return sum(
        len(datasets.list_files(config.data.root, name, "train", False))
        for name in config.data.target
    )


def make_batches(config: ml_collections.ConfigDict, stage_hosts: hosts.Hosts | None = None):
    """This host's padded batches of all passes (file order, training augmentation), its
    slice among the stage's processes (default: all of the job's)."""
    stage_hosts = stage_hosts or hosts.Hosts.everyone()
    if config.prototypes.get("mode", "ddb") == "proda":
        from input_pipeline import proda as proda_data

        return proda_data.make_full_image_dataset(
            config.data,
            proda_data.target_images(config.data),
            config.prototypes.batch_size // stage_hosts.count,
            stage_hosts.index,
            stage_hosts.count,
            num_passes=config.prototypes.num_passes,
        )
    from input_pipeline import train as train_data

    return train_data.make_target_train_dataset(
        config.data,
        config.prototypes.batch_size // stage_hosts.count,
        config.seed,
        stage_hosts.index,
        stage_hosts.count,
        num_epochs=config.prototypes.num_passes,
        shuffle=False,
        pad_last=True,
    )


def _host_value(x: jax.Array) -> np.ndarray:
    """A replicated array as numpy (works when it spans several processes)."""
    return np.asarray(x.addressable_data(0))


def compute_prototypes(
    config: ml_collections.ConfigDict, devices=None
) -> tuple[np.ndarray, np.ndarray]:
    """(table (K, C), counts (K,)) of the model in ``config.checkpoint`` (docs/method.md §1.4).

    Every input is checked (config, model directory, datasets) before the model runs.
    ``devices``: the stage's devices when the pipeline runs it beside others.
    """
    mesh = make_mesh(config, devices)
    with deadline.storage(str(config.data.root), "listing the target images"):
        check_model_dir(config.checkpoint, config)
        num_images = target_image_count(config)
    if num_images == 0:
        raise datasets.DatasetError(
            f"target {tuple(config.data.target)} under {config.data.root} has no training images"
        )
    stage_hosts = hosts.Hosts.of(mesh)
    dataset = make_batches(config, stage_hosts)
    with deadline.storage(config.checkpoint, "reading the model"):
        apply_fn, variables = load_model(config.checkpoint, config)

    replicated = NamedSharding(mesh, PartitionSpec())
    variables = jax.device_put(variables, replicated)
    crop = tuple(config.data.crop_size)
    shapes = jax.eval_shape(
        lambda v: apply_fn(v, jnp.zeros((1, *crop, 3), jnp.float32), train=False), variables
    )
    num_classes, channels = shapes["logits"].shape[-1], shapes["feature"].shape[-1]
    table = jax.device_put(jnp.zeros((num_classes, channels), jnp.float32), replicated)
    counts = jax.device_put(jnp.zeros((num_classes,), jnp.float32), replicated)
    step = make_update_step(
        apply_fn, int(config.prototypes.min_pixels), int(config.prototypes.count_cap), mesh,
        at_image_size=config.prototypes.get("mode", "ddb") == "ddb",
    )  # fmt: skip
    passes = config.prototypes.num_passes
    num_batches = -(-num_images * passes // config.prototypes.batch_size)
    logging.info(
        "prototypes of %s: %d images x %d passes, %d batches of %d",
        config.checkpoint, num_images, passes, num_batches, config.prototypes.batch_size,
    )  # fmt: skip
    progress = tqdm(
        deadline.bounded(
            dataset.as_numpy_iterator(), str(config.data.root), "reading the target images"
        ),
        total=num_batches,
        desc="prototypes",
        unit="batch",
        disable=not stage_hosts.is_primary,
    )
    for batch in progress:
        batch = {
            "image": batch["image"],
            "valid": batch["valid"],
            "index": batch["index"].astype(np.int32),
        }
        table, counts = step(variables, table, counts, sharding.to_global(batch, mesh))
    return _host_value(table), _host_value(counts)


def summary_path(path: str) -> str:
    """The human-readable summary written beside a prototype file."""
    return path.removesuffix(".npz") + "_summary.txt"


def format_summary(table: np.ndarray, counts: np.ndarray, title: str = "") -> str:
    """Per-class counts and prototype norms as a plain-text table."""
    names = labels.CITYSCAPES_CLASSES
    if len(names) != len(counts):
        names = tuple(f"class {k}" for k in range(len(counts)))
    lines = [title] if title else []
    lines.append(f"{'class':<16}{'count':>8}{'|prototype|':>14}")
    for name, count, row in zip(names, counts, table, strict=True):
        shown = "unknown" if count == prototype_io.UNKNOWN_COUNT else f"{int(count)}"
        lines.append(f"{name:<16}{shown:>8}{float(np.linalg.norm(row)):>14.4f}")
    unseen = [n for n, c in zip(names, counts, strict=True) if c == 0]
    if unseen:
        lines.append(f"never predicted on >= min_pixels pixels (zero rows): {', '.join(unseen)}")
    return "\n".join(lines)


def write_prototypes(
    path: str, table: np.ndarray, counts: np.ndarray, model_dir: str, title: str = ""
) -> str:
    """Writes ``path`` (atomic, prototype_io) and its summary; prints the summary."""
    text = format_summary(table, counts, title or f"prototypes of {model_dir} -> {path}")
    prototype_io.save_prototypes(path, table, counts, model_dir)
    paths.write_text(summary_path(path), text + "\n")
    print(text)
    return path


def describe(config: ml_collections.ConfigDict) -> str:
    """One line saying what a table was computed from (the summary's title)."""
    mode = config.prototypes.get("mode", "ddb")
    images = (f"crop {tuple(config.data.crop_size)}" if mode == "ddb"
              else f"ProDA's rule, whole images {tuple(config.data.proda_full_size)}")  # fmt: skip
    return (
        f"prototypes of {config.checkpoint}: target {', '.join(config.data.target)}, "
        f"{config.prototypes.num_passes} passes, {images}, "
        f"seed {config.seed}, min_pixels {config.prototypes.min_pixels}, "
        f"count cap {config.prototypes.count_cap}"
    )


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> str:
    """Stage entry point: writes ``workdir/prototypes.npz`` (+ summary); returns its path."""
    check_config(config)
    with deadline.storage(str(config.data.root), "checking the model and the datasets"):
        check_model_dir(config.checkpoint, config)
        datasets.check_available(config.data, eval_split=None, sources=False)
    with deadline.storage(workdir, "recording the config"):
        workdir_lib.record_config(workdir, config)  # after the inputs are checked
    table, counts = compute_prototypes(config, devices)
    path = paths.join(workdir, prototype_io.PROTOTYPES_FILE)
    if hosts.Hosts.of(make_mesh(config, devices)).is_primary:
        with deadline.storage(workdir, "writing the prototypes"):
            write_prototypes(path, table, counts, config.checkpoint, describe(config))
    return path
