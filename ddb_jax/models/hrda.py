"""HRDA's multi-resolution segmentor (Hoyer et al., ECCV 2022) in Flax.

One backbone and one single-scale head see two views of an image: the whole image at half
resolution (the *context*) and a full-resolution *detail* crop. A second head on the context
features, the *scale attention*, weighs per class and pixel the detail logits against the
context logits:

    fused = up(att) * detail + up((1 - att) * context)         (up: bilinear x2)

In training the detail view is one crop (``box``, its top-left pixel) and the attention is
zero outside it, so the context alone is trained there; at inference (pseudo-labels,
evaluation) the detail logits cover the whole image, from overlapping windows of the crop
size run as one batch and averaged where they overlap. Parameter paths are the reference's:
``backbone/...``, ``decode_head/head/...``, ``decode_head/scale_attention/...``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax.ops import resize_bilinear

Outputs = dict[str, Any]
Box = tuple[int, int, int, int]  # y1, y2, x1, x2 (pixels)


def slide_windows(size: tuple[int, int], crop: tuple[int, int]) -> list[Box]:
    """The detail windows of inference: ``crop``-sized, stride ``crop // 2``, the last one
    flush with the image's edge (mmseg's slide rule); a crop larger than the image is the
    whole image. Row-major, the order their logits are summed in."""
    (h, w), (ch, cw) = size, crop
    sh, sw = ch // 2, cw // 2
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


def paste_average(window_logits: jax.Array, windows: list[Box], size, stride: int) -> jax.Array:
    """Logits of image-major batched windows (image j's windows are rows j*k..(j+1)*k, in
    the order of ``windows``) pasted at ``box / stride`` into a map of ``size`` pixels and
    averaged by the number of windows covering each cell."""
    k = len(windows)
    per_image = window_logits.reshape(-1, k, *window_logits.shape[1:])
    out_h, out_w = size[0] // stride, size[1] // stride
    total = jnp.zeros((per_image.shape[0], out_h, out_w, per_image.shape[-1]), per_image.dtype)
    count = np.zeros((out_h, out_w))
    for i, (y1, y2, x1, x2) in enumerate(windows):
        rows, cols = slice(y1 // stride, y2 // stride), slice(x1 // stride, x2 // stride)
        total = total.at[:, rows, cols].add(per_image[:, i])
        count[rows, cols] += 1
    return total / jnp.asarray(count, total.dtype)[None, :, :, None]


def box_mask(shape: tuple[int, int], box: jax.Array, crop: tuple[int, int], scale: int):
    """(1, h, w, 1) float: 1 on the cells of a ``shape`` grid that the pixel box ``box``
    ((y1, x1), traced) of size ``crop`` covers at ``scale`` pixels a cell (the reference's
    ``int(coordinate / scale)``: floor at both ends), 0 elsewhere."""
    y1, x1 = box[0], box[1]
    rows, cols = jnp.arange(shape[0]), jnp.arange(shape[1])
    in_rows = (rows >= y1 // scale) & (rows < (y1 + crop[0]) // scale)
    in_cols = (cols >= x1 // scale) & (cols < (x1 + crop[1]) // scale)
    return (in_rows[:, None] & in_cols[None, :])[None, :, :, None]


class HRDAHead(nn.Module):
    """HRDA's decode head: the single-scale ``head`` (context and detail share it) and the
    ``scale_attention`` head (the same kind, a class-wise or single-channel output)."""

    head: nn.Module
    scale_attention: nn.Module

    def __call__(self, features: list, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """``(logits, feature)`` of the single-scale head."""
        return self.head(features, train=train)

    def attention(self, features: list, train: bool = False) -> jax.Array:
        """sigmoid of the scale-attention logits, in (0, 1)."""
        return jax.nn.sigmoid(self.scale_attention(features, train=train)[0])


class HRDAEncoderDecoder(nn.Module):
    """HRDA: context (whole image at ``context_scale``) and detail (full resolution) views
    through one backbone and head, fused by the learnt scale attention.

    ``output_stride``: the single-scale head's (4 for DAFormer's, 8 for DeepLabV2's).
    ``detail_crop``: the detail crop (training) and window (inference) size in pixels.
    ``slide_detail``: inference runs the detail view in overlapping windows (HRDA's
    ``hr_slide_inference``); False: one pass over the whole full-resolution image.
    ``crop_divisible`` and ``detail_loss_weight`` (config.model.hrda's) are not used here:
    they ride along for the training step, which draws the box and weighs the losses.
    """

    backbone: nn.Module
    decode_head: HRDAHead
    output_stride: int = 4
    context_scale: float = 0.5
    detail_crop: tuple[int, int] = (512, 512)
    slide_detail: bool = True
    crop_divisible: int = 8
    detail_loss_weight: float = 0.1

    multi_resolution = True
    output_names = ("logits", "feature", "backbone")

    def _context_image(self, images: jax.Array) -> jax.Array:
        """The whole image resized by ``context_scale`` (torch bilinear, align_corners=False)."""
        n, h, w, _ = images.shape
        if self.context_scale != 0.5:
            raise ValueError(f"HRDA context_scale={self.context_scale}; only 0.5 is supported")
        cell = 2 * self.output_stride
        if h % cell or w % cell:
            raise ValueError(f"HRDA needs image sizes divisible by {cell}; got {h}x{w}")
        return resize_bilinear(images, (h // 2, w // 2))

    def _fuse(self, context_logits, attention, detail_logits) -> jax.Array:
        """up(att) * detail + up((1 - att) * context), in the reference's order."""
        h, w = context_logits.shape[1:3]
        up_context = resize_bilinear((1 - attention) * context_logits, (2 * h, 2 * w))
        up_attention = resize_bilinear(attention, (2 * h, 2 * w))
        return up_attention * detail_logits + up_context

    def _detail_windows(self, size: tuple[int, int]) -> list[Box]:
        """The inference detail windows: the slide windows, or the whole image."""
        if not self.slide_detail:
            return [(0, size[0], 0, size[1])]
        windows = slide_windows(size, self.detail_crop)
        if any(v % self.output_stride for box in windows for v in box):
            raise ValueError(
                f"HRDA slide windows {windows} of {size} are not aligned to the output "
                f"stride {self.output_stride}; use a detail crop divisible by "
                f"{2 * self.output_stride}"
            )
        return windows

    def __call__(self, images: jax.Array, train: bool = False) -> Outputs:
        """Inference (HRDA's ``encode_decode``): ``{'logits', 'feature'}``, fused logits at
        the output stride and the context head's feature. ``train`` sets BN and dropout."""
        out = self.forward_with_features(images, train=train)
        return {"logits": out["logits"], "feature": out["feature"]}

    def forward_with_features(self, images: jax.Array, train: bool = False) -> Outputs:
        """``__call__`` plus ``'backbone'``: the context image's backbone maps."""
        size = images.shape[1:3]
        windows = self._detail_windows(size)
        # The reference's order (it matters to BN's running statistics in train mode):
        # backbone on the context, on the detail windows (one batch), then the head on each.
        # The windows' batch is image-major (the reference's is window-major: the same
        # values, BN's batch statistics summed in another order), so that a batch sharded
        # over devices keeps each image's windows on its device: window-major, the compiler
        # gathered the whole batch on every device and permuted it back.
        context_features = self.backbone(self._context_image(images), train=train)
        crops = jnp.stack([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], axis=1)
        crops = crops.reshape(-1, *crops.shape[2:])
        detail_features = self.backbone(crops, train=train)
        context_logits, feature = self.decode_head(context_features, train=train)
        detail_logits = self.decode_head(detail_features, train=train)[0]
        detail = paste_average(detail_logits, windows, size, self.output_stride)
        attention = self.decode_head.attention(context_features, train=train)
        fused = self._fuse(context_logits, attention, detail)
        return {"logits": fused, "feature": feature, "backbone": context_features}

    def forward_train(self, images: jax.Array, box: jax.Array, train: bool = True) -> Outputs:
        """Training forward with the detail crop at ``box`` = (y1, x1) (int32, traced). Its
        coordinates must be multiples of the output stride and keep the crop inside the
        image (XLA clamps slices silently); the attention's mask on the context grid is
        ``box // (2 * stride)``, floored as the reference's ``int()`` (exact for multiples
        of ``2 * stride``, e.g. the training code's ``crop_divisible=8`` with DAFormer's head).

        Returns ``logits`` (fused, whole image at the output stride), ``detail_logits`` (the
        crop's), ``context_logits`` (the raw context head's, at half resolution), ``feature``
        (the context head's) and ``backbone`` (the context image's maps).
        """
        n, h, w, c = images.shape
        ch, cw = self.detail_crop
        if ch > h or cw > w or ch % self.output_stride or cw % self.output_stride:
            raise ValueError(
                f"HRDA detail crop {ch}x{cw} must fit {h}x{w} and be divisible by "
                f"{self.output_stride}"
            )
        box = jnp.asarray(box, jnp.int32)
        zero = jnp.zeros((), jnp.int32)  # slice starts of one integer type (x64 or not)
        context_features = self.backbone(self._context_image(images), train=train)
        crop = jax.lax.dynamic_slice(images, (zero, box[0], box[1], zero), (n, ch, cw, c))
        detail_features = self.backbone(crop, train=train)
        context_logits, feature = self.decode_head(context_features, train=train)
        detail_logits = self.decode_head(detail_features, train=train)[0]
        attention = self.decode_head.attention(context_features, train=train)
        context_scale_cell = int(self.output_stride / self.context_scale)
        mask = box_mask(context_logits.shape[1:3], box, (ch, cw), context_scale_cell)
        attention = attention * mask.astype(attention.dtype)
        s = self.output_stride
        inserted = jax.lax.dynamic_update_slice(
            jnp.zeros((n, h // s, w // s, detail_logits.shape[-1]), detail_logits.dtype),
            detail_logits,
            (zero, box[0] // s, box[1] // s, zero),
        )
        return {
            "logits": self._fuse(context_logits, attention, inserted),
            "detail_logits": detail_logits,
            "context_logits": context_logits,
            "feature": feature,
            "backbone": context_features,
        }

    def extract_feat(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
        """The context image's backbone maps (HRDA's ``feature_scale=0.5``): what DAFormer's
        frozen ImageNet feature distance compares."""
        return self.backbone(self._context_image(images), train=train)
