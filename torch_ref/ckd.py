"""PyTorch reference of one CKD iteration, written from DDB's ``CKD.forward_train`` semantics.

Models are torch_ref.resnet_dlv2.Segmentor (forward -> (logits at 1/8, feature)).
The student's target input (the reference's ``bridging['img']``, strongly augmented by
its data pipeline) is given, so both sides can use the same augmentation draws.
"""

from __future__ import annotations

import torch

from torch_ref.common import to_torch
from torch_ref.losses import kl_loss, resize, seg_ce
from torch_ref.prototypes import prototype_weight


def encode_decode(model, img: torch.Tensor, return_feature: bool = False):
    """UDAEncoderDecoder.encode_decode: logits (and feature) resized to the image size."""
    logits, feature = model(img)
    size = img.shape[2:]
    return (resize(logits, size), resize(feature, size)) if return_feature else resize(logits, size)


def ckd_step(student, cu, ca, vectors, opt, xs, ys, xt, stu_tgt_img, cfg, use_pseudo=None):
    """One CKD iteration on the torch models (mutates the student and the optimiser).

    ``cfg``: dict with proto_rectify, rectify_on_prob, use_pl_weight, pseudo_threshold,
    soft_distill, soft_distill_w, temp. ``vectors``: {'cu': (K, C), 'ca': (K, C)}.
    ``use_pseudo`` replaces the ensemble argmax in the target CE (near-ties of random
    teachers are compared separately). Works in the dtype of the models and inputs.
    Returns losses, gradients and the teachers' outputs: 'teacher_logits' (cu, ca) at image
    size; hard labels: the 'ensemble' probabilities, its 'pseudo' argmax and 'weight', and
    with rectification the 'plain' (unrectified) ensemble and its 'plain_labels'; soft: the
    'target' probabilities.
    """
    cu.eval()
    ca.eval()
    student.train()
    opt.zero_grad()
    src_loss = seg_ce(student(xs)[0], ys)
    src_loss.backward()
    with torch.no_grad():
        cu_logits, cu_feat = encode_decode(cu, xt, True)
        ca_logits, ca_feat = encode_decode(ca, xt, True)
    extra = {"teacher_logits": (cu_logits.numpy(), ca_logits.numpy())}
    if not cfg["soft_distill"]:
        with torch.no_grad():
            if cfg["proto_rectify"]:
                cu_w = prototype_weight(cu_feat, vectors["cu"])
                ca_w = prototype_weight(ca_feat, vectors["ca"])
                if cfg["rectify_on_prob"]:
                    cu_soft = cu_w * torch.softmax(cu_logits, dim=1)
                    ca_soft = ca_w * torch.softmax(ca_logits, dim=1)
                else:
                    cu_soft = torch.softmax(cu_w * cu_logits, dim=1)
                    ca_soft = torch.softmax(ca_w * ca_logits, dim=1)
                plain = 0.5 * torch.softmax(cu_logits, 1) + 0.5 * torch.softmax(ca_logits, 1)
                extra.update(plain=plain.numpy(), plain_labels=plain.argmax(1).numpy())
            else:
                cu_soft = torch.softmax(cu_logits, dim=1)
                ca_soft = torch.softmax(ca_logits, dim=1)
            ensemble = cu_soft * 0.5 + ca_soft * 0.5
            prob, pseudo = torch.max(ensemble, dim=1)
            if cfg["use_pl_weight"]:
                weight = (prob >= cfg["pseudo_threshold"]).to(prob.dtype).mean()
            else:
                weight = torch.tensor(1.0, dtype=prob.dtype)
            pixel_weight = weight * torch.ones_like(prob)
        extra.update(ensemble=ensemble.numpy(), pseudo=pseudo.numpy(), weight=float(weight))
        labels = pseudo if use_pseudo is None else to_torch(use_pseudo).long()
        tgt_loss = seg_ce(student(stu_tgt_img)[0], labels, pixel_weight)
    else:
        stu_log = torch.log_softmax(encode_decode(student, stu_tgt_img) / cfg["temp"], dim=1)
        with torch.no_grad():
            if cfg["proto_rectify"]:
                cu_logits = prototype_weight(cu_feat, vectors["cu"]) * cu_logits
                ca_logits = prototype_weight(ca_feat, vectors["ca"]) * ca_logits
            target = torch.softmax((cu_logits + ca_logits) / 2 / cfg["temp"], dim=1)
        tgt_loss = kl_loss(stu_log, target) * cfg["soft_distill_w"] * cfg["temp"] ** 2
        extra["target"] = target.numpy()
    tgt_loss.backward()
    grads = {name: p.grad.detach().clone().numpy() for name, p in student.named_parameters()}
    opt.step()
    return float(src_loss.detach()), float(tgt_loss.detach()), grads, extra
