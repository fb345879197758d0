"""ProDA's training input (microsoft/ProDA ``data/``: its loaders, shuffling target and
source loaders) for stage kinds 'proda' (stage 1) and 'proda_distill' (stages 2/3), and the
whole target images its offline stages read (:mod:`ddb_jax.offline.proda_labels`, the
'proda' prototypes).

Each image is first resized (Pillow BILINEAR) to its loader's fixed size,
``data.proda_full_size`` for the target (Cityscapes' 1024 x 2048: also the EMA model's
input and the offline stages' test-time size) and ``data.proda_source_size`` for the source
(GTA5's 1052 x 1914; SYNTHIA's is 760 x 1280); then both take the weak view of
:mod:`input_pipeline.proda_views` (random size, crop ``data.crop_size``, flip).

Batch keys (static shapes; crop H x W, K classes):

    source_image       float32 [B, H, W, 3]   both kinds: the reference's source pipeline
    source_label       int32   [B, H, W]      255 = ignore
    target_image       float32 [B, H, W, 3]   the weak view (normalised as every image here)
    target_resized     int32   [B, 2]         (h, w) of the resized image
    target_crop        int32   [B, 2]         (y1, x1) of the crop in it
    target_flip        bool    [B]            the crop is flipped
    'proda' only:
    target_full        float32 [B, Hf, Wf, 3] the whole image at data.proda_full_size
    target_soft_label  float32 [B, H//4, W//4, K]  the soft label moved like the weak view
    'proda_distill' only:
    target_label       int32   [B, H//4, W//4]     the hard label moved like the weak view,
                       every 4th pixel; 255 where its stored confidence (float16) is
                       <= data.proda_threshold, as the reference's dataset does on reading

No strong view: the methods draw it on the device from ``target_image``.

Element k of the global stream is a function of (seed, k); each host reads its contiguous
slice of every global batch (as :mod:`input_pipeline.train`). Source and target are each
position ``k mod n`` of their own per-epoch permutation (the reference's two shuffling
loaders; its target loader also drops an epoch's last partial batch, this one does not).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from ddb_jax import paths
from ddb_jax.labels import IGNORE_LABEL
from input_pipeline import datasets, pil_resize, proda_views, transforms

KINDS = ("proda", "proda_distill")
SOURCE_STREAM, TARGET_STREAM = 11, 12
SOFT_SUFFIX, LABEL_SUFFIX, CONFIDENCE_SUFFIX = ".npy", ".png", "_conf.npy"
LABEL_KEYS = {"proda": "soft_labels", "proda_distill": "pseudo_labels"}  # config.proda.<key>
LABEL_STAGES = {"proda": "proda_soft_labels", "proda_distill": "proda_pseudo_labels"}


# --- files --------------------------------------------------------------------------------


def label_stem(image: str) -> str:
    """The name an image's label files share: its file name without the extension."""
    return paths.basename(image).rsplit(".", 1)[0]


def label_files(kind: str, folder: str, image: str) -> tuple[str, ...]:
    """The files ``kind``'s step reads for ``image``: its soft label (.npy), or its hard
    label (.png) and that label's confidence (_conf.npy), the reference's names."""
    stem = paths.join(folder, label_stem(image))
    if kind == "proda":
        return (stem + SOFT_SUFFIX,)
    return (stem + LABEL_SUFFIX, stem + CONFIDENCE_SUFFIX)


def target_images(data_cfg) -> list[str]:
    """Every target training image, datasets in ``data.target`` order, each in file order;
    refused when two share a label stem (their label files would collide)."""
    images = [
        image
        for name in data_cfg.target
        for image in datasets.list_files(data_cfg.root, name, "train", False).images
    ]
    seen: dict[str, str] = {}
    for image in images:
        other = seen.setdefault(label_stem(image), image)
        if other != image:
            raise datasets.DatasetError(
                f"target images {other} and {image} share the name {label_stem(image)!r}, "
                "which names ProDA's label files"
            )
    return images


