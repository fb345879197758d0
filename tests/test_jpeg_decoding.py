"""JPEG decoding as mmcv.imread (cv2.imdecode) does it: libjpeg's accurate integer IDCT.

Synthetic JPEGs written by PIL (qualities, chroma subsamplings, baseline/progressive,
greyscale) decode through the training pipeline's reader exactly as OpenCV decodes them.
TF's default (fast integer) IDCT differs: measured here on these files, 3 levels at
most at quality 50-75 and 6-7 at quality 95, in about 60-70% of the values.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

cv2 = pytest.importorskip("cv2")

from input_pipeline import transforms  # noqa: E402

QUALITIES = (50, 75, 95)
SUBSAMPLINGS = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def _scene(height: int = 61, width: int = 83) -> np.ndarray:
    """Gradients, noise and a sharp-edged block; sizes that are not whole MCUs."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:height, :width]
    image = np.stack([3 * x, 4 * y, 2 * (x + y)], -1) + rng.normal(0, 20, (height, width, 3))
    image[20:40, 30:50] = (250, 10, 10)
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _opencv_rgb(data: bytes) -> np.ndarray:
    """mmcv.imfrombytes(flag='color', backend='cv2'), converted from BGR to RGB."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


def _pipeline_rgb(data: bytes, path) -> np.ndarray:
    path.write_bytes(data)
    return transforms.read_image(tf.constant(str(path)), True).numpy()


CASES = list(itertools.product(QUALITIES, SUBSAMPLINGS, (False, True)))


@pytest.mark.parametrize("quality, subsampling, progressive", CASES)
def test_jpeg_decodes_like_opencv(tmp_path, quality, subsampling, progressive):
    data = _jpeg(
        _scene(),
        quality=quality,
        subsampling=SUBSAMPLINGS[subsampling],
        progressive=progressive,
    )
    np.testing.assert_array_equal(_pipeline_rgb(data, tmp_path / "a.jpg"), _opencv_rgb(data))


def test_greyscale_jpeg_decodes_like_opencv(tmp_path):
    data = _jpeg(_scene()[..., 1], quality=90)
    decoded = _pipeline_rgb(data, tmp_path / "grey.jpg")
    assert decoded.shape == (61, 83, 3)
    np.testing.assert_array_equal(decoded, _opencv_rgb(data))


@pytest.mark.parametrize("quality", QUALITIES)
def test_tf_default_fast_idct_is_not_opencv(quality):
    """Why the pipeline sets the IDCT: the default differs from OpenCV by several levels."""
    data = _jpeg(_scene(), quality=quality, subsampling=2)
    fast = tf.io.decode_jpeg(data, channels=3).numpy().astype(int)
    diff = np.abs(fast - _opencv_rgb(data))
    assert diff.max() >= 2, (diff.max(), np.mean(diff > 0))
