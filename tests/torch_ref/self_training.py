"""PyTorch reference of one DDB self-training iteration (``ST.forward_train`` semantics).

Shared by tests/test_self_training.py (parity) and benchmarks/train_step.py (the
PyTorch side of the step-time comparison): EMA update at the start of the iteration,
source CE backward, teacher (train-mode BN) pseudo-labels on the clean target, mixing
+ strong augmentation with draws given from outside, weighted mixed CE backward, one
AdamW step with the decode head at ``head_lr_mult`` x the rate.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tests.test_augment import torch_strong
from tests.test_optim import mmcv_lr


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def nchw(x: np.ndarray) -> torch.Tensor:
    return to_torch(x.transpose(0, 3, 1, 2))


def torch_ce(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """mmseg CE: logits resized to the label size, ignore 255, mean over all pixels."""
    logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, labels.long(), ignore_index=255, reduction="none")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def make_optimizer(student: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW with two groups (backbone, decode head) as the mmcv paramwise config builds."""
    head = [p for n, p in student.named_parameters() if n.startswith("decode_head")]
    body = [p for n, p in student.named_parameters() if not n.startswith("decode_head")]
    return torch.optim.AdamW(
        [{"params": body}, {"params": head}],
        lr=optim_cfg.lr,
        betas=(optim_cfg.b1, optim_cfg.b2),
        weight_decay=optim_cfg.weight_decay,
    )


def torch_reference_step(
    student, teacher, opt, it, batch, masks, augs, config, use_pseudo=None, keep_grads=True
):
    """One iteration of DDB's ST.forward_train on the torch models (mutates them).

    ``batch`` holds NHWC numpy arrays, ``masks`` (N, H, W) bool (1 = source pixel),
    ``augs`` one dict of strong-augmentation draws per sample (tests/test_augment.py).
    ``use_pseudo`` replaces the teacher's argmax in the mixed label: a random teacher has
    near-ties whose argmax float noise flips (agreement is checked separately), and the
    loss and gradient comparison should not depend on them. Returns (source loss, mixed
    loss, gradients by name (empty unless ``keep_grads``), pseudo weight, extras).
    """
    optim_cfg = config.optim
    for group, mult in zip(opt.param_groups, (1.0, optim_cfg.head_lr_mult), strict=True):
        group["lr"] = mmcv_lr(
            it,
            optim_cfg.lr * mult,
            config.num_steps,
            optim_cfg.warmup_iters,
            optim_cfg.warmup_ratio,
            optim_cfg.poly_power,
            optim_cfg.min_lr,
        )
    with torch.no_grad():
        alpha = min(1 - 1 / (it + 1), config.st.ema_alpha)
        for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
            t_param.mul_(alpha).add_((1 - alpha) * s_param)
    opt.zero_grad()
    device = next(student.parameters()).device  # CPU in tests; CUDA in the benchmark
    xs, xt = nchw(batch["source_image"]).to(device), nchw(batch["target_image"]).to(device)
    ys = to_torch(batch["source_label"]).to(device)
    size = tuple(ys.shape[1:])
    src_loss = torch_ce(student(xs)[0], ys)
    src_loss.backward()
    with torch.no_grad():
        t_logits = F.interpolate(teacher(xt)[0], size=size, mode="bilinear", align_corners=False)
        prob, pseudo = torch.softmax(t_logits, dim=1).max(dim=1)
        weight = (prob >= config.st.pseudo_threshold).float().mean()
    m = to_torch(masks).to(device)
    mixed = torch.where(m[:, None], xs, xt).cpu()
    mixed = torch.stack(
        [
            to_torch(torch_strong(mixed[i].numpy().transpose(1, 2, 0), augs[i]).transpose(2, 0, 1))
            for i in range(len(augs))
        ]
    ).to(device)
    chosen = pseudo if use_pseudo is None else to_torch(use_pseudo).long().to(device)
    mixed_label = torch.where(m, ys.long(), chosen)
    mixed_weight = torch.where(m, torch.ones_like(prob), weight * torch.ones_like(prob))
    mix_loss = torch_ce(student(mixed)[0], mixed_label, mixed_weight)
    mix_loss.backward()
    grads = {}
    if keep_grads:
        grads = {n: p.grad.detach().cpu().numpy().copy() for n, p in student.named_parameters()}
    opt.step()
    extra = {"pseudo": pseudo.cpu().numpy(), "mixed": mixed.cpu().numpy().transpose(0, 2, 3, 1)}
    return float(src_loss), float(mix_loss), grads, float(weight), extra
