"""MIC's masked image consistency (lhoyer/MIC ``MaskingConsistencyModule``, mode
'separatetrgaug'), in torch, with the random draws given from outside.

The target batch is colour-augmented in one DACS ``strong_transform`` call (kornia 0.5.8:
one jitter coin, one op order, per-image factors; one blur coin and one sigma, a 2-D
kernel), then multiplied by the block mask (``BlockMaskGenerator``: a grid of U(0, 1) >
ratio, resized to the image with mmseg's ``resize``, i.e. nearest); the student learns the
host teacher's pseudo-labels on it, weighted by the host's pseudo-label weight.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from torch_ref.augment import IMAGE_MEAN, IMAGE_STD, color_jitter
from torch_ref.daformer_ops import blur2d
from torch_ref.losses import seg_ce


def block_mask(keep_grid, size) -> torch.Tensor:
    """(N, gh, gw) 0/1 grid -> (N, 1, H, W) float mask, nearest as MIC's ``resize``."""
    grid = torch.from_numpy(np.array(keep_grid, np.float64))[:, None]
    return F.interpolate(grid, size=tuple(size), mode="nearest")


def augment_batch(images: torch.Tensor, augs: list[dict]) -> torch.Tensor:
    """DACS's ``strong_transform`` on a normalised NCHW batch in one call: coins, op order
    and sigma from the first image's draw (shared), jitter factors per image."""
    shared = augs[0]
    mean = torch.as_tensor(IMAGE_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGE_STD, dtype=images.dtype).view(1, 3, 1, 1)
    if bool(shared["jitter"]):
        rgb = (images * std + mean) / 255.0
        rgb = torch.cat(
            [
                color_jitter(rgb[i : i + 1], {**p, "order": shared["order"]})
                for i, p in enumerate(augs)
            ]
        )
        images = (rgb * 255.0 - mean) / std
    if bool(shared["blur"]):
        images = torch.stack([blur2d(x, float(shared["sigma"])) for x in images])
    return images


def masked_input(target: torch.Tensor, augs: list[dict] | None, keep_grid) -> torch.Tensor:
    """MIC's student input: the (augmented) target batch times the block mask."""
    images = augment_batch(target, augs) if augs is not None else target
    return images * block_mask(keep_grid, images.shape[2:]).to(images.dtype)


def mic_loss(student, images, pseudo_label, pseudo_weight, weight: float = 1.0):
    """``weight`` x the student's weighted CE on MIC's input (training mode)."""
    return weight * seg_ce(student(images)[0], pseudo_label, pseudo_weight)
