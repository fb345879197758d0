"""DDB's cut-mix box (``STDataset.get_cut_mask``) with its three uniforms given."""

from __future__ import annotations

import numpy as np


def cut_mask(uniforms, shape, area_ratio: float = 0.4) -> np.ndarray:
    """The reference's (H, W) 0/1 cut mask, computed in float64 as its numpy code does."""
    h, w = shape
    y_props = np.exp(np.array([uniforms[0]]) * np.log(area_ratio))
    x_props = area_ratio / y_props
    sizes = np.round(np.stack([y_props, x_props], axis=1) * np.array((h, w))[None, :])
    positions = np.round((np.array((h, w)) - sizes) * np.array([uniforms[1:3]]))
    y0, x0, y1, x1 = np.append(positions, positions + sizes, axis=1)[0]
    mask = np.zeros((h, w), np.int64)
    mask[int(y0) : int(y1), int(x0) : int(x1)] = 1
    return mask
