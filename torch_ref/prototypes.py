"""DDB's class features (``ClassFeatures``) and CKD's prototype rectification, in torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_vectors(feat: torch.Tensor, logits: torch.Tensor, num_classes: int) -> dict:
    """ClassFeatures.calculate_mean_vector (NCHW): {(image, class): mean feature}."""
    pred = F.one_hot(logits.softmax(1).argmax(1), num_classes + 1).permute(0, 3, 1, 2)
    pred = pred.to(feat.dtype)
    scale = F.adaptive_avg_pool2d(pred, 1)
    out = {}
    for n in range(feat.shape[0]):
        for t in range(num_classes):
            if scale[n][t].item() == 0 or (pred[n][t] > 0).sum() < 10:
                continue
            s = F.adaptive_avg_pool2d(feat[n] * pred[n][t], 1) / scale[n][t]
            out[(n, t)] = s.squeeze()
    return out


def update_table(table, counts, idx: int, vector, cap: int) -> None:
    """ClassFeatures.update_objective_SingleVector(..., 'mean') with a configurable cap."""
    if vector.sum().item() == 0:
        return
    table[idx] = (table[idx] * counts[idx] + vector.squeeze()) / (counts[idx] + 1)
    counts[idx] = min(counts[idx] + 1, cap)


def sequential_table(outputs, num_classes: int, channels: int, cap: int, min_pixels: int = 10):
    """The reference's class features image by image (DDB's ClassFeatures, ProDA's
    calc_prototype.py): per (logits CHW, feature CHW), each class predicted on at least
    ``min_pixels`` pixels adds its mean feature to a running mean capped at ``cap``."""
    table, counts = torch.zeros(num_classes, channels), torch.zeros(num_classes)
    for logits, feature in outputs:
        pred = F.softmax(logits, 0).argmax(0)
        for k in range(num_classes):
            mask = pred == k
            if mask.sum() < min_pixels:
                continue
            vector = feature[:, mask].mean(1)
            if vector.sum() == 0:
                continue
            table[k] = (table[k] * counts[k] + vector) / (counts[k] + 1)
            counts[k] = min(counts[k] + 1, cap)
    return table.numpy(), counts.numpy()


def prototype_weight(feature: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """CKD.get_prototype_weight: softmax over classes of -(d - min d), d an L2 distance."""
    n, _, h, w = feature.shape
    dist = torch.stack(
        [
            torch.norm(vectors[i].reshape(-1, 1, 1).expand(-1, h, w) - feature, 2, dim=1)
            for i in range(vectors.shape[0])
        ],
        dim=1,
    )
    dist = dist - dist.min(dim=1, keepdim=True)[0]
    return F.softmax(-dist, dim=1)


def rectified_ensemble(logits_a, w_a, logits_b, w_b, on_prob: bool):
    """CKD's hard-label branch with proto_rectify on: (confidence, label) per pixel."""
    if on_prob:
        sa, sb = w_a * torch.softmax(logits_a, 1), w_b * torch.softmax(logits_b, 1)
    else:
        sa, sb = torch.softmax(w_a * logits_a, 1), torch.softmax(w_b * logits_b, 1)
    return torch.max(sa * 0.5 + sb * 0.5, dim=1)
