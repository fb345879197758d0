"""PyTorch reference of one iteration of MIC's ``DACS.forward_train`` with HRDA's student and
teacher (lhoyer/MIC, configs/hrda and configs/mic), test use only: DAFormer's DACS step
(torch_ref/daformer.py) where every student forward is HRDA's training forward on its own
detail box and the teacher's pseudo-labels come from HRDA's inference.

The student and teacher are torch_ref.hrda.HRDASegmentor (no dropout); the random draws
(class-mix masks, per-image augmentation parameters with the batch's coins in them, MIC's
draws) and the detail boxes come from outside, one box per student forward in their order
(source, mixed, MIC). Per iteration:

1. EMA: ``a = min(1 - 1/(it + 1), alpha)``, teacher <- a teacher + (1 - a) student.
2. Source: ``forward_train`` on box 0, HRDA's loss (below), backward (graph kept for the
   feature distance).
3. Feature distance (HRDA's ``feature_scale=0.5``): the source forward's *context* backbone
   maps (its first backbone pass) against the frozen model's backbone, in eval mode, on the
   half-size source image (the frozen segmentor's ``extract_feat``); the label is pooled by
   ``label width // map width``, thing-class cells; ``lambda`` x masked mean L2; backward.
4. Teacher (training-mode BN, dropout off) ``encode_decode`` on the target (the detail view
   in slide windows, no box mask on the attention), resized to the image, softmax; argmax
   and ONE confidence weight for the batch, times the valid mask (HRDA's pseudo-label
   margins: ``filter_valid_pseudo_region``).
5. Mixed image (mask, then each image's strong augmentation), mixed label and weight;
   ``forward_train`` on box 1, HRDA's loss; backward.
6. MIC: the masked, augmented target; ``forward_train`` on box 2, HRDA's loss against the
   teacher's labels and weight; backward.
7. One AdamW step (the optimiser's own groups and rates, set by the caller).

HRDA's loss (``HRDAHead.losses`` with ``lr_loss_weight=0``):
``(1 - hr_w) CE(fused, y, w) + hr_w CE(detail, crop(y), crop(w))``, each mmseg's CE (logits
resized to the label, mean over all pixels). MIC's ``mask_lambda`` scales the fused term
only (the reference multiplies ``'decode.loss_seg'``; 1 in MIC's configs).
"""

from __future__ import annotations

import torch

from torch_ref import augment as ddb_augment
from torch_ref import daformer_ops, mic
from torch_ref.common import nchw, to_torch
from torch_ref.daformer import ema_update, feature_distance
from torch_ref.hrda import CONTEXT_SCALE, HRDASegmentor
from torch_ref.hrda import resize as scale_image
from torch_ref.losses import resize, seg_ce


def forward_train_with_context(model: HRDASegmentor, img: torch.Tensor, box):
    """``model.forward_train(img, box)`` and the context image's backbone maps: (fused,
    context logits, detail logits, maps). The maps are the output of the forward's first
    backbone pass (the context), taken by a forward hook, so the forward is the model's own
    and the maps stay in its graph."""
    passes = []
    handle = model.backbone.register_forward_hook(lambda module, args, out: passes.append(out))
    try:
        fused, lr, hr = model.forward_train(img, tuple(int(v) for v in box))
    finally:
        handle.remove()
    assert len(passes) == 2  # context, detail
    return fused, lr, hr, passes[0]


def hrda_loss(fused, hr, labels, weight, box, crop, detail_weight: float, fused_scale=1.0):
    """HRDA's head loss on a box (top-left pixel ``box``, size ``crop``); ``fused_scale``
    multiplies the fused term alone (MIC's ``mask_lambda``)."""
    loss = (1 - detail_weight) * seg_ce(fused, labels, weight) * fused_scale
    if detail_weight == 0:
        return loss
    (y1, x1), (ch, cw) = (int(v) for v in box), crop
    cropped = labels[:, y1 : y1 + ch, x1 : x1 + cw]
    cropped_weight = None if weight is None else weight[:, y1 : y1 + ch, x1 : x1 + cw]
    return loss + detail_weight * seg_ce(hr, cropped, cropped_weight)


