"""Stages 'daf_pseudo_labels' and 'daf_rank': DAF/IDA's offline products (docs/method.md
§7.4), read by the ISL and IDA stages through :mod:`input_pipeline.daf`.

The model in ``config.checkpoint`` runs in inference mode over every target training image,
whole, resized to ``daf.full_size`` (the reference's INPUT_SIZE_TARGET); its logits and
depth are upsampled to that size (bilinear, align_corners=True), as the reference's
``interp_target``. Per image:

- ``daf_pseudo_labels`` (``utils/gen_pseudo_labels_c.py``): the class whose softmax is
  >= ``daf.isl_threshold`` (0.9; a plain threshold, not class-balanced: above 0.5 at most
  one class passes), else 255; ``<workdir>/pseudo_labels/<stem>.png``.
- ``daf_rank`` (``depth_aware_rank/entropy.py``, IntraDA's ``entropy.py``): the score, the
  mean over pixels and classes of ADVENT's self-information times the predicted depth; the
  images sorted by it (ascending), the first ``int(n x daf.rank_lambda1)`` the easy split,
  the rest the hard one. ``<workdir>/rank/``: ``easy_split.txt`` and ``hard_split.txt``
  (image paths), ``scores.json``, and ``easy_labels/<stem>.png``, the easy images' argmax
  (the reference's ``color_masks``, no threshold), IDA's source labels.

``done`` is written last (a finished stage is skipped). One process computes and writes
everything (a multi-host job's other processes wait at the barrier).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from ddb_jax import checkpoints, errors, paths
from ddb_jax.inference import label_images
from ddb_jax.ops import resize_bilinear_corners
from ddb_jax.uda import adversarial

FOLDERS = {"daf_pseudo_labels": "pseudo_labels", "daf_rank": "rank"}
DONE = "done"
IGNORE = 255


class DafLabelsError(errors.UsageError, ValueError):
    """A setting of a DAF offline stage is unusable; the message names the key."""


def check_config(config: ml_collections.ConfigDict) -> None:
    if config.stage not in FOLDERS:
        raise DafLabelsError(f"config.stage={config.stage!r} is not one of {list(FOLDERS)}")
    if not config.checkpoint:
        raise DafLabelsError(
            f"stage '{config.stage}' needs a model: --config.checkpoint=MODEL_DIR (a DAF, "
            "ISL stage's best/ or export/)"
        )
    if not paths.isfile(paths.join(config.checkpoint, checkpoints.MODEL_JSON)):
        raise checkpoints.CheckpointError(f"config.checkpoint={config.checkpoint} is not a model")


def predict(apply_fn, variables, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(softmax (N, H, W, K), depth (N, H, W)) at the images' size, in inference mode."""
    outputs = apply_fn(variables, images, train=False)
    size = images.shape[1:3]
    logits = resize_bilinear_corners(outputs["logits"].astype(jnp.float32), size)
    depth = resize_bilinear_corners(outputs["depth"].astype(jnp.float32), size)[..., 0]
    return jax.nn.softmax(logits, axis=-1), depth


def thresholded(probs: jax.Array, threshold: float) -> jax.Array:
    """The class at or above ``threshold``, else 255 (gen_pseudo_labels_c.py), uint8."""
    confident = jnp.max(probs, axis=-1) >= threshold
    return jnp.where(confident, jnp.argmax(probs, axis=-1), IGNORE).astype(jnp.uint8)


def depth_aware_score(probs: jax.Array, depth: jax.Array) -> jax.Array:
    """Per image: mean of self-information x depth over pixels and classes (entropy.py's
    ``(prob_2_entropy(softmax) * depth).mean()``)."""
    return jnp.mean(adversarial.self_information(probs) * depth[..., None], axis=(1, 2, 3))


