"""PyTorch transcription of HRDA's segmentor (HRDAEncoderDecoder + HRDAHead), test use only.

Written from the semantics of HRDA's code (scales [0.5, 1], one detail crop in training,
overlapping slide windows for the detail view at inference) with the torch_ref backbones
and heads: MiT + DAFormer's head (the scale attention's fusion a 1x1 ConvModule), or
ResNetV1c + DAFormer's DLV2Head for both. Module names give the reference's state-dict
keys: ``backbone.*``, ``decode_head.head.*``, ``decode_head.scale_attention.*``. Heads
return ``(logits, feature)``; every function here keeps the reference's order of backbone
and head calls (it fixes the order of BN's running-statistics updates in train mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref import mit_heads, resnet_dlv2

CONTEXT_SCALE = 0.5


def resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """mmseg's ``resize`` by a scale factor: bilinear, align_corners=False."""
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def slide_windows(h: int, w: int, crop: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of the overlapping detail windows (stride crop // 2, the last one
    flush with the edge), row-major."""
    (ch, cw), (sh, sw) = crop, (crop[0] // 2, crop[1] // 2)
    windows = []
    for r in range(max(h - ch + sh - 1, 0) // sh + 1):
        for c in range(max(w - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


class HRDAHead(nn.Module):
    """Holds the single-scale ``head`` and the ``scale_attention`` head (names = keys)."""

    def __init__(self, head: nn.Module, scale_attention: nn.Module):
        super().__init__()
        self.head = head
        self.scale_attention = scale_attention

    def attention(self, features: list) -> torch.Tensor:
        return torch.sigmoid(self.scale_attention(features)[0])


class HRDASegmentor(nn.Module):
    """HRDA around ``backbone``; ``output_stride`` is the single-scale head's."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        scale_attention: nn.Module,
        output_stride: int,
        detail_crop: tuple[int, int] = (512, 512),
        slide: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.decode_head = HRDAHead(head, scale_attention)
        self.os = output_stride
        self.crop = tuple(detail_crop)
        self.slide = slide

    def forward_train(self, img: torch.Tensor, box: tuple[int, int]):
        """Training forward with the detail crop's top-left pixel ``box`` = (y1, x1).

        Returns (fused logits at the output stride, raw context logits, detail logits).
        The reference's HRDAHead returns the context logits after ``(1 - att) *``; they
        feed only its context loss, whose weight is 0 in HRDA's published configs.
        """
        (y1, x1), (ch, cw), os = box, self.crop, self.os
        context_features = self.backbone(resize(img, CONTEXT_SCALE))
        detail_features = self.backbone(img[:, :, y1 : y1 + ch, x1 : x1 + cw])
        lr = self.decode_head.head(context_features)[0]
        hr = self.decode_head.head(detail_features)[0]
        att = self.decode_head.attention(context_features)
        mask = lr.new_zeros((lr.shape[0], 1, *lr.shape[2:]))
        cell = os / CONTEXT_SCALE
        mask[
            :, :, int(y1 / cell) : int((y1 + ch) / cell), int(x1 / cell) : int((x1 + cw) / cell)
        ] = 1
        att = att * mask
        up_lr = resize((1 - att) * lr, 1 / CONTEXT_SCALE)
        att = resize(att, 1 / CONTEXT_SCALE)
        inserted = torch.zeros_like(up_lr)
        inserted[:, :, y1 // os : (y1 + ch) // os, x1 // os : (x1 + cw) // os] = hr
        return att * inserted + up_lr, lr, hr

    def detail_logits(self, detail_features: list, windows, bs: int, size) -> torch.Tensor:
        """Window logits (crop-major batch) pasted at box / os and averaged by coverage."""
        logits = self.decode_head.head(detail_features)[0]
        h, w = size[0] // self.os, size[1] // self.os
        preds = logits.new_zeros((bs, logits.shape[1], h, w))
        count = logits.new_zeros((bs, 1, h, w))
        for i, (y1, y2, x1, x2) in enumerate(windows):
            y1, y2, x1, x2 = (v // self.os for v in (y1, y2, x1, x2))
            preds += F.pad(logits[i * bs : (i + 1) * bs], (x1, w - x2, y1, h - y2))
            count[:, :, y1:y2, x1:x2] += 1
        return preds / count

    def encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        """Inference: fused logits at the output stride (the detail view in slide windows,
        or in one pass over the whole image when ``slide`` is off)."""
        bs, _, h, w = img.shape
        windows = slide_windows(h, w, self.crop) if self.slide else [(0, h, 0, w)]
        context_features = self.backbone(resize(img, CONTEXT_SCALE))
        crops = torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], dim=0)
        detail_features = self.backbone(crops)
        lr = self.decode_head.head(context_features)[0]
        hr = self.detail_logits(detail_features, windows, bs, (h, w))
        att = self.decode_head.attention(context_features)
        up_lr = resize((1 - att) * lr, 1 / CONTEXT_SCALE)
        return resize(att, 1 / CONTEXT_SCALE) * hr + up_lr


def daformer_hrda(
    channels: int,
    attention_channels: int,
    num_classes: int = 19,
    classwise: bool = True,
    dropout: float = 0.0,
    **settings,
) -> HRDASegmentor:
    """MiT-B0 (NVlabs names) + DAFormer head, attention head with a 1x1 conv fusion."""
    dims = mit_heads.MIT_B0["embed_dims"]
    head = mit_heads.DAFormerHead(dims, channels, num_classes, dropout)
    attention = mit_heads.DAFormerHead(
        dims, attention_channels, num_classes if classwise else 1, dropout, fusion="conv"
    )
    backbone = mit_heads.NVMiT(**mit_heads.MIT_B0)
    return HRDASegmentor(backbone, head, attention, 4, **settings)


def dlv2_hrda(
    depth: int, base_channels: int, num_classes: int = 19, classwise: bool = True, **settings
) -> HRDASegmentor:
    """ResNetV1c + DAFormer's DLV2Head (dilations 6, 12) as head and attention."""
    in_channels = base_channels * 8 * (4 if depth >= 50 else 1)
    head = resnet_dlv2.DLV2SumHead(in_channels, num_classes=num_classes)
    attention = resnet_dlv2.DLV2SumHead(in_channels, num_classes=num_classes if classwise else 1)
    backbone = resnet_dlv2.ResNetV1c(depth, base_channels=base_channels)
    return HRDASegmentor(backbone, head, attention, 8, **settings)