def hrda_dacs_step(
    student: HRDASegmentor,
    teacher: HRDASegmentor,
    opt,
    it: int,
    batch: dict,
    masks,
    augs: list[dict],
    boxes,
    config,
    *,
    imnet: HRDASegmentor | None = None,
    mic_draws=None,
    use_pseudo=None,
    inputs=None,
):
    """One iteration (mutates the models and the optimiser; rates set by the caller).

    ``masks`` (N, H, W) bool (1 = source pixel); ``augs`` one dict of strong-augmentation
    draws per image (DACS's 2-D blur); ``boxes`` the detail boxes (y1, x1) of the source,
    mixed and (MIC on) masked forwards. ``batch['target_valid']`` (optional, (N, H, W)):
    HRDA's valid pseudo-label region. ``imnet``: the frozen segmentor (feature distance on,
    ``config.fdist``); ``mic_draws``: {'aug': per-image dicts, 'grid': kept blocks} (MIC on,
    ``config.mic``). ``use_pseudo`` replaces the teacher's argmax in the labels; ``inputs``
    ({'mixed', 'mic'}: NHWC arrays) the student's inputs instead of the images built here
    (both as in torch_ref.daformer.dacs_step). ``config.model.hrda.detail_loss_weight`` is
    HRDA's ``hr_loss_weight``. Returns ({term: loss}, gradients by name, pseudo weight,
    extras: 'probs', 'confidence', 'pixel_weight', 'mixed', 'mic_image', 'fdist_mask').
    """
    ema_update(teacher, student, it, config.st.ema_alpha)
    opt.zero_grad()
    student.train()
    teacher.train()
    crop, detail_weight = student.crop, config.model.hrda.detail_loss_weight
    xs, xt = nchw(batch["source_image"]), nchw(batch["target_image"])
    ys = to_torch(batch["source_label"]).long()
    size = tuple(ys.shape[1:])
    out, extra = {}, {}

    fused, _, hr, context_maps = forward_train_with_context(student, xs, boxes[0])
    out["source"] = hrda_loss(fused, hr, ys, None, boxes[0], crop, detail_weight)
    out["source"].backward(retain_graph=imnet is not None)
    if imnet is not None:
        half = scale_image(xs, CONTEXT_SCALE)  # the frozen HRDA model's extract_feat input
        out["fdist"], mask = feature_distance(context_maps, imnet, half, ys, config.fdist)
        out["fdist"].backward()
        extra["fdist_mask"] = None if mask is None else mask[:, 0].numpy()

    with torch.no_grad():
        probs = torch.softmax(resize(teacher.encode_decode(xt), size), dim=1)
        prob, pseudo = probs.max(dim=1)
        weight = (prob >= config.st.pseudo_threshold).to(prob.dtype).mean()
        pixel_weight = weight * torch.ones_like(prob)
        top, bottom = config.st.pseudo_weight_ignore_top, config.st.pseudo_weight_ignore_bottom
        if top > 0:
            pixel_weight[:, :top] = 0
        if bottom > 0:
            pixel_weight[:, -bottom:] = 0
        if "target_valid" in batch:
            pixel_weight = pixel_weight * to_torch(batch["target_valid"]).to(prob.dtype)
    labels = pseudo if use_pseudo is None else to_torch(use_pseudo).long()

    m = to_torch(masks)
    mixed = torch.where(m[:, None], xs, xt)
    transform = daformer_ops.strong if config.st.blur_2d else ddb_augment.strong
    mixed = torch.stack(
        [to_torch(transform(mixed[i].numpy().transpose(1, 2, 0), augs[i]).transpose(2, 0, 1))
         for i in range(len(augs))]
    )  # fmt: skip
    mixed_label = torch.where(m, ys, labels)
    mixed_weight = torch.where(m, torch.ones_like(prob), pixel_weight)
    inputs = inputs or {}
    student_input = nchw(inputs["mixed"]) if "mixed" in inputs else mixed
    fused, _, hr = student.forward_train(student_input, tuple(int(v) for v in boxes[1]))
    out["mixed"] = hrda_loss(fused, hr, mixed_label, mixed_weight, boxes[1], crop, detail_weight)
    out["mixed"].backward()

    if mic_draws is not None:
        images = mic.masked_input(xt, mic_draws["aug"], mic_draws["grid"])
        student_input = nchw(inputs["mic"]) if "mic" in inputs else images
        fused, _, hr = student.forward_train(student_input, tuple(int(v) for v in boxes[2]))
        out["mic"] = hrda_loss(
            fused, hr, labels, pixel_weight, boxes[2], crop, detail_weight, config.mic.weight
        )
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