def check_label_files(kind: str, proda_cfg, images: Sequence[str]) -> list[tuple[str, ...]]:
    """Each image's label files (:func:`label_files`), after one listing of the folder
    shows that every one exists; otherwise one line naming the key and the stage to run."""
    key = LABEL_KEYS[kind]
    folder = proda_cfg[key]
    if not folder:
        raise datasets.DatasetError(
            f"config.proda.{key} is not set: stage '{kind}' reads the folder a "
            f"'{LABEL_STAGES[kind]}' stage writes"
        )
    present = set(paths.listdir(folder))
    files = [label_files(kind, folder, image) for image in images]
    missing = [f for group in files for f in group if paths.basename(f) not in present]
    if missing:
        raise datasets.DatasetError(
            f"config.proda.{key}={folder}: {len(missing)} label file(s) of the {len(images)} "
            f"target images missing, e.g. {missing[0]}; run stage '{LABEL_STAGES[kind]}'"
        )
    return files


Layout = tuple[tuple[int, ...], np.dtype, int]


def npy_layout(path: str) -> Layout:
    """(shape, dtype, data offset) of a C-ordered .npy file; the label stages write every
    file of a folder with one header, so the first one's holds for all."""
    with io.BytesIO(paths.read_bytes(path)) as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)  # fmt: skip
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran:
        raise datasets.DatasetError(f"{path}: a Fortran-ordered array; expected C order")
    return tuple(shape), dtype, offset


def read_npy(path: tf.Tensor, layout: Layout) -> tf.Tensor:
    """The array of a .npy file of ``layout``; a file of another size fails naming it."""
    shape, dtype, offset = layout
    nbytes = int(np.prod(shape)) * dtype.itemsize
    contents = transforms.read_file(path)
    check = tf.debugging.Assert(
        tf.equal(tf.strings.length(contents), offset + nbytes),
        ["a label file of another shape than", str(shape), "in its folder:", path],
    )
    with tf.control_dependencies([check]):
        data = tf.io.decode_raw(tf.strings.substr(contents, offset, nbytes), tf.as_dtype(dtype))
    return tf.reshape(data, shape)


# --- elements -----------------------------------------------------------------------------


