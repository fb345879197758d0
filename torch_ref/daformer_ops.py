"""DAFormer's DACS operations that differ from DDB's, in torch (lhoyer/DAFormer semantics).

- ``blur2d``: ``dacs_transforms.gaussian_blur`` on a (1, C, H, W) image: kornia 0.5.8
  ``GaussianBlur2d`` with kernel sizes from H and W (rows and columns), reflect padding,
  the 2-D kernel the outer product of two normalised 1-D Gaussians.
- ``strong``: ``strong_transform`` of one mixed image: jitter (kornia 0.5.8, factors and
  order of the image's own call) behind the batch's coin, then ``blur2d`` behind the batch's
  coin with the image's own sigma.
- ``class_masks``: ``get_class_masks``: each image's chosen classes among the values of
  the *whole batch's* labels (``torch.unique(labels)``).
- ``downscale_label_ratio`` and ``masked_feat_dist``: the ImageNet feature distance's
  label pooling and masked mean L2 distance.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from torch_ref.augment import IMAGE_MEAN, IMAGE_STD, color_jitter


def kernel_size(n: int) -> int:
    c = np.ceil(0.1 * n)
    return int(np.floor(c - 0.5 + c % 2))


def gaussian(size: int, sigma: float, dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def blur2d(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """One (C, H, W) image through DACS's 2-D Gaussian blur."""
    c, h, w = img.shape
    kh, kw = kernel_size(h), kernel_size(w)
    kernel = torch.outer(gaussian(kh, sigma, img.dtype), gaussian(kw, sigma, img.dtype))
    padded = F.pad(img[None], [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    return F.conv2d(padded, kernel.expand(c, 1, kh, kw), groups=c)[0]


def strong(img_hwc: np.ndarray, p: dict) -> np.ndarray:
    """DACS ``strong_transform`` on one normalised (H, W, 3) mixed image, draws ``p``."""
    img = torch.from_numpy(np.ascontiguousarray(np.asarray(img_hwc).transpose(2, 0, 1)))
    mean = torch.as_tensor(IMAGE_MEAN, dtype=img.dtype).view(3, 1, 1)
    std = torch.as_tensor(IMAGE_STD, dtype=img.dtype).view(3, 1, 1)
    if bool(p["jitter"]):
        rgb = (img * std + mean) / 255.0
        img = (color_jitter(rgb[None], p)[0] * 255.0 - mean) / std
    if bool(p["blur"]):
        img = blur2d(img, float(p["sigma"]))
    return img.numpy().transpose(1, 2, 0)


def class_masks(labels: torch.Tensor, choices: list[np.ndarray]) -> torch.Tensor:
    """``get_class_masks`` with the choices given: image i takes the values
    ``unique(labels)[choices[i]]`` (indices into the sorted values of the whole batch)."""
    values = torch.unique(labels)
    chosen = [values[torch.as_tensor(c).long()] for c in choices]
    return torch.stack([torch.isin(label, c) for label, c in zip(labels, chosen, strict=True)])


def downscale_label_ratio(gt, scale_factor, min_ratio, n_classes, ignore_index=255):
    """(N, 1, H, W) labels -> (N, 1, H // s, W // s): the majority value of each cell (ignore
    counted as class ``n_classes``), ``ignore_index`` where it covers < ``min_ratio``."""
    assert scale_factor > 1
    out = gt.clone()
    out[out == ignore_index] = n_classes
    one_hot = F.one_hot(out.squeeze(1).long(), num_classes=n_classes + 1).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(one_hot.float(), kernel_size=scale_factor)
    ratio, out = torch.max(pooled, dim=1, keepdim=True)
    out[out == n_classes] = ignore_index
    out[ratio < min_ratio] = ignore_index
    return out


def masked_feat_dist(f1: torch.Tensor, f2: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean over the mask's pixels of the channel L2 norm of ``f1 - f2`` (NCHW)."""
    distance = torch.norm(f1 - f2, dim=1, p=2)
    if mask is not None:
        distance = distance[mask.squeeze(1)]
    return torch.mean(distance)
