"""DAF/IDA's training input after the DAF stage (docs/method.md §7.4): the ISL stage's
target images with their pseudo-labels (kind 'daf_isl'), and the IDA stage's easy split
with its labels as the source and its hard split as the target (kind 'daf_ida').

Every image is read whole and resized (Pillow BILINEAR) to ``daf.full_size``, the size its
labels were written at by :mod:`ddb_jax.offline.daf_labels` (the reference's loaders
resize Cityscapes to INPUT_SIZE_TARGET); then cropped to ``data.target_crop_size`` (else
``data.crop_size``) and flipped
with ``data.flip_prob`` (the reference: crop = full size, no flip). Each stream visits its
images in a per-epoch permutation (the reference's shuffling loaders).

Batch keys: 'daf_isl': ``target_image`` f32 (B, H, W, 3), ``target_label`` i32 (B, H, W);
'daf_ida': ``source_image``, ``source_label`` (easy split), ``target_image`` (hard split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from ddb_jax import paths
from input_pipeline import datasets, transforms
from input_pipeline.proda import label_stem, read_at_size, target_images

KINDS = ("daf_isl", "daf_ida")
SOURCE_STREAM, TARGET_STREAM = 21, 22
EASY, HARD, EASY_LABELS = "easy_split.txt", "hard_split.txt", "easy_labels"


def label_file(folder: str, image: str) -> str:
    """The pseudo-label PNG of ``image`` in ``folder``."""
    return paths.join(folder, label_stem(image) + ".png")


def read_split(path: str) -> list[str]:
    """The image paths of a split list (one a line), as the ranking stage wrote them."""
    return [line.strip() for line in paths.read_text(path).splitlines() if line.strip()]


def _check_labels(folder: str, images: Sequence[str], key: str, producer: str) -> list[str]:
    if not folder:
        raise datasets.DatasetError(f"config.daf.{key} is not set: run stage '{producer}'")
    present = set(paths.listdir(folder))
    files = [label_file(folder, image) for image in images]
    missing = [f for f in files if paths.basename(f) not in present]
    if missing:
        raise datasets.DatasetError(
            f"config.daf.{key}={folder}: {len(missing)} of {len(images)} pseudo-labels "
            f"missing, e.g. {missing[0]}; run stage '{producer}'"
        )
    return files


def _stream(data_cfg, size, images: Sequence[str], labels: Sequence[str] | None,
            seed: tf.Tensor, stream: int) -> Callable:  # fmt: skip
    """k -> (image, label or None): a permuted whole image, resized, cropped and flipped."""
    if not images:
        raise datasets.DatasetError("a DAF training stream has no image (an empty split?)")
    table = tf.constant(list(images))
    label_table = None if labels is None else tf.constant(list(labels))
    n, crop = len(images), tuple(data_cfg.get("target_crop_size") or data_cfg.crop_size)
    flip_prob = float(data_cfg.get("flip_prob", 0.5))

    def fn(k):
        index = tf.random.experimental.index_shuffle(
            k % n, transforms.fold_seed(seed, stream, k // n), tf.constant(n - 1, tf.int64)
        )
        image = read_at_size(table[index], size)
        label = None
        if label_table is not None:
            label = transforms.read_label(label_table[index])
            label = transforms.resize_label(label, tf.constant(size))
        elem_seed = transforms.fold_seed(seed, stream + 100, k)
        image, label = transforms.crop_flip_pad(image, label, crop, 1.0, elem_seed,
                                                flip_prob=flip_prob)  # fmt: skip
        return image, label

    return fn


def element_fn(kind: str, data_cfg, daf_cfg, seed: tf.Tensor) -> Callable:
    """k -> the batch keys of ``kind`` (module docstring), the label folders checked."""
    size = tuple(daf_cfg.full_size)
    if kind == "daf_isl":
        images = target_images(data_cfg)
        labels = _check_labels(daf_cfg.isl_labels, images, "isl_labels", "daf_pseudo_labels")
        target = _stream(data_cfg, size, images, labels, seed, TARGET_STREAM)

        def isl(k):
            image, label = target(k)
            return {"target_image": image, "target_label": tf.cast(label, tf.int32)}

        return isl
    if not daf_cfg.rank:
        raise datasets.DatasetError("config.daf.rank is not set: run stage 'daf_rank'")
    easy = read_split(paths.join(daf_cfg.rank, EASY))
    hard = read_split(paths.join(daf_cfg.rank, HARD))
    easy_labels = _check_labels(paths.join(daf_cfg.rank, EASY_LABELS), easy, "rank", "daf_rank")
    source = _stream(data_cfg, size, easy, easy_labels, seed, SOURCE_STREAM)
    target = _stream(data_cfg, size, hard, None, seed, TARGET_STREAM)

    def ida(k):
        image, label = source(k)
        return {"source_image": image, "source_label": tf.cast(label, tf.int32),
                "target_image": target(k)[0]}  # fmt: skip

    return ida


def make_daf_dataset(
    kind: str,
    data_cfg,
    daf_cfg,
    per_host_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Endless batches of ``kind``, this host's slice of the global stream from global
    batch ``start_batch`` on (element k is a function of (seed, k))."""
    if kind not in KINDS:
        raise ValueError(f"make_daf_dataset: kind {kind!r}; known: {KINDS}")
    fn = element_fn(kind, data_cfg, daf_cfg, tf.constant([seed, 0], tf.int64))
    return transforms.host_batches(
        fn, per_host_batch, process_index, process_count, start_batch,
        data_cfg.num_parallel_calls,
    )  # fmt: skip