def read_at_size(path: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """uint8 RGB of ``path`` at ``size`` (Pillow BILINEAR when it differs), static shape."""
    image = transforms.read_image(path, tf.strings.regex_full_match(path, r"(?i).*\.jpe?g"))
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
    image = tf.cond(same, lambda: image, lambda: pil_resize.resize_bilinear(image, size))
    return tf.ensure_shape(image, [*size, 3])


def _permuted(k: tf.Tensor, n: int, seed: tf.Tensor) -> tf.Tensor:
    """Position ``k mod n`` of epoch ``k // n``'s permutation of ``range(n)``."""
    return tf.random.experimental.index_shuffle(
        k % n, transforms.fold_seed(seed, k // n), tf.constant(n - 1, tf.int64)
    )


def _source_fn(data_cfg, seed: tf.Tensor) -> Callable:
    files = [datasets.list_files(data_cfg.root, name, "train", True) for name in data_cfg.source]
    images = tf.constant([p for f in files for p in f.images])
    labels = tf.constant([p for f in files for p in f.labels])
    size, crop = tuple(data_cfg.proda_source_size), tuple(data_cfg.crop_size)
    proda_views.check_geometry(size, crop, data_cfg.proda_resize, "data.proda_source_size")

    def fn(k):
        index = _permuted(k, len(images), transforms.fold_seed(seed, SOURCE_STREAM))
        image = read_at_size(images[index], size)
        label = transforms.read_label(labels[index])
        resized, origin, flip = proda_views.draw_geometry(
            transforms.fold_seed(seed, SOURCE_STREAM, k), size, data_cfg.proda_resize, crop,
            data_cfg.flip_prob,
        )  # fmt: skip
        label = proda_views.moved_label(label, size, resized, origin, flip, crop)
        return {
            "source_image": proda_views.weak_view(image, resized, origin, flip, crop),
            "source_label": tf.ensure_shape(tf.cast(label, tf.int32), crop),
        }

    return fn


def _target_fn(kind: str, data_cfg, proda_cfg, seed: tf.Tensor) -> Callable:
    images = target_images(data_cfg)
    files = check_label_files(kind, proda_cfg, images)
    layout = npy_layout(files[0][-1])  # the soft label, or the confidence
    label_tables = [tf.constant([group[i] for group in files]) for i in range(len(files[0]))]
    images_t = tf.constant(images)
    size, crop = tuple(data_cfg.proda_full_size), tuple(data_cfg.crop_size)
    quarter = (crop[0] // proda_views.QUARTER, crop[1] // proda_views.QUARTER)
    proda_views.check_geometry(size, crop, data_cfg.proda_resize, "data.proda_full_size")
    threshold = np.float16(data_cfg.proda_threshold)  # compared in float16, as stored

    def fn(k):
        index = _permuted(k, len(images), transforms.fold_seed(seed, TARGET_STREAM))
        image = read_at_size(images_t[index], size)
        resized, origin, flip = proda_views.draw_geometry(
            transforms.fold_seed(seed, TARGET_STREAM, k), size, data_cfg.proda_resize, crop,
            data_cfg.flip_prob,
        )  # fmt: skip
        out = {
            "target_image": proda_views.weak_view(image, resized, origin, flip, crop),
            "target_resized": resized, "target_crop": origin, "target_flip": flip,
        }  # fmt: skip
        if kind == "proda":
            soft = read_npy(label_tables[0][index], layout)
            soft = proda_views.moved_soft_label(soft, size, resized, origin, flip, crop)
            out["target_full"] = transforms.normalize(image)
            out["target_soft_label"] = tf.ensure_shape(soft, [*quarter, layout[0][-1]])
            return out
        label = transforms.read_label(label_tables[0][index])
        confidence = read_npy(label_tables[1][index], layout)
        same = tf.debugging.Assert(
            tf.reduce_all(tf.equal(tf.shape(label), tf.shape(confidence))),
            ["a pseudo-label and its confidence differ in size:", label_tables[0][index]],
        )
        with tf.control_dependencies([same]):
            label = tf.identity(label)
        label = tf.where(confidence <= threshold, tf.constant(IGNORE_LABEL, tf.uint8), label)
        label = proda_views.moved_label(label, size, resized, origin, flip, crop,
                                        proda_views.QUARTER)  # fmt: skip
        out["target_label"] = tf.ensure_shape(tf.cast(label, tf.int32), quarter)
        return out

    return fn


# --- streams ------------------------------------------------------------------------------


def make_proda_dataset(
    kind: str,
    data_cfg,
    proda_cfg,
    per_host_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Endless batches of ``kind``'s keys (module docstring), this host's slice of the
    global stream from global batch ``start_batch`` on (without decoding the ones before).
    The label folder (``config.proda.soft_labels`` / ``pseudo_labels``) is checked first."""
    if kind not in KINDS:
        raise ValueError(f"make_proda_dataset: kind {kind!r}; known: {KINDS}")
    base = tf.constant([seed, 0], tf.int64)
    source_fn = _source_fn(data_cfg, base)
    target_fn = _target_fn(kind, data_cfg, proda_cfg, base)
    return transforms.host_batches(
        lambda k: {**source_fn(k), **target_fn(k)}, per_host_batch, process_index,
        process_count, start_batch, data_cfg.num_parallel_calls,
    )  # fmt: skip


def make_full_image_dataset(
    data_cfg,
    images: Sequence[str],
    per_host_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    num_passes: int = 1,
) -> tf.data.Dataset:
    """``num_passes`` passes over ``images`` in order, each whole at ``data.proda_full_size``
    without augmentation (the reference's ``--noaug`` loaders): batches {'image' float32
    [b, Hf, Wf, 3], 'index' int64 (position k in the global stream), 'valid' bool (k < n x
    passes)}. Every host gets the same number of batches: the last global one is filled up
    with elements past the end (not valid). Global batch s holds k in [s B, (s + 1) B)."""
    n, b = len(images), per_host_batch
    total, global_batch = n * num_passes, per_host_batch * process_count
    count = -(-total // global_batch) * b
    table = tf.constant(list(images))
    size = tuple(data_cfg.proda_full_size)

    def element(k):
        image = read_at_size(table[k % n], size)
        return {"image": transforms.normalize(image), "index": k, "valid": k < total}

    ds = (
        tf.data.Dataset.range(count)
        .map(lambda i: (i // b) * global_batch + process_index * b + i % b)
        .map(transforms.plain(element), num_parallel_calls=data_cfg.num_parallel_calls,
             deterministic=True)
    )  # fmt: skip
    return transforms.finish(ds.batch(b, drop_remainder=True))
