"""PyTorch reference of one self-training iteration in DAFormer's ``DACS.forward_train``
form, with its options: the ImageNet feature distance and MIC's masked term (lhoyer/MIC's
``DACS`` calls the MIC module after the mixed loss).

DDB's ``ST`` step is the same iteration without the feature distance and with its own
augmentation draws, so one function serves both: ``blur_2d`` picks DACS's blur, the draws
(masks, per-image augmentation parameters with the batch's coins already in them, MIC's
draws) come from outside. The student and teacher are segmentors with ``backbone`` and
``decode_head`` (torch_ref.resnet_dlv2.Segmentor, torch_ref.mit_heads.EncoderDecoder),
without dropout. Per iteration:

1. EMA: ``a = min(1 - 1/(it + 1), alpha)``, teacher <- a teacher + (1 - a) student.
2. Source CE on the student's forward, backward (graph kept for the feature distance).
3. Feature distance: the frozen model in eval mode on the source; labels pooled to the
   last map (``downscale_label_ratio``), thing-class cells; ``lambda`` x masked mean L2;
   backward.
4. Teacher (training-mode BN) pseudo-labels and one weight for the batch, zeroed in the
   top and bottom rows.
5. Mixed image (mask, then each image's strong augmentation), mixed label and weight; CE;
   backward.
6. MIC: the student on the masked, augmented target against the teacher's labels and
   weight; backward.
7. One AdamW step (the optimiser's own groups and rates, set by the caller).
"""

from __future__ import annotations

import numpy as np
import torch

from torch_ref import augment as ddb_augment
from torch_ref import daformer_ops, mic
from torch_ref.common import nchw, to_torch
from torch_ref.losses import resize, seg_ce


def ema_update(teacher, student, it: int, alpha_max: float) -> None:
    alpha = min(1 - 1 / (it + 1), alpha_max)
    with torch.no_grad():
        for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
            t_param.mul_(alpha).add_((1 - alpha) * s_param)


def feature_distance(student_feats, imnet, images, labels, fd_cfg):
    """(``lambda`` x DAFormer's ``calc_feat_dist``, its mask): last map; thing classes
    unless none (then the mask is None)."""
    with torch.no_grad():
        imnet.eval()
        frozen = [f.detach() for f in imnet.backbone(images)]
    mask = None
    if fd_cfg.classes:
        scale = labels.shape[-1] // student_feats[-1].shape[-1]
        pooled = daformer_ops.downscale_label_ratio(labels[:, None], scale, fd_cfg.min_ratio, 19)
        classes = torch.tensor(fd_cfg.classes)
        mask = torch.any(pooled.long()[..., None] == classes, -1)
    distance = daformer_ops.masked_feat_dist(student_feats[-1], frozen[-1], mask)
    return fd_cfg.weight * distance, mask


def dacs_step(
    student,
    teacher,
    opt,
    it,
    batch,
    masks,
    augs,
    config,
    *,
    blur_2d: bool,
    imnet=None,
    mic_draws=None,
    use_pseudo=None,
    inputs=None,
):
    """One iteration (mutates the models and the optimiser; rates set by the caller).

    ``masks`` (N, H, W) bool (1 = source pixel), ``augs`` one dict of strong-augmentation
    draws per image. ``imnet``: the frozen model (feature distance on, ``config.fdist``).
    ``mic_draws``: {'aug': per-image dicts (shared fields equal) or None, 'grid': the kept
    blocks (N, gh, gw)}
    (MIC on, ``config.mic``). ``use_pseudo`` replaces the teacher's argmax in the labels
    (near-ties are checked separately). ``inputs`` ({'mixed', 'mic'}: NHWC arrays) are the
    student's inputs instead of the images built here from the draws (still returned):
    a step's returned draws can be a few float32 ulps off the ones it used (see
    tests/test_mic.py), so the losses and gradients are compared on the same inputs and
    the images on their own. Returns ({term: loss}, gradients by name, pseudo
    weight, extras: 'probs', 'confidence', 'pixel_weight', 'mixed', 'mic_image',
    'fdist_mask').
    """
    ema_update(teacher, student, it, config.st.ema_alpha)
    opt.zero_grad()
    xs, xt = nchw(batch["source_image"]), nchw(batch["target_image"])
    ys = to_torch(batch["source_label"]).long()
    size = tuple(ys.shape[1:])
    out, extra = {}, {}

    feats = student.backbone(xs)
    out["source"] = seg_ce(student.decode_head(feats)[0], ys)
    out["source"].backward(retain_graph=imnet is not None)
    if imnet is not None:
        out["fdist"], mask = feature_distance(feats, imnet, xs, ys, config.fdist)
        out["fdist"].backward()
        extra["fdist_mask"] = None if mask is None else mask[:, 0].numpy()

    with torch.no_grad():
        probs = torch.softmax(resize(teacher(xt)[0], size), dim=1)
        prob, pseudo = probs.max(dim=1)
        weight = (prob >= config.st.pseudo_threshold).to(prob.dtype).mean()
        pixel_weight = weight * torch.ones_like(prob)
        top, bottom = config.st.pseudo_weight_ignore_top, config.st.pseudo_weight_ignore_bottom
        if top > 0:
            pixel_weight[:, :top] = 0
        if bottom > 0:
            pixel_weight[:, -bottom:] = 0
    labels = pseudo if use_pseudo is None else to_torch(use_pseudo).long()

    m = to_torch(masks)
    mixed = torch.where(m[:, None], xs, xt)
    transform = daformer_ops.strong if blur_2d else ddb_augment.strong
    mixed = torch.stack(
        [to_torch(transform(mixed[i].numpy().transpose(1, 2, 0), augs[i]).transpose(2, 0, 1))
         for i in range(len(augs))]
    )  # fmt: skip
    mixed_label = torch.where(m, ys, labels)
    mixed_weight = torch.where(m, torch.ones_like(prob), pixel_weight)
    inputs = inputs or {}
    student_input = nchw(inputs["mixed"]) if "mixed" in inputs else mixed
    out["mixed"] = seg_ce(student(student_input)[0], mixed_label, mixed_weight)
    out["mixed"].backward()

    if mic_draws is not None:
        images = mic.masked_input(xt, mic_draws["aug"], mic_draws["grid"])
        student_input = nchw(inputs["mic"]) if "mic" in inputs else images
        out["mic"] = mic.mic_loss(student, student_input, labels, pixel_weight, config.mic.weight)
        out["mic"].backward()
        extra["mic_image"] = images.numpy().transpose(0, 2, 3, 1)

    grads = {n: p.grad.detach().numpy().copy() for n, p in student.named_parameters()}
    opt.step()
    extra.update(
        probs=probs.numpy(),
        confidence=prob.numpy(),
        mixed=mixed.numpy().transpose(0, 2, 3, 1),
        pixel_weight=pixel_weight.numpy(),
    )
    losses = {k: float(v.detach()) for k, v in out.items()}
    return losses, grads, float(weight), extra


def as_numpy_draws(aug: dict) -> list[dict]:
    """Stacked (N, ...) draws as one dict per image."""
    aug = {k: np.asarray(v) for k, v in aug.items()}
    return [{k: v[i] for k, v in aug.items()} for i in range(len(aug["jitter"]))]
