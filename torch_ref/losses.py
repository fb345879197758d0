"""mmseg 0.x decode-head losses and DDB's KL distillation loss, in torch (NCHW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """mmseg's ``resize``: bilinear, align_corners=False."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def seg_ce(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """mmseg CE: logits resized to the label size, ignore 255, x pixel weight, mean over
    all pixels (ignored ones in the denominator)."""
    logits = resize(logits, labels.shape[1:])
    loss = F.cross_entropy(logits, labels.long(), ignore_index=255, reduction="none")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def kl_loss(log_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """dass/models/utils/module.py ``kl_loss``: batchmean KL divided by H*W."""
    h, w = teacher.shape[-2:]
    return F.kl_div(log_student, teacher, reduction="batchmean") / (h * w)
