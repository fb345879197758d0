"""Training input: source (image, label) and target image batches, endless and seeded.

Element ``k`` of the global stream (all hosts together) is fully determined by
``(seed, k)``: the source index is position ``k mod n`` of a per-epoch permutation
(``index_shuffle``, i.e. a full shuffle, no buffer), the target index an independent
uniform draw (the reference draws a random target per item), and every augmentation
uses stateless ops seeded by ``(seed, k)``. Host ``p`` of ``P`` takes ``k = p, p+P, ...``,
so hosts read disjoint slices and the global stream does not depend on ``P``.
With rare class sampling the source index comes from DAFormer's class sampler instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from ddb_jax import errors
from ddb_jax.ops import IMAGE_TRANSFERS, SIZE_SUFFIX
from input_pipeline import datasets, rcs, transforms

SOURCE_STREAM, TARGET_STREAM, RCS_STREAM = 1, 2, 3
RCS_RECROPS = 10


class StreamConfigError(errors.UsageError, ValueError):
    """Data settings that do not fit together (a setting to change: exit status 2)."""


def _concat(files: Sequence[datasets.FileList], with_labels: bool) -> dict[str, np.ndarray]:
    """Flat per-file tables over the concatenation of several datasets."""
    images = [p for f in files for p in f.images]
    table = {
        "image": np.array(images, dtype=object),
        "is_jpeg": np.array([p.lower().endswith((".jpg", ".jpeg")) for p in images]),
        "scale": np.array([f.scale or (0, 0) for f in files for _ in f.images], np.int32).reshape(
            -1, 2
        ),
        "min_size": np.array([f.min_size or 0 for f in files for _ in f.images], np.int32),
    }
    if with_labels:
        table["label"] = np.array([p for f in files for p in f.labels], dtype=object)
    return table


def _list(data_cfg, names: Sequence[str], with_labels: bool) -> list[datasets.FileList]:
    overrides = data_cfg.get("resize_scales", None)
    return [
        datasets.with_scale_overrides(
            datasets.list_files(
                data_cfg.root, n, "train", with_labels, data_cfg.get("label_set", "")
            ),
            overrides,
        )
        for n in names
    ]


def _gather(table: dict[str, np.ndarray], index: tf.Tensor) -> dict[str, tf.Tensor]:
    return {k: tf.gather(tf.constant(v), index) for k, v in table.items()}


def _load(entry: dict[str, tf.Tensor], with_label: bool, keep_ratio: bool = True):
    image = transforms.read_image(entry["image"], entry["is_jpeg"])
    label = None
    if with_label:
        label = transforms.read_label(entry["label"])
        image, label = transforms.assert_same_size(image, label, entry["image"], entry["label"])
    return transforms.resize_pair(image, label, entry["scale"], entry["min_size"], keep_ratio)


def images_as_uint8(data_cfg) -> bool:
    """Whether the training stream yields its images as uint8 pixels with their unpadded
    size (``data.image_transfer``, a quarter of float32's bytes to the device)."""
    transfer = data_cfg.get("image_transfer", "uint8")
    if transfer not in IMAGE_TRANSFERS:
        raise StreamConfigError(
            f"config.data.image_transfer={transfer!r}: must be one of {IMAGE_TRANSFERS}"
        )
    return transfer == "uint8"


def uint8_image_keys(data_cfg) -> tuple[str, ...]:
    """The image keys :func:`make_train_dataset` yields as uint8 beside '<key>_size': all
    of them with ``data.image_transfer='uint8'``, but for photometrically distorted source
    images (``data.photometric_distortion``, the CKD stages'), whose pixels are floats."""
    if not images_as_uint8(data_cfg):
        return ()
    distort = bool(data_cfg.get("photometric_distortion", False))
    return (*(() if distort else ("source_image",)), *target_stream_keys(data_cfg))


def _crop_extent(image: tf.Tensor, crop_size: tuple[int, int]) -> tf.Tensor:
    """int32 (height, width) of ``image``'s crop before padding (the image where smaller)."""
    return tf.minimum(tf.shape(image)[:2], tf.constant(crop_size, tf.int32))


def _shuffled_index(k: tf.Tensor, n: int, seed: tf.Tensor) -> tf.Tensor:
    epoch = k // n
    return tf.random.experimental.index_shuffle(
        k % n, transforms.fold_seed(seed, epoch), tf.constant(n - 1, tf.int64)
    )


class _RareClassSampler:
    """DAFormer RCS: class ~ softmax((1 - freq) / T), then a file holding > min_pixels of it."""

    def __init__(self, data_cfg, files: Sequence[datasets.FileList]):
        dirs = [f.directory for f in files]
        self.classes, self.probs = rcs.class_probabilities(
            rcs.load_class_stats(dirs), data_cfg.rcs_temperature
        )
        per_class = rcs.samples_with_class(dirs, self.classes, data_cfg.rcs_min_pixels)
        index_of = {}
        for offset, f in zip(np.cumsum([0] + [len(x) for x in files]), files, strict=False):
            for i, label in enumerate(f.labels):
                index_of.setdefault(label.rsplit("/", 1)[-1], int(offset + i))
        flat, starts, counts = [], [], []
        for c in self.classes:
            unknown = [b for b in per_class[c] if b not in index_of]
            if unknown:
                raise datasets.DatasetError(
                    f"rare class sampling: {unknown[0]} is in samples_with_class.json of {dirs} "
                    "but not in the dataset; re-run the converter"
                )
            starts.append(len(flat))
            counts.append(len(per_class[c]))
            flat += [index_of[b] for b in per_class[c]]
        self.file_index = tf.constant(flat, tf.int64)
        self.starts = tf.constant(starts, tf.int64)
        self.counts = tf.constant(counts, tf.int64)
        self.class_ids = tf.constant(self.classes, tf.int32)
        self.logits = tf.constant(np.log(self.probs)[None], tf.float32)
        self.min_class_pixels = data_cfg.rcs_min_pixels * data_cfg.rcs_min_crop_ratio

    def sample(self, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(file index, class id) for one element."""
        which = tf.random.stateless_categorical(
            self.logits, 1, transforms.fold_seed(seed, 0), dtype=tf.int32
        )[0, 0]
        pick = (
            tf.random.stateless_uniform(
                [], transforms.fold_seed(seed, 1), maxval=tf.int64.max, dtype=tf.int64
            )
            % self.counts[which]
        )
        return self.file_index[self.starts[which] + pick], self.class_ids[which]


def _source_fn(data_cfg, table, sampler: _RareClassSampler | None, seed: tf.Tensor):
    """Element k: {'source_image', 'source_label'}, with 'source_depth' (DADA's inverse
    depth) and 'source_image_size' (uint8 images) where configured."""
    crop_size = tuple(data_cfg.crop_size)
    n = len(table["image"])
    distort = bool(data_cfg.get("photometric_distortion", False))
    uint8 = "source_image" in uint8_image_keys(data_cfg)  # not when distorted: floats
    label_uint8 = images_as_uint8(data_cfg)  # train ids and 255 (ignore) fit a byte
    flip_prob = float(data_cfg.get("flip_prob", 0.5))
    keep_ratio = bool(data_cfg.get("keep_ratio", True))
    with_depth = bool(data_cfg.get("source_depth", False))

    def fn(k: tf.Tensor) -> dict[str, tf.Tensor]:
        elem_seed = transforms.fold_seed(seed, SOURCE_STREAM, k)
        if sampler is None:
            index = _shuffled_index(k, n, transforms.fold_seed(seed, SOURCE_STREAM))
        else:
            index, cls = sampler.sample(transforms.fold_seed(seed, RCS_STREAM, k))
        entry = _gather(table, index)
        image, label = _load(entry, True, keep_ratio)
        if with_depth:  # the same nearest resize, crop and flip as the label (DADA's depth)
            depth = _resized_depth(entry["image"], tf.shape(label))

        def propose(s):
            args = (crop_size, data_cfg.cat_max_ratio, s, distort, flip_prob, not uint8)
            if with_depth:
                return transforms.crop_flip_pad_depth(image, label, depth, *args)
            return transforms.crop_flip_pad(image, label, *args)

        if sampler is None or data_cfg.rcs_min_crop_ratio <= 0:
            sample = propose(elem_seed)
        else:
            # DAFormer re-runs the source pipeline (a new crop and flip) up to 10 times
            # until the sampled class covers more than min_pixels * min_crop_ratio pixels.
            def accept(proposal):
                pixels = tf.reduce_sum(tf.cast(tf.equal(proposal[1], cls), tf.float32))
                return pixels > sampler.min_class_pixels

            sample = transforms.first_accepted(propose, accept, elem_seed, RCS_RECROPS)
        label = tf.cast(sample[1], tf.uint8) if label_uint8 else sample[1]
        out = {"source_image": sample[0], "source_label": label}
        if with_depth:  # config.data.source_depth: DADA's inverse depth, float32 (B, H, W)
            out["source_depth"] = sample[2]
        if uint8:  # every try crops the same image: one extent
            out["source_image" + SIZE_SUFFIX] = _crop_extent(image, crop_size)
        return out

    return fn


def _resized_depth(image_path: tf.Tensor, label_shape: tf.Tensor) -> tf.Tensor:
    """The converted depth of a SYNTHIA image, nearest-resized to its (resized) label."""
    depth = transforms.read_depth(transforms.depth_path(image_path))
    same = tf.reduce_all(tf.equal(tf.shape(depth), label_shape))
    return tf.cond(same, lambda: depth, lambda: transforms.resize_label(depth, label_shape))


TARGET_ORDERS = ("uniform", "shuffled", "sequential")


def pseudo_margins(data_cfg) -> tuple[int, int, int, int] | None:
    """``data.target_pseudo_margins`` (top, bottom, left, right), or None when all are 0."""
    margins = tuple(int(m) for m in data_cfg.get("target_pseudo_margins", None) or (0,) * 4)
    return margins if any(margins) else None


def _target_fn(data_cfg, table, seed: tf.Tensor, order: str, margins=None, uint8=False):
    """Element k: {'image'} of a target image picked by ``order`` (an independent uniform
    draw per element, a per-epoch permutation, or file order), cropped and flipped by
    (seed, k). With ``margins`` also {'valid'}: :func:`transforms.margin_mask` of the image
    as read, resized, cropped, flipped and padded as its label would be (same offsets, same
    seeds: the image is the one drawn without margins). With ``uint8`` the image is its
    uint8 pixels padded with 0, and 'image_size' its crop's unpadded (height, width)."""
    if order not in TARGET_ORDERS:
        raise ValueError(f"target order {order!r}; known: {TARGET_ORDERS}")
    crop_size = tuple(data_cfg.get("target_crop_size") or data_cfg.crop_size)
    flip_prob = float(data_cfg.get("flip_prob", 0.5))
    keep_ratio = bool(data_cfg.get("keep_ratio", True))
    n = len(table["image"])

    def fn(k: tf.Tensor) -> dict[str, tf.Tensor]:
        if order == "shuffled":
            index = _shuffled_index(k, n, transforms.fold_seed(seed, TARGET_STREAM))
        elif order == "sequential":
            index = k % n
        else:
            index = tf.random.stateless_uniform(
                [], transforms.fold_seed(seed, TARGET_STREAM, k), maxval=n, dtype=tf.int64
            )
        entry = _gather(table, index)
        image = transforms.read_image(entry["image"], entry["is_jpeg"])
        mask = None if margins is None else transforms.margin_mask(tf.shape(image), margins)
        image, mask = transforms.resize_pair(
            image, mask, entry["scale"], entry["min_size"], keep_ratio
        )
        elem_seed = transforms.fold_seed(seed, TARGET_STREAM + 100, k)
        # cat_max_ratio 1: no rejection, so the mask as label moves the crop by nothing.
        extent = _crop_extent(image, crop_size)
        image, mask = transforms.crop_flip_pad(
            image, mask, crop_size, 1.0, elem_seed, flip_prob=flip_prob, normalise=not uint8
        )
        out = {"image": image}
        if uint8:
            out["image" + SIZE_SUFFIX] = extent
        if mask is not None:
            out["valid"] = tf.cast(mask, tf.float32)
        return out

    return fn


def _host_indices(process_index: int, process_count: int, count: int | None = None):
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    steps = tf.data.Dataset.counter() if count is None else tf.data.Dataset.range(count)
    return steps.map(lambda j: process_index + process_count * tf.cast(j, tf.int64))


def _finish(ds: tf.data.Dataset, per_host_batch: int) -> tf.data.Dataset:
    return transforms.finish(ds.batch(per_host_batch, drop_remainder=True))


def target_stream_keys(data_cfg) -> tuple[str, ...]:
    """The batch keys of the target images: 'target_image' (one stream over the concatenated
    targets, DDB's multi-target setting), or with ``data.per_target_streams`` one
    'target_image_<name>' per target (MTAF's per-target batches)."""
    if data_cfg.get("per_target_streams", False):
        return tuple(f"target_image_{name}" for name in data_cfg.target)
    return ("target_image",)


def _renamed(fn, names: dict[str, str]):
    """``fn``'s element with its keys renamed to batch keys."""
    return lambda k: {names[key]: value for key, value in fn(k).items()}


def _target_streams(data_cfg, target_files, seed: int) -> list:
    """Element functions k -> {batch key: tensor} of the target streams
    (:func:`target_stream_keys`). The concatenated stream draws from seed (seed, 0), as it
    always has; per-target stream i from (seed, i + 1), so each target's draws are its own.
    With pseudo-label margins the concatenated stream also gives 'target_valid'."""
    keys = target_stream_keys(data_cfg)
    margins = pseudo_margins(data_cfg)
    uint8 = images_as_uint8(data_cfg)  # targets are never distorted
    size = "image" + SIZE_SUFFIX
    if keys == ("target_image",):
        table, base = _concat(target_files, False), tf.constant([seed, 0], tf.int64)
        fn = _target_fn(data_cfg, table, base, "uniform", margins, uint8)
        names = {"image": "target_image", "valid": "target_valid", size: "target_image_size"}
        return [_renamed(fn, names)]
    if margins is not None:
        raise StreamConfigError(
            "config.data.target_pseudo_margins needs one target stream; "
            "unset config.data.per_target_streams or the margins"
        )
    fns = []
    for i, (key, files) in enumerate(zip(keys, target_files, strict=True)):
        table, base = _concat([files], False), tf.constant([seed, i + 1], tf.int64)
        fn = _target_fn(data_cfg, table, base, "uniform", uint8=uint8)
        fns.append(_renamed(fn, {"image": key, size: key + SIZE_SUFFIX}))
    return fns


def make_train_dataset(
    data_cfg,
    per_host_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Endless batches {'source_image' (B,H,W,3), 'source_label' (B,H,W),
    'target_image' (B,H,W,3)} of this host's slice of the global stream; with
    ``data.per_target_streams`` 'target_image_<name>' per target instead of 'target_image'.

    With ``data.image_transfer='uint8'`` (the default) each image is uint8, its cropped and
    flipped pixels padded with 0, and '<image key>_size' (B,2) i32 its unpadded (height,
    width): ``ddb_jax.methods.device_input.network_input`` normalises it on the device;
    the label is uint8 too (train ids, 255 where ignored), int32 on the device. With
    'float32' the label is int32.
    The photometrically distorted source images (``data.photometric_distortion``) and
    'float32' give normalised float32 images, padded with 0.0, and no '_size' keys.

    With ``data.target_pseudo_margins`` (any > 0) also 'target_valid' (B,H,W) f32, HRDA's
    valid pseudo-label mask: 0.0 where a pixel of the target crop lies within the margins of
    the image as read, 1.0 elsewhere, and 255.0 where the crop is padded, as in the
    reference (mmseg pads every seg field with 255 and the pseudo-label weight is multiplied
    by the mask as it is; HRDA's Cityscapes crops are never padded).

    ``start_batch`` is the index of the first *global* batch (the training step a resumed
    run continues from): the stream starts at element ``start_batch * per_host_batch *
    process_count``, equal to ``.skip(start_batch)`` without decoding the skipped elements.
    """
    source_files = _list(data_cfg, data_cfg.source, True)
    target_files = _list(data_cfg, data_cfg.target, False)
    source_table = _concat(source_files, True)
    sampler = _RareClassSampler(data_cfg, source_files) if data_cfg.rare_class_sampling else None
    base = tf.constant([seed, 0], tf.int64)
    source_fn = _source_fn(data_cfg, source_table, sampler, base)
    target_fns = _target_streams(data_cfg, target_files, seed)

    def element(k):
        out = source_fn(k)
        for target_fn in target_fns:
            out.update(target_fn(k))
        return out

    return transforms.host_batches(
        element, per_host_batch, process_index, process_count, start_batch,
        data_cfg.num_parallel_calls,
    )  # fmt: skip


def make_target_train_dataset(
    data_cfg,
    per_host_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    pad_last: bool = False,
) -> tf.data.Dataset:
    """Batches {'image'} of the target training set with its training augmentation
    (crop, flip, normalise, pad), each epoch a permutation; endless if ``num_epochs`` is None.

    ``shuffle=False`` keeps every epoch in file order instead (the reference's prototype
    tool reads the target with a non-shuffling loader); crops and flips are the same.
    The last partial batch of a finite run is dropped (fixed shapes for jit), unless
    ``pad_last``: then every host gets the same number of full batches, filled up with
    elements past the end, and batches also hold 'index' (int64, the element's position k
    in the global stream) and 'valid' (bool, k < n * num_epochs), so that each element is
    used exactly once. Global batch s (all hosts) holds exactly k in [s*B*P, (s+1)*B*P).
    """
    if pad_last and num_epochs is None:
        raise ValueError("make_target_train_dataset: pad_last needs a finite num_epochs")
    table = _concat(_list(data_cfg, data_cfg.target, False), False)
    n = len(table["image"])
    order = "shuffled" if shuffle else "sequential"
    target_fn = _target_fn(data_cfg, table, tf.constant([seed, 1], tf.int64), order)

    count = total = None
    if num_epochs is not None:
        total = n * num_epochs
        count = (total - process_index + process_count - 1) // process_count
        if pad_last:
            global_batch = per_host_batch * process_count
            count = -(-total // global_batch) * per_host_batch

    def element(k: tf.Tensor) -> dict[str, tf.Tensor]:
        out = {"image": target_fn(k)["image"]}
        if pad_last:
            out["index"] = k
            out["valid"] = k < total
        return out

    parallel = data_cfg.num_parallel_calls
    ds = _host_indices(process_index, process_count, count).map(
        transforms.plain(element), num_parallel_calls=parallel, deterministic=True
    )
    return _finish(ds, per_host_batch)
