"""DDB's strong augmentation (``STDataset.post_process``) with kornia 0.5.8 semantics.

Written from kornia 0.5.8's source: ColorJitter (additive brightness, multiplicative
contrast, HSV saturation and hue, ops in a given order) and the reference's Gaussian
blur with its kernel sizes taken from a (1, C, H, W) view (horizontal only).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)


def rgb_to_hsv(image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    maxc, _ = image.max(-3)
    maxc_mask = image == maxc.unsqueeze(-3)
    _, max_indices = ((maxc_mask.cumsum(-3) == 1) & maxc_mask).max(-3)
    minc = image.min(-3)[0]
    deltac = maxc - minc
    s = deltac / (maxc + eps)
    deltac = torch.where(deltac == 0, torch.ones_like(deltac), deltac)
    maxc_tmp = maxc.unsqueeze(-3) - image
    rc, gc, bc = maxc_tmp[..., 0, :, :], maxc_tmp[..., 1, :, :], maxc_tmp[..., 2, :, :]
    h = torch.stack([bc - gc, 2.0 * deltac + rc - bc, 4.0 * deltac + gc - rc], dim=-3)
    h = torch.gather(h, dim=-3, index=max_indices[..., None, :, :]).squeeze(-3)
    h = ((h / deltac) / 6.0) % 1.0
    return torch.stack([2 * math.pi * h, s, maxc], dim=-3)


def hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    h = image[..., 0, :, :] / (2 * math.pi)
    s, v = image[..., 1, :, :], image[..., 2, :, :]
    hi = torch.floor(h * 6) % 6
    f = ((h * 6) % 6) - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.long()
    indices = torch.stack([hi, hi + 6, hi + 12], dim=-3)
    out = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), dim=-3)
    return torch.gather(out, -3, indices)


def color_jitter(img: torch.Tensor, p: dict) -> torch.Tensor:
    """kornia 0.5.8 ColorJitter.apply_transform on a (1, 3, H, W) tensor with draws ``p``."""

    def saturation(x):
        h, s, v = torch.chunk(rgb_to_hsv(x), 3, dim=-3)
        return hsv_to_rgb(torch.cat([h, torch.clamp(s * float(p["saturation"]), 0, 1), v], -3))

    def hue(x):
        h, s, v = torch.chunk(rgb_to_hsv(x), 3, dim=-3)
        h = torch.fmod(h + float(p["hue"]) * 2 * math.pi, 2 * math.pi)
        return hsv_to_rgb(torch.cat([h, s, v], -3))

    ops = [
        lambda x: torch.clamp(x + (float(p["brightness"]) - 1), 0, 1),
        lambda x: torch.clamp(x * float(p["contrast"]), 0, 1),
        saturation,
        hue,
    ]
    for idx in np.asarray(p["order"]):
        img = ops[int(idx)](img)
    return img


def blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """STDataset.gaussian_blur: GaussianBlur2d with the (quirky) kernel sizes, on (3, H, W)."""
    data = img.unsqueeze(0)
    sizes = [
        int(np.floor(np.ceil(0.1 * data.shape[d]) - 0.5 + np.ceil(0.1 * data.shape[d]) % 2))
        for d in (1, 2)
    ]

    def gauss(size):
        x = torch.arange(size, dtype=img.dtype) - size // 2
        g = torch.exp(-(x**2) / (2 * sigma**2))
        return g / g.sum()

    kernel = torch.matmul(gauss(sizes[0]).unsqueeze(-1), gauss(sizes[1]).unsqueeze(-1).t())
    kh, kw = kernel.shape
    padded = F.pad(data, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    weight = kernel.expand(3, 1, kh, kw)
    return F.conv2d(padded, weight, groups=3)[0]


def strong(img_hwc: np.ndarray, p: dict) -> np.ndarray:
    """STDataset.post_process on one normalised (H, W, 3) image, draws ``p`` given."""
    img = torch.from_numpy(np.ascontiguousarray(np.asarray(img_hwc).transpose(2, 0, 1)))
    mean = torch.as_tensor(IMAGE_MEAN, dtype=img.dtype).view(3, 1, 1)
    std = torch.as_tensor(IMAGE_STD, dtype=img.dtype).view(3, 1, 1)
    if bool(p["jitter"]):
        img = img * std + mean
        img = img / 255.0
        img = color_jitter(img.unsqueeze(0), p).squeeze(0)
        img = (img * 255.0 - mean) / std
    if bool(p["blur"]):
        img = blur(img, float(p["sigma"]))
    return img.numpy().transpose(1, 2, 0)


def random_draw(seed: int, jitter: bool = True, blur: bool = True) -> dict:
    """One image's augmentation draw (the fields of ``ddb_jax.uda.augment.draw_strong_params``)
    from NumPy, with the two coins given, so both sides can be fed the same draw."""
    rng = np.random.default_rng(seed)
    return dict(
        jitter=jitter,
        brightness=np.float32(rng.uniform(0.8, 1.2)),
        contrast=np.float32(rng.uniform(0.8, 1.2)),
        saturation=np.float32(rng.uniform(0.8, 1.2)),
        hue=np.float32(rng.uniform(-0.2, 0.2)),
        order=rng.permutation(4),
        blur=blur,
        sigma=np.float32(rng.uniform(0.15, 1.15)),
    )
