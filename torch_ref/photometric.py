"""mmseg 0.x ``PhotoMetricDistortion`` (mmcv 1.x colour conversions) in NumPy/OpenCV.

Written from mmseg 0.22's semantics with the random draws passed in, so a test can give
this and ``input_pipeline.photometric`` the same draws. The image is uint8 BGR, as in
mmseg's pipeline (after RandomFlip, before Normalize); every op returns uint8.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class Draws:
    """mmseg's random choices: ``random.randint(2)`` coins and the values they gate."""

    brightness: bool
    beta: float  # uniform(-32, 32)
    contrast_first: bool  # mmseg's mode == 1
    contrast: bool
    contrast_alpha: float  # uniform(0.5, 1.5)
    saturation: bool
    saturation_alpha: float  # uniform(0.5, 1.5)
    hue: bool
    hue_delta: int  # randint(-18, 18): -18..17


def convert(img: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
    """mmseg: multiply and add in float32, clip to [0, 255], cast (truncate) to uint8."""
    out = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


def saturation(img: np.ndarray, alpha: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)  # mmcv.bgr2hsv
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=alpha)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)  # mmcv.hsv2bgr


def hue(img: np.ndarray, delta: int) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + delta) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def photometric_distortion(img: np.ndarray, draws: Draws) -> np.ndarray:
    """mmseg's ``__call__``: brightness, contrast (mode 1), saturation, hue, contrast
    (mode 0), each applied when its coin is set."""
    if draws.brightness:
        img = convert(img, beta=draws.beta)
    if draws.contrast_first and draws.contrast:
        img = convert(img, alpha=draws.contrast_alpha)
    if draws.saturation:
        img = saturation(img, draws.saturation_alpha)
    if draws.hue:
        img = hue(img, draws.hue_delta)
    if not draws.contrast_first and draws.contrast:
        img = convert(img, alpha=draws.contrast_alpha)
    return img
