"""TensorFlow ops of the mmseg training/test pipelines (docs/method.md §1.6),
deterministic under a seed.

Semantics follow mmcv/mmseg 0.x: images decoded as OpenCV does (JPEG with libjpeg's
accurate integer IDCT); keep-ratio ``imrescale`` (scale factor
``min(long/max(h, w), short/min(h, w))``, sizes ``int(x * f + 0.5)``), bilinear for
images (half-pixel centres, rounded back to uint8 like cv2 on uint8 input) and cv2
nearest (``floor(dst * src/dst)``) for labels; RandomCrop with the ``cat_max_ratio``
rejection; RandomFlip; PhotoMetricDistortion (``photometric.py``); Normalize; Pad.
Randomness is stateless: every op takes a seed tensor of shape [2] derived from the
global seed and the element index.

Broken files fail loudly with the file name: a truncated PNG/JPEG is detected from its
missing end marker before decoding, and image/label sizes and label values are asserted.
"""

from __future__ import annotations

import tensorflow as tf

from ddb_jax import paths
from ddb_jax.labels import IGNORE_LABEL, NUM_CLASSES
from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD
from input_pipeline import photometric

CAT_MAX_RATIO_TRIES = 10
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"
# Op ids folded into an element's seed by crop_flip_pad.
CROP_OP, FLIP_OP, PHOTOMETRIC_OP = 1, 2, 3


def plain(fn):
    """``fn`` for ``Dataset.map`` as written, without AutoGraph: every function here uses
    TensorFlow's own control flow (tf.cond, tf.while_loop), and AutoGraph's source
    conversion of ~50 functions took 4 s at the start of every stage."""
    return tf.autograph.experimental.do_not_convert(fn)


def finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` with a prefetch buffer, in deterministic order, without tf.data's autotuner.

    The autotuner's model thread sleeps between optimisations for a period that doubles up
    to 60 s, and deleting an iterator waits for it: measured here, a 40-step stage spent
    7.5 s (and 5-25 s in each process of a multi-process run) after its last step in the
    destructor of its finished iterator. Without it, parallel maps given
    ``num_parallel_calls=-1`` (AUTOTUNE) run one call per core (at most 16) and the
    prefetch buffer still grows on demand; throughput of the full-size training pipeline
    was the same (16.4 vs 16.6 image pairs/s, 2 cores, ``benchmarks/input_pipeline.py``).
    """
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def host_batches(
    element,
    per_host_batch: int,
    process_index: int,
    process_count: int,
    start_batch: int,
    num_parallel_calls: int,
) -> tf.data.Dataset:
    """Batches of ``element(k)`` over this host's slice of an endless global stream, from
    global batch ``start_batch`` on (the skipped elements are never decoded).

    Host p's j-th element of global batch s is k = s*B + p*b + j (B = P*b): the hosts'
    slices, concatenated in process order (the mesh's order), are the one-process batch.
    """
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch} must be >= 0")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    b, first = per_host_batch, start_batch * per_host_batch * process_count
    ds = (
        tf.data.Dataset.counter()
        .map(lambda i: first + (i // b) * (b * process_count) + process_index * b + i % b)
        .map(plain(element), num_parallel_calls=num_parallel_calls, deterministic=True)
    )
    return finish(ds.batch(b, drop_remainder=True))


def fold_seed(seed: tf.Tensor, *data: int | tf.Tensor) -> tf.Tensor:
    """A new [2] int64 seed from ``seed`` and integers (element index, op id, try)."""
    for d in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
    return seed


def _assert_complete(contents: tf.Tensor, path: tf.Tensor, is_jpeg: bool | tf.Tensor) -> list:
    """Checks the file ends with its format's end marker (a truncated file does not)."""
    length = tf.strings.length(contents)
    tail = tf.strings.substr(contents, tf.maximum(length - 32, 0), 32)
    tail_bytes = tf.io.decode_raw(tail, tf.uint8)
    is_jpeg = tf.convert_to_tensor(is_jpeg)
    ends_png = tf.equal(tf.strings.substr(contents, tf.maximum(length - 12, 0), 12), PNG_END)
    # JPEG: FF D9 within the last 32 bytes (some writers append a few bytes after it).
    pairs = tf.logical_and(tf.equal(tail_bytes[:-1], 0xFF), tf.equal(tail_bytes[1:], 0xD9))
    ends_jpeg = tf.reduce_any(pairs)
    complete = tf.where(is_jpeg, ends_jpeg, ends_png)
    return [
        tf.debugging.Assert(
            complete,
            ["truncated or corrupt image file (no end marker):", path],
            name="file_complete",
        )
    ]


def read_file(path: tf.Tensor) -> tf.Tensor:
    """A file's bytes: TensorFlow's reader for local files, the project's path layer for
    URLs (``gs://``): the same client the rest of the project uses, which (unlike
    TensorFlow's GCS filesystem) can also be pointed at a storage emulator."""

    def read_url(url: tf.Tensor) -> tf.Tensor:
        return tf.constant(paths.read_bytes(url.numpy().decode()))

    def from_url() -> tf.Tensor:
        contents = tf.py_function(read_url, [path], tf.string)
        contents.set_shape([])
        return contents

    is_url = tf.strings.regex_full_match(path, r"[a-zA-Z][a-zA-Z0-9+.-]*://.*")
    return tf.cond(is_url, from_url, lambda: tf.io.read_file(path))


def read_image(path: tf.Tensor, is_jpeg: bool | tf.Tensor = False) -> tf.Tensor:
    """RGB uint8 (H, W, 3) from a PNG or JPEG file; truncated files raise naming ``path``."""
    contents = read_file(path)
    with tf.control_dependencies(_assert_complete(contents, path, is_jpeg)):
        image = tf.py_function(decode_naming_file, [contents, path], tf.uint8)
    image.set_shape([None, None, 3])
    return image


def decode_naming_file(contents: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
    """Eager decode whose error names the file (graph decode errors cannot be caught).

    JPEGs (by content, as cv2.imdecode decides) use libjpeg's accurate integer IDCT,
    OpenCV's (mmcv.imread's) choice; TF's default fast IDCT is off by a few levels.
    """
    try:
        if tf.io.is_jpeg(contents):
            return tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")
        return tf.io.decode_image(contents, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as err:
        raise ValueError(f"corrupt image file {path.numpy().decode()}: {err.message}") from None


def read_label(path: tf.Tensor) -> tf.Tensor:
    """Train-id uint8 (H, W) from an 8-bit grayscale PNG; checks it is one and its ids."""
    contents = read_file(path)
    # PNG IHDR bit depth (byte 24): decode_png(dtype=uint8) silently rescales 16-bit files.
    eight_bit = tf.debugging.Assert(
        tf.equal(tf.strings.substr(contents, 24, 1), b"\x08"),
        ["label is not an 8-bit PNG (16-bit?); convert it with tools/convert_datasets:", path],
    )
    with tf.control_dependencies([*_assert_complete(contents, path, False), eight_bit]):
        label = tf.io.decode_png(contents, channels=0, dtype=tf.uint8)
    checks = [
        tf.debugging.Assert(
            tf.equal(tf.shape(label)[-1], 1),
            ["label is not a 1-channel train-id PNG (run the converter):", path],
        )
    ]
    with tf.control_dependencies(checks):
        label = label[..., 0]
    valid = tf.logical_or(label < NUM_CLASSES, tf.equal(label, IGNORE_LABEL))
    with tf.control_dependencies(
        [
            tf.debugging.Assert(
                tf.reduce_all(valid),
                ["label has ids outside 0..18 and 255:", path, tf.reduce_max(label)],
            )
        ]
    ):
        return tf.identity(label)


def assert_same_size(
    image: tf.Tensor, label: tf.Tensor, image_path: tf.Tensor, label_path: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(label)[:2]))
    check = tf.debugging.Assert(
        same,
        [
            "image and label sizes differ:",
            image_path,
            tf.shape(image)[:2],
            label_path,
            tf.shape(label)[:2],
        ],
    )
    with tf.control_dependencies([check]):
        return tf.identity(image), tf.identity(label)


def rescale_size(
    height: tf.Tensor, width: tf.Tensor, scale: tf.Tensor, min_size: tf.Tensor
) -> tf.Tensor:
    """mmcv ``rescale_size`` (keep ratio) with mmseg's ``min_size``; returns (new_h, new_w).

    ``scale`` is (long, short); a value <= 0 keeps the size; ``min_size`` > 0 replaces the
    scale by one whose short edge is ``max(min_size, short)`` at the image's aspect ratio.
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    scale = tf.cast(scale, tf.float64)
    long_edge = tf.reduce_max(scale)
    short_edge = tf.reduce_min(scale)
    min_size = tf.cast(min_size, tf.float64)
    new_short = tf.maximum(short_edge, min_size)
    # mmseg: (new_short * h / w, new_short) or (new_short, new_short * w / h).
    other = tf.where(h > w, new_short * h / w, new_short * w / h)
    long_edge = tf.where(min_size > 0, tf.maximum(other, new_short), long_edge)
    short_edge = tf.where(min_size > 0, tf.minimum(other, new_short), short_edge)
    factor = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
    new_h = tf.cast(tf.floor(h * factor + 0.5), tf.int32)
    new_w = tf.cast(tf.floor(w * factor + 0.5), tf.int32)
    keep = tf.reduce_max(scale) <= 0
    return tf.where(keep, tf.stack([height, width]), tf.stack([new_h, new_w]))


def resize_image(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Bilinear (half-pixel, no antialias) resize of uint8 RGB, rounded back to uint8."""
    resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=False)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def resize_label(label: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """cv2 INTER_NEAREST: source index ``floor(dst * src/dst)``."""
    src = tf.shape(label, out_type=tf.int32)

    def indices(n_out, n_in):
        ratio = tf.cast(n_in, tf.float64) / tf.cast(n_out, tf.float64)
        idx = tf.cast(tf.floor(tf.cast(tf.range(n_out), tf.float64) * ratio), tf.int32)
        return tf.minimum(idx, n_in - 1)

    rows = indices(size[0], src[0])
    cols = indices(size[1], src[1])
    return tf.gather(tf.gather(label, rows, axis=0), cols, axis=1)


def resize_pair(
    image: tf.Tensor,
    label: tf.Tensor | None,
    scale: tf.Tensor,
    min_size: tf.Tensor,
    keep_ratio: bool = True,
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Image and label resized to ``scale``: mmcv's keep-ratio rescale, or without
    ``keep_ratio`` exactly to (width, height) = (long, short) of ``scale`` (ADVENT's
    loaders: PIL ``resize(size)``)."""
    shape = tf.shape(image)
    size = rescale_size(shape[0], shape[1], scale, min_size)
    if not keep_ratio:
        exact = tf.stack([tf.reduce_min(scale), tf.reduce_max(scale)])
        size = tf.where(tf.reduce_max(scale) <= 0, shape[:2], exact)
    unchanged = tf.reduce_all(tf.equal(size, shape[:2]))
    image = tf.cond(unchanged, lambda: image, lambda: resize_image(image, size))
    if label is not None:
        label = tf.cond(unchanged, lambda: label, lambda: resize_label(label, size))
    return image, label


def margin_mask(size: tf.Tensor, margins: tuple[int, int, int, int]) -> tf.Tensor:
    """uint8 (H, W) of an image of ``size``: 0 within ``margins`` (top, bottom, left, right)
    pixels of its borders, 1 elsewhere. Built before any transform and carried as a label,
    so it marks the borders of the image as read, wherever a later crop falls (HRDA's
    pseudo-label margins; a margin wider than the image covers all of it)."""
    top, bottom, left, right = (int(m) for m in margins)
    rows = tf.range(size[0])
    cols = tf.range(size[1])
    valid_rows = tf.logical_and(rows >= top, rows < size[0] - bottom)
    valid_cols = tf.logical_and(cols >= left, cols < size[1] - right)
    return tf.cast(tf.logical_and(valid_rows[:, None], valid_cols[None, :]), tf.uint8)


def crop_offset(shape: tf.Tensor, crop_size: tuple[int, int], seed: tf.Tensor) -> tf.Tensor:
    """mmseg ``get_crop_bbox``: uniform top-left in [0, max(dim - crop, 0)]."""
    margins = tf.maximum(shape[:2] - tf.constant(crop_size, tf.int32), 0)
    return tf.random.stateless_uniform(
        [2], fold_seed(seed, 0), minval=0, maxval=tf.int32.max, dtype=tf.int32
    ) % (margins + 1)


def crop(x: tf.Tensor, offset: tf.Tensor, crop_size: tuple[int, int]) -> tf.Tensor:
    return x[offset[0] : offset[0] + crop_size[0], offset[1] : offset[1] + crop_size[1]]


def crop_is_balanced(label_crop: tf.Tensor, cat_max_ratio: float) -> tf.Tensor:
    """mmseg's test: >1 class present (ignore excluded) and the largest share < ratio."""
    counts = tf.math.bincount(tf.cast(tf.reshape(label_crop, [-1]), tf.int32), minlength=256)
    counts = tf.concat([counts[:IGNORE_LABEL], counts[IGNORE_LABEL + 1 :]], 0)
    total = tf.reduce_sum(counts)
    present = tf.reduce_sum(tf.cast(counts > 0, tf.int32))
    share = tf.cast(tf.reduce_max(counts), tf.float64) / tf.cast(tf.maximum(total, 1), tf.float64)
    return tf.logical_and(present > 1, share < cat_max_ratio)


def first_accepted(propose, accept, seed: tf.Tensor, checks: int):
    """mmseg's retry loop: propose(seed_0); up to ``checks`` times, keep it if accepted,
    otherwise propose again; the last proposal is used unchecked."""

    def cond(i, done, _):
        return tf.logical_and(tf.logical_not(done), i < checks)

    def body(i, _, state):
        ok = accept(state)
        new_state = tf.cond(ok, lambda: state, lambda: propose(fold_seed(seed, i + 1)))
        return i + 1, ok, new_state

    _, _, state = tf.while_loop(
        cond, body, (tf.constant(0), tf.constant(False), propose(fold_seed(seed, 0)))
    )
    return state


def random_crop_offset(
    label: tf.Tensor, crop_size: tuple[int, int], cat_max_ratio: float, seed: tf.Tensor
) -> tf.Tensor:
    """Crop offset with mmseg's ``cat_max_ratio`` rejection (10 checks, ignore excluded)."""
    shape = tf.shape(label)
    propose = lambda s: crop_offset(shape, crop_size, s)
    if cat_max_ratio >= 1.0:
        return propose(fold_seed(seed, 0))
    accept = lambda off: crop_is_balanced(crop(label, off, crop_size), cat_max_ratio)
    return first_accepted(propose, accept, seed, CAT_MAX_RATIO_TRIES)


def maybe_flip(
    image: tf.Tensor, label: tf.Tensor | None, seed: tf.Tensor, prob: float = 0.5
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Horizontal flip of image and label together with probability ``prob``."""
    flip = tf.random.stateless_uniform([], seed) < prob
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    if label is not None:
        label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
    return image, label


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8 RGB -> (x - mean) / std, float32 (ddb_jax.ops constants)."""
    mean = tf.constant(IMAGE_MEAN, tf.float32)
    std = tf.constant(IMAGE_STD, tf.float32)
    return (tf.cast(image, tf.float32) - mean) / std


def pad_to(
    image: tf.Tensor, label: tf.Tensor | None, size: tuple[int, int]
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Pads bottom/right to ``size``: image with 0 (after normalisation, or uint8 0), label
    with 255."""
    shape = tf.shape(image)
    paddings = [[0, size[0] - shape[0]], [0, size[1] - shape[1]]]
    image = tf.pad(image, paddings + [[0, 0]], constant_values=0.0)
    image.set_shape([size[0], size[1], 3])
    if label is not None:
        label = tf.pad(label, paddings, constant_values=IGNORE_LABEL)
        label.set_shape([size[0], size[1]])
    return image, label


def crop_flip_pad(
    image: tf.Tensor,
    label: tf.Tensor | None,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    seed: tf.Tensor,
    photometric_distortion: bool = False,
    flip_prob: float = 0.5,
    normalise: bool = True,
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """RandomCrop -> RandomFlip -> [PhotoMetricDistortion] -> Normalize -> Pad, the
    reference's order; the distortion (the CKD stages' source images) is optional, and
    ``flip_prob`` 0 turns flipping off (ADVENT's loaders do not flip).

    ``normalise=False`` leaves out Normalize: the uint8 pixels padded with 0, a quarter of
    the bytes to move to the device, which normalises them (``data.image_transfer``)."""
    _check_uint8(normalise, photometric_distortion)
    if label is None:
        offset = crop_offset(tf.shape(image), crop_size, fold_seed(seed, CROP_OP, 0))
    else:
        offset = random_crop_offset(label, crop_size, cat_max_ratio, fold_seed(seed, CROP_OP))
    image = crop(image, offset, crop_size)
    label = None if label is None else crop(label, offset, crop_size)
    image, label = maybe_flip(image, label, fold_seed(seed, FLIP_OP), flip_prob)
    if photometric_distortion:
        image = photometric.photometric_distortion(image, fold_seed(seed, PHOTOMETRIC_OP))
    image, label = pad_to(normalize(image) if normalise else image, label, crop_size)
    if label is not None:
        label = tf.cast(label, tf.int32)
    return image, label


def _check_uint8(normalise: bool, photometric_distortion: bool) -> None:
    """The distorted pixels are no longer integers: they cannot travel as uint8."""
    if not normalise and photometric_distortion:
        raise ValueError("photometric_distortion needs normalise=True (its pixels are floats)")


# SYNTHIA depth (config.data.source_depth): tools/convert_datasets/synthia.py --depth writes
# Depth/<name>_depth16.png beside each release file Depth/<name>.png: one 16-bit channel
# holding the value DADA's cv2.imread(..., IMREAD_ANYDEPTH) gives, losslessly; the source
# batch's 'source_depth' is DADA's inverse depth 65536 / (d + 1) of it, float32.
DEPTH_SUFFIX = "_depth16.png"
INVERSE_DEPTH_SCALE = 65536.0  # dada/dataset/depth.py
DEPTH_PAD = 0.0  # inverse depth of padded pixels (the reference never pads)


def depth_path(image_path: tf.Tensor) -> tf.Tensor:
    """SYNTHIA's RGB/<name>.png -> Depth/<name>_depth16.png (the converter's output)."""
    return tf.strings.regex_replace(
        image_path, r"RGB([/\\])([^/\\]*)\.png$", r"Depth\1\2" + DEPTH_SUFFIX
    )


def read_depth(path: tf.Tensor) -> tf.Tensor:
    """uint16 (H, W) from a converted one-channel 16-bit depth PNG; checks that it is one."""
    contents = read_file(path)
    sixteen_bit = tf.debugging.Assert(
        tf.equal(tf.strings.substr(contents, 24, 1), b"\x10"),
        ["depth is not a 16-bit PNG; run tools/convert_datasets/synthia.py --depth:", path],
    )
    with tf.control_dependencies([*_assert_complete(contents, path, False), sixteen_bit]):
        depth = tf.io.decode_png(contents, channels=1, dtype=tf.uint16)
    return depth[..., 0]


def inverse_depth(depth: tf.Tensor) -> tf.Tensor:
    """DADA's inverse depth ``65536 / (d + 1)`` (float32) of raw 16-bit depth values."""
    return INVERSE_DEPTH_SCALE / (tf.cast(depth, tf.float32) + 1.0)


def crop_flip_pad_depth(
    image: tf.Tensor,
    label: tf.Tensor,
    depth: tf.Tensor,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    seed: tf.Tensor,
    photometric_distortion: bool = False,
    flip_prob: float = 0.5,
    normalise: bool = True,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """:func:`crop_flip_pad` with a depth map (raw uint16, the label's size) carried along:
    the same crop offset and flip as the label (the same seeds, so image and label are
    exactly what :func:`crop_flip_pad` gives), then DADA's inverse depth, padded with
    :data:`DEPTH_PAD`."""
    _check_uint8(normalise, photometric_distortion)
    offset = random_crop_offset(label, crop_size, cat_max_ratio, fold_seed(seed, CROP_OP))
    image, label, depth = (crop(x, offset, crop_size) for x in (image, label, depth))
    flip = tf.random.stateless_uniform([], fold_seed(seed, FLIP_OP)) < flip_prob
    image, label, depth = (
        tf.cond(flip, lambda x=x: tf.reverse(x, [1]), lambda x=x: x) for x in (image, label, depth)
    )
    if photometric_distortion:
        image = photometric.photometric_distortion(image, fold_seed(seed, PHOTOMETRIC_OP))
    depth = inverse_depth(depth)
    shape = tf.shape(depth)
    paddings = [[0, crop_size[0] - shape[0]], [0, crop_size[1] - shape[1]]]
    depth = tf.pad(depth, paddings, constant_values=DEPTH_PAD)
    depth.set_shape(crop_size)
    image, label = pad_to(normalize(image) if normalise else image, label, crop_size)
    return image, tf.cast(label, tf.int32), depth
