"""PyTorch reference of one DDB self-training iteration (``ST.forward_train`` semantics).

Shared by tests/test_self_training.py (parity) and benchmarks/train_step.py (the
PyTorch side of the step-time comparison): EMA update at the start of the iteration,
source CE backward, teacher (train-mode BN) pseudo-labels on the clean target, mixing
+ strong augmentation with draws given from outside, weighted mixed CE backward, one
AdamW step with the decode head at ``head_lr_mult`` x the rate.
"""

from __future__ import annotations

import torch

from torch_ref.augment import strong
from torch_ref.common import nchw, to_torch
from torch_ref.losses import resize, seg_ce
from torch_ref.optim import set_learning_rates


def torch_reference_step(
    student,
    teacher,
    opt,
    it,
    batch,
    masks,
    augs,
    config,
    use_pseudo=None,
    keep_grads=True,
    keep_probs=False,
):
    """One iteration of DDB's ST.forward_train on the torch models (mutates them).

    ``batch`` holds NHWC numpy arrays, ``masks`` (N, H, W) bool (1 = source pixel),
    ``augs`` one dict of strong-augmentation draws per sample (tests/test_augment.py).
    ``use_pseudo`` replaces the teacher's argmax in the mixed label: a random teacher has
    near-ties whose argmax float noise flips (agreement is checked separately), and the
    loss and gradient comparison should not depend on them. Works in the dtype of the
    models and of ``batch`` (float64 for the parity tests, float32 for the benchmark).
    Returns (source loss, mixed loss, gradients by name (empty unless ``keep_grads``),
    pseudo weight, extras: the teacher's labels 'pseudo', the mixed image 'mixed', and with
    ``keep_probs`` its probabilities 'probs' (N, K, H, W) and their maxima 'confidence').
    """
    set_learning_rates(opt, it, config.optim, config.num_steps)
    with torch.no_grad():
        alpha = min(1 - 1 / (it + 1), config.st.ema_alpha)
        for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
            t_param.mul_(alpha).add_((1 - alpha) * s_param)
    opt.zero_grad()
    device = next(student.parameters()).device  # CPU in tests; CUDA in the benchmark
    xs, xt = nchw(batch["source_image"]).to(device), nchw(batch["target_image"]).to(device)
    ys = to_torch(batch["source_label"]).to(device)
    size = tuple(ys.shape[1:])
    src_loss = seg_ce(student(xs)[0], ys)
    src_loss.backward()
    with torch.no_grad():
        t_logits = resize(teacher(xt)[0], size)
        probs = torch.softmax(t_logits, dim=1)
        prob, pseudo = probs.max(dim=1)
        weight = (prob >= config.st.pseudo_threshold).to(prob.dtype).mean()
    m = to_torch(masks).to(device)
    mixed = torch.where(m[:, None], xs, xt).cpu()
    mixed = torch.stack(
        [
            to_torch(strong(mixed[i].numpy().transpose(1, 2, 0), augs[i]).transpose(2, 0, 1))
            for i in range(len(augs))
        ]
    ).to(device)
    chosen = pseudo if use_pseudo is None else to_torch(use_pseudo).long().to(device)
    mixed_label = torch.where(m, ys.long(), chosen)
    mixed_weight = torch.where(m, torch.ones_like(prob), weight * torch.ones_like(prob))
    mix_loss = seg_ce(student(mixed)[0], mixed_label, mixed_weight)
    mix_loss.backward()
    grads = {}
    if keep_grads:
        grads = {n: p.grad.detach().cpu().numpy().copy() for n, p in student.named_parameters()}
    opt.step()
    extra = {"pseudo": pseudo.cpu().numpy(), "mixed": mixed.cpu().numpy().transpose(0, 2, 3, 1)}
    if keep_probs:
        extra.update(probs=probs.cpu().numpy(), confidence=prob.cpu().numpy())
    return float(src_loss.detach()), float(mix_loss.detach()), grads, float(weight), extra