def split(images: list[str], scores: list[float], lambda1: float) -> tuple[list, list]:
    """(easy, hard): sorted by score (stable), the first ``int(n * lambda1)`` easy."""
    order = sorted(range(len(images)), key=lambda i: scores[i])
    cut = int(len(images) * lambda1)
    return [images[i] for i in order[:cut]], [images[i] for i in order[cut:]]


def _outputs(config, images: list[str]):
    """Yields (image path, uint8 label, score) per image, batch by batch."""
    from ddb_jax.offline import prototype_stage
    from input_pipeline import proda as proda_data

    apply_fn, variables = prototype_stage.load_model(config.checkpoint, config)
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.proda_full_size = tuple(config.daf.full_size)
    dataset = proda_data.make_full_image_dataset(data_cfg, images, config.batch_size)
    rank = config.stage == "daf_rank"
    threshold = float(config.daf.isl_threshold)

    @jax.jit
    def run(variables, batch):
        probs, depth = predict(apply_fn, variables, batch)
        label = jnp.argmax(probs, -1).astype(jnp.uint8) if rank else thresholded(probs, threshold)
        return label, depth_aware_score(probs, depth)

    for batch in dataset.as_numpy_iterator():
        labels, scores = jax.device_get(run(variables, batch["image"]))
        for j, (k, valid) in enumerate(zip(batch["index"], batch["valid"], strict=True)):
            if valid:
                yield images[int(k)], labels[j], float(scores[j])


def write(config, out: str, images: list[str]) -> dict:
    """Computes and writes the stage's files in ``out``; returns its summary."""
    from input_pipeline import daf as daf_data

    folder = paths.join(out, daf_data.EASY_LABELS) if config.stage == "daf_rank" else out
    paths.makedirs(folder)
    scores, labelled = {}, {}
    for image, label, score in _outputs(config, images):
        scores[image] = score
        if config.stage == "daf_pseudo_labels":
            paths.write_bytes(daf_data.label_file(folder, image), label_images.png_bytes(label))
        else:
            labelled[image] = label
    summary = {"stage": config.stage, "checkpoint": config.checkpoint, "images": len(images)}
    if config.stage == "daf_rank":
        easy, hard = split(images, [scores[i] for i in images], float(config.daf.rank_lambda1))
        for image in easy:
            paths.write_bytes(daf_data.label_file(folder, image),
                              label_images.png_bytes(labelled[image]))  # fmt: skip
        paths.write_text(paths.join(out, daf_data.EASY), "".join(f"{i}\n" for i in easy))
        paths.write_text(paths.join(out, daf_data.HARD), "".join(f"{i}\n" for i in hard))
        paths.write_json(paths.join(out, "scores.json"), scores)
        summary.update(easy=len(easy), hard=len(hard), lambda1=float(config.daf.rank_lambda1))
    return summary


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> str:
    """Stage entry point: writes ``workdir/<folder>/`` (:data:`FOLDERS`); returns it."""
    from ddb_jax.offline import prototype_stage
    from ddb_jax.runtime import hosts
    from ddb_jax.train import setup
    from ddb_jax.train import workdir as workdir_lib
    from input_pipeline import datasets
    from input_pipeline import proda as proda_data

    check_config(config)
    prototype_stage.check_model_dir(config.checkpoint, config)
    datasets.check_available(config.data, eval_split=None, sources=False)
    images = proda_data.target_images(config.data)
    out = paths.join(workdir, FOLDERS[config.stage])
    if paths.exists(paths.join(out, DONE)):
        print(f"{config.stage}: {out} is complete; nothing to do", flush=True)
        return out
    workdir_lib.record_config(workdir, config)
    stage_hosts = hosts.Hosts.of(setup.make_mesh(config, devices=devices))
    if stage_hosts.is_primary:
        logging.info("%s: %d target images into %s", config.stage, len(images), out)
        summary = write(config, out, images)
        paths.write_text(paths.join(out, DONE), json.dumps(summary, indent=2) + "\n")
    stage_hosts.barrier(f"{config.stage} {out} written")
    return out
