"""One image file -> the network's input, as the evaluate stage makes it.

The image is decoded by the eval pipeline's decoder (JPEGs with OpenCV's accurate IDCT),
resized keep-ratio to a scale by its resize (``input_pipeline/transforms.py``) and
normalised, so a prediction here is the evaluate stage's pixel for pixel. Files go through
:mod:`ddb_jax.paths` (local paths and ``gs://``); an image that cannot be read or decoded
raises :class:`ImageError`, which names it (the run skips it, or stops with ``--strict``).
"""

from __future__ import annotations

import re

import numpy as np

from ddb_jax import paths
from ddb_jax.inference.errors import ImageError, InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


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
