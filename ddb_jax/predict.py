"""Inference on image files without labels: the evaluate stage's prediction, written as images.

A prediction here is the evaluate stage's, pixel for pixel: the image is decoded by the
eval pipeline's decoder (JPEGs with OpenCV's accurate IDCT), resized keep-ratio to a scale
by its resize (``input_pipeline/transforms.py``), normalised, and
:func:`ddb_jax.evaluate.predict_probabilities` (whole / slide / flip) gives the class
probabilities at the image's own size (the eval stage's label size), argmax -> train ids.

Images of different sizes are batched by size: only images of one size share a batch
(padding would change what the border pixels see), a partial batch runs at the next power
of two (repeating its last image) so each size compiles at most ``log2(batch) + 1``
programs, and every image is computed independently of its batch mates.

Files go through :mod:`ddb_jax.paths` (local paths and ``gs://``). An image that cannot be
read or decoded raises :class:`ImageError`, which names it; :func:`predict_files` skips it
(or stops, ``strict``) and counts it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddb_jax import checkpoints, errors, evaluate, label_images, models, paths

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# A Cityscapes image name: <city>_<sequence>_<frame>_leftImg8bit (the server's key).
CITYSCAPES_NAME = re.compile(r"^([a-z_]+)_(\d{6})_(\d{6})_leftImg8bit$")
PTH_EXTENSIONS = (".pth", ".pt")


class InputError(errors.UsageError, ValueError):
    """The command line names something unusable (no such file, no images, a name clash)."""


class ImageError(errors.InputError, ValueError):
    """One image file cannot be read or decoded; the message names it."""


# --- which files -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """An input image and its output name: the path below the folder it was found in (for a
    folder argument), else its file name; without the extension."""

    path: str
    name: str


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _strip_extension(name: str) -> str:
    return os.path.splitext(name)[0]


def _walk(folder: str) -> list[str]:
    """Every file below ``folder`` (recursively), sorted."""
    if paths.is_remote(folder):
        return sorted(str(p) for p in paths.as_epath(folder).rglob("*") if p.is_file())
    found = []
    for base, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(base, f) for f in sorted(files)]
    return found


def _relative(path: str, folder: str) -> str:
    return str(path)[len(str(folder).rstrip("/")) + 1 :]


def _from_folder(folder: str) -> list[ImageFile]:
    return [
        ImageFile(p, _strip_extension(_relative(p, folder)).replace(os.sep, "/"))
        for p in _walk(folder)
        if _is_image_name(p)
    ]


def list_images(inputs: Sequence[str]) -> list[ImageFile]:
    """The images named by ``inputs``: files (taken whatever their extension), folders
    (searched recursively for IMAGE_EXTENSIONS) and glob patterns (``*``, ``?``, ``[``;
    matching folders are searched, matching files kept when they have an image extension).

    Raises :class:`InputError` for an argument that names nothing, a folder or pattern
    without images, or two inputs that would write the same output name.
    """
    files: list[ImageFile] = []
    for argument in inputs:
        if any(c in argument for c in "*?["):
            found = []
            for match in paths.glob(argument):
                if paths.isdir(match):
                    found += _from_folder(match)
                elif _is_image_name(match):
                    found.append(ImageFile(match, _strip_extension(paths.basename(match))))
            if not found:
                raise InputError(f"{argument}: the pattern matches no image files")
        elif paths.isdir(argument):
            found = _from_folder(argument)
            if not found:
                raise InputError(f"{argument}: the folder holds no {'/'.join(IMAGE_EXTENSIONS)}")
        elif paths.isfile(argument):
            found = [ImageFile(argument, _strip_extension(paths.basename(argument)))]
        else:
            raise InputError(f"{argument}: no such file or folder")
        files += found
    seen: dict[str, str] = {}
    listed: set[str] = set()
    unique = []
    for image in files:
        if paths.resolve(image.path) in listed:
            continue  # the same file named twice (e.g. a file and its folder): once
        listed.add(paths.resolve(image.path))
        if image.name in seen:
            raise InputError(
                f"{seen[image.name]} and {image.path} would both be written as {image.name}; "
                "pass their folders instead (outputs keep the path below the folder)"
            )
        seen[image.name] = image.path
        unique.append(image)
    return unique


# --- one image ----------------------------------------------------------------------------


def _check_complete(contents: bytes, path: str) -> None:
    """A truncated PNG/JPEG decodes without error into grey rows; the eval pipeline refuses
    it by its missing end marker, and so does this."""
    if not contents:
        raise ImageError(f"{path}: empty file")
    from input_pipeline import transforms

    if contents.startswith(PNG_SIGNATURE) and not contents.endswith(transforms.PNG_END):
        raise ImageError(f"{path}: truncated or corrupt PNG (no end marker)")
    if contents.startswith(JPEG_SIGNATURE) and transforms.JPEG_END not in contents[-32:]:
        raise ImageError(f"{path}: truncated or corrupt JPEG (no end marker)")


def _reason(err: Exception, path: str) -> str:
    """TensorFlow's decode error without the op's plumbing: 'Unknown image file format...'."""
    text = str(err).splitlines()[0].replace(f"corrupt image file {path}: ", "")
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\].*$", "", text).strip()


def decode_image(contents: bytes, path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) from a file's bytes, decoded as the evaluate stage decodes."""
    _check_complete(contents, path)
    import tensorflow as tf

    from input_pipeline import transforms

    try:
        # The eval pipeline's own decoder (by content: JPEG with the accurate integer IDCT).
        image = transforms.decode_naming_file(tf.constant(contents), tf.constant(path))
    except (ValueError, tf.errors.OpError) as err:
        raise ImageError(f"{path}: not a decodable image ({_reason(err, path)})") from None
    image = image.numpy()
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{path}: decoded to an empty image {image.shape}")
    return image


def read_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file; :class:`ImageError` names a bad one."""
    try:
        contents = paths.read_bytes(path)
    except OSError as err:
        raise ImageError(f"{path}: cannot be read ({err.strerror or err})") from None
    return decode_image(contents, path)


def scale_of(text: str | None) -> tuple[int, int] | None:
    """``'1024,512'`` (long, short), ``'none'`` (keep the size) or a dataset name (its
    evaluation scale, ``input_pipeline/datasets.py``) -> a scale or None."""
    if text is None or text.lower() in ("none", "keep", ""):
        return None
    match = re.fullmatch(r"\(?\s*(\d+)\s*[,x]\s*(\d+)\s*\)?", text)
    if match:
        scale = (int(match.group(1)), int(match.group(2)))
        if min(scale) <= 0:
            raise InputError(f"--scale={text}: both sides must be positive")
        return scale
    from input_pipeline import datasets

    if text in datasets.DATASETS:
        return datasets.DATASETS[text].eval_scale
    raise InputError(
        f"--scale={text!r}: use LONG,SHORT (e.g. 1024,512), 'none' or a dataset name "
        f"({', '.join(sorted(datasets.DATASETS))})"
    )


def prepare(image: np.ndarray, scale: tuple[int, int] | None) -> np.ndarray:
    """The network input of an RGB uint8 image: resized keep-ratio to ``scale`` (mmcv
    ``imrescale``, the evaluate stage's resize; None keeps the size), normalised, float32."""
    import tensorflow as tf

    from input_pipeline import transforms

    scale_t = tf.constant(scale or (0, 0), tf.int32)
    resized, _ = transforms.resize_pair(tf.constant(image), None, scale_t, tf.constant(0))
    return transforms.normalize(resized).numpy()


# --- the model ------------------------------------------------------------------------------


def load_model(
    source: str,
    pth_model_cfg: ml_collections.ConfigDict | None = None,
    which: str | None = None,
    allow_pickle: bool = False,
    dtype: str = "float32",
) -> tuple[dict[str, Any], ml_collections.ConfigDict, str]:
    """(variables, model config, description) of a model directory or a PyTorch ``.pth``.

    A ``.pth`` (DDB: ``--which`` picks its model; mmseg) is converted in memory as
    ``tools/convert_checkpoint.py`` would (``pth_model_cfg`` gives the architecture it
    cannot tell: backbone, head, class count); nothing is written.
    """
    if paths.isdir(source):
        variables, model_cfg = checkpoints.load_model_dir(source)
        origin = f"model directory {source}"
    elif source.lower().endswith(PTH_EXTENSIONS) and paths.isfile(source):
        from ddb_jax.convert import convert_torch_checkpoint

        if pth_model_cfg is None:
            raise InputError(f"{source}: a .pth needs the model's architecture")
        local = paths.local_copy(source)
        try:
            models.build_model(pth_model_cfg)  # a bad --backbone/--head fails before reading
            variables, model_cfg, provenance = convert_torch_checkpoint(
                local, pth_model_cfg, which=which, allow_pickle=allow_pickle
            )
        finally:
            if local != source:
                os.remove(local)
        origin = f"{source} (model {provenance['prefix'] or 'unprefixed'}, converted in memory)"
    else:
        raise InputError(f"{source}: neither a model directory nor a .pth file")
    if "decode_head" not in variables.get("params", {}):
        raise checkpoints.CheckpointError(
            f"{source} holds only a backbone (an ImageNet file?); it cannot predict"
        )
    if model_cfg.num_classes > 255:
        raise checkpoints.CheckpointError(f"{source}: {model_cfg.num_classes} classes > 255")
    model_cfg.dtype = dtype
    description = (
        f"{model_cfg.backbone}+{model_cfg.head}, {model_cfg.num_classes} classes, from {origin}"
    )
    return variables, model_cfg, description


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "out_size", "mode", "crop", "stride", "flip")
)
def predict_train_ids(
    variables, images, *, apply_fn, out_size, mode, crop, stride, flip
) -> jax.Array:
    """(n, H, W) uint8 train ids at ``out_size`` of a batch of normalised images."""
    logits_fn = lambda x: apply_fn(variables, x, train=False)["logits"]
    probs = evaluate.predict_probabilities(logits_fn, images, out_size, mode, crop, stride, flip)
    return jnp.argmax(probs, axis=-1).astype(jnp.uint8)


@dataclasses.dataclass
class Predictor:
    """A model and the evaluate stage's inference settings (``config.eval``)."""

    apply_fn: Callable
    variables: Any
    mode: str = "whole"
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    flip: bool = False

    @classmethod
    def from_model(cls, variables, model_cfg: ml_collections.ConfigDict, **settings) -> Predictor:
        if settings.get("mode", "whole") not in evaluate.EVAL_MODES:
            raise InputError(f"--mode={settings['mode']!r}; use one of {list(evaluate.EVAL_MODES)}")
        apply_fn = models.build_model(model_cfg).apply
        return cls(apply_fn, jax.device_put(variables), **settings)

    def __call__(self, images: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        """(n, H, W) uint8 train ids of (n, h, w, 3) normalised images, at ``out_size``."""
        ids = predict_train_ids(
            self.variables, images, apply_fn=self.apply_fn, out_size=tuple(out_size),
            mode=self.mode, crop=tuple(self.crop), stride=tuple(self.stride), flip=self.flip,
        )  # fmt: skip
        return np.asarray(ids)


# --- batching by size ------------------------------------------------------------------------

# (key, RGB image at its own size, network input); key: the caller's handle of the image.
Item = tuple[Any, np.ndarray, np.ndarray]
# (key, RGB image, train ids at the image's size).
Result = tuple[Any, np.ndarray, np.ndarray]


def _run_batch(predictor: Predictor, items: list[Item], batch_size: int) -> Iterator[Result]:
    """Runs one same-size batch, padded (repeating its last image) to a power of two or
    ``batch_size``: a few compiled programs per size, not one per partial batch length."""
    padded = min(1 << (len(items) - 1).bit_length(), batch_size)
    inputs = [item[2] for item in items]
    inputs += [inputs[-1]] * (padded - len(items))
    ids = predictor(np.stack(inputs), items[0][1].shape[:2])
    for (key, image, _), train_ids in zip(items, ids, strict=False):
        yield key, image, train_ids


def predict_stream(
    predictor: Predictor, items: Iterable[Item], batch_size: int = 1
) -> Iterator[Result]:
    """(key, image, train ids at the image's size) for every item, in batches of up to
    ``batch_size`` images of one size. Items wait in a bucket per size; when more than
    ``4 * batch_size`` wait, the bucket of the oldest runs as it is (memory stays bounded
    for folders of many sizes). Results come in completion order, not input order."""
    if batch_size < 1:
        raise InputError(f"--batch-size={batch_size}; use 1 or more")
    buckets: collections.OrderedDict[tuple, list[Item]] = collections.OrderedDict()
    waiting = 0
    for item in items:
        size = (item[1].shape[:2], item[2].shape[:2])
        buckets.setdefault(size, []).append(item)
        waiting += 1
        if len(buckets[size]) == batch_size:
            waiting -= batch_size
            yield from _run_batch(predictor, buckets.pop(size), batch_size)
        elif waiting > 4 * batch_size:
            _, oldest = buckets.popitem(last=False)
            waiting -= len(oldest)
            yield from _run_batch(predictor, oldest, batch_size)
    for bucket in buckets.values():
        yield from _run_batch(predictor, bucket, batch_size)


def predict_images(
    predictor: Predictor,
    images: Sequence[np.ndarray],
    scale: tuple[int, int] | None = None,
    batch_size: int = 1,
) -> list[np.ndarray]:
    """Train ids of RGB uint8 images (in their order), each at its own size."""
    items = ((i, image, prepare(image, scale)) for i, image in enumerate(images))
    out: list[np.ndarray | None] = [None] * len(images)
    for i, _, train_ids in predict_stream(predictor, items, batch_size):
        out[i] = train_ids
    return out  # type: ignore[return-value]


# --- where the outputs go -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    """``out/color/NAME.png`` (Cityscapes palette), ``out/overlay/NAME.png`` (colours over
    the image), ``out/trainIds/NAME.png`` (train ids, 255 = none); with ``cityscapes``,
    ``out/labelIds/CITY/NAME.png``: label ids, one file per test image named after it, the
    files the Cityscapes benchmark server takes (zip the labelIds folder alone: the server
    matches ``<city>_<seq>_<frame>*.png`` anywhere in the archive, and the colour files
    would match too)."""

    out: str
    cityscapes: bool = False
    alpha: float = 0.5

    def color(self, name: str) -> str:
        return paths.join(self.out, "color", f"{name}.png")

    def overlay(self, name: str) -> str:
        return paths.join(self.out, "overlay", f"{name}.png")

    def train_ids(self, name: str) -> str:
        return paths.join(self.out, "trainIds", f"{name}.png")

    def label_ids(self, name: str) -> str:
        stem = name.rsplit("/", 1)[-1]
        return paths.join(self.out, "labelIds", cityscapes_city(stem), f"{stem}.png")

    def check_names(self, files: Sequence[ImageFile]) -> None:
        """Refuses, before any work, names the chosen format cannot hold."""
        if not self.cityscapes:
            return
        bad = [f.path for f in files if not CITYSCAPES_NAME.match(f.name.rsplit("/", 1)[-1])]
        if bad:
            raise InputError(
                f"{bad[0]}: --format cityscapes needs Cityscapes image names "
                f"(<city>_<seq>_<frame>_leftImg8bit.png); {len(bad)} file(s) do not match"
            )
        stems = collections.Counter(f.name.rsplit("/", 1)[-1] for f in files)
        twice = [s for s, n in stems.items() if n > 1]
        if twice:
            raise InputError(f"{twice[0]}: given twice; the server takes one file per image")

    def write(self, name: str, image: np.ndarray, train_ids: np.ndarray) -> None:
        label_images.write_png(self.color(name), label_images.colorize(train_ids))
        label_images.write_png(
            self.overlay(name), label_images.overlay(image, train_ids, self.alpha)
        )
        label_images.write_png(self.train_ids(name), train_ids)
        if self.cityscapes:
            label_images.write_png(self.label_ids(name), label_images.to_cityscapes_ids(train_ids))


def cityscapes_city(stem: str) -> str:
    """The city of a Cityscapes image name (``berlin_000000_000019_leftImg8bit``)."""
    match = CITYSCAPES_NAME.match(stem)
    if not match:
        raise InputError(f"{stem}: not a Cityscapes image name")
    return match.group(1)


# --- files in, files out ------------------------------------------------------------------------


@dataclasses.dataclass
class Counts:
    written: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)  # one message per image


def _bounded(pool, fn, args: Iterable, depth: int) -> Iterator[concurrent.futures.Future]:
    """``pool.submit(fn, a)`` for each ``a``, at most ``depth`` ahead of the consumer."""
    pending: collections.deque = collections.deque()
    for arg in args:
        pending.append(pool.submit(fn, arg))
        if len(pending) >= depth:
            yield pending.popleft()
    yield from pending


def predict_files(
    predictor: Predictor,
    files: Sequence[ImageFile],
    layout: OutputLayout,
    scale: tuple[int, int] | None = None,
    batch_size: int = 1,
    strict: bool = False,
    workers: int = 4,
    on_skip: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Counts:
    """Predicts every file and writes its images (``layout``). Reading, decoding, resizing
    and PNG encoding run in ``workers`` threads around the device. A file that cannot be
    read or decoded is reported to ``on_skip`` and counted; with ``strict`` its
    :class:`ImageError` is raised instead. ``progress(n)``: n more images done."""
    layout.check_names(files)
    counts = Counts()
    progress = progress or (lambda n: None)

    def load(image_file: ImageFile):
        try:
            image = read_image(image_file.path)
        except ImageError as err:
            return image_file, err, None
        return image_file, image, prepare(image, scale)

    def save(result) -> None:
        image_file, image, train_ids = result
        layout.write(image_file.name, image, train_ids)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:

        def loaded() -> Iterator[Item]:
            for future in _bounded(pool, load, files, depth=2 * batch_size + workers):
                image_file, image, prepared = future.result()
                if isinstance(image, ImageError):
                    if strict:
                        raise image
                    counts.skipped.append(str(image))
                    if on_skip:
                        on_skip(str(image))
                    progress(1)
                    continue
                yield image_file, image, prepared

        writes: collections.deque = collections.deque()
        for result in predict_stream(predictor, loaded(), batch_size):
            writes.append(pool.submit(save, result))
            while writes and (writes[0].done() or len(writes) > 2 * workers):
                writes.popleft().result()  # a failed write raises here, naming its file
                counts.written += 1
                progress(1)
        for future in writes:
            future.result()
            counts.written += 1
            progress(1)
    return counts
