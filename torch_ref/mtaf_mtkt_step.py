"""PyTorch reference of one MTKT iteration (valeoai/MTAF train_UDA.py ``train_advent_mtkt``,
multi-level, ``TEACHER_LOSS='KL'``), for step parity: transcribed as torch_ref/mtaf_step.py
transcribes the baseline and MDis, with its helpers.

The segmentor is MTAF's multi-head network (torch_ref/mtaf.py: ``(aux list, main list)``,
entry 0 the student, entry i + 1 target i's teacher). The reference's ``d_aux`` is read by
the segmentor's auxiliary term before this iteration assigns it: there it holds the last
of ``d_aux_list`` (the constructor's loop, then every iteration's discriminator loop),
which ``mtkt_iteration`` starts from. Before ``teacher_iters`` no loss reaches the student
head, so its parameters get no gradient and the SGD step skips them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from torch_ref.advent_step import (
    adjust_learning_rate,
    adjust_learning_rate_discriminator,
    bce_loss,
    interp_source,
    interp_target,
    loss_calc,
    prob_2_entropy,
)
from torch_ref.mtaf_step import (
    SOURCE_LABEL,
    TARGET_LABEL,
    CfgMtaf,
    as_float,
    class_softmax,
    hooked,
    kl_divergence,
    set_requires_grad,
)


def mtkt_iteration(model, d_main_list, d_aux_list, optimizer, optimizer_d_main_list,
                   optimizer_d_aux_list, source_images, source_labels,
                   target_images: Sequence[torch.Tensor], i_iter: int, cfg: CfgMtaf, *,
                   phase_hook: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """One iteration of ``train_advent_mtkt`` (multi-level, ``TEACHER_LOSS='KL'``)."""
    hook, num_targets, log = hooked(phase_hook), len(target_images), {}
    d_aux = d_aux_list[-1]  # what the reference's d_aux holds here (the module docstring)
    for i in range(num_targets):
        for opt in (optimizer_d_main_list[i], optimizer_d_aux_list[i]):
            opt.zero_grad()
            adjust_learning_rate_discriminator(opt, i_iter, cfg)
    optimizer.zero_grad()
    adjust_learning_rate(optimizer, i_iter, cfg)
    set_requires_grad((*d_main_list, *d_aux_list), False)

    pred_src_aux, pred_src_main = model(source_images)
    loss = loss_seg_src_aux = loss_seg_src_main = 0
    for i in range(1, len(pred_src_aux)):
        pred_src_aux[i] = interp_source(pred_src_aux[i], cfg)
        loss_seg_src_aux += loss_calc(pred_src_aux[i], source_labels)
    loss += cfg.lambda_seg_aux * loss_seg_src_aux
    for i in range(1, len(pred_src_main)):
        pred_src_main[i] = interp_source(pred_src_main[i], cfg)
        loss_seg_src_main += loss_calc(pred_src_main[i], source_labels)
    loss += cfg.lambda_seg_main * loss_seg_src_main
    loss.backward()
    log["loss_seg_aux"], log["loss_seg_main"] = loss_seg_src_aux, loss_seg_src_main

    pred_trg_aux_list, pred_trg_main_list = [], []
    for i in range(num_targets):
        d_main = d_main_list[i]
        all_pred_trg_aux, all_pred_trg_main = model(target_images[i])
        pred_trg_aux = interp_target(all_pred_trg_aux[i + 1], cfg)
        pred_trg_aux_list.append(pred_trg_aux)
        pred_trg_aux_trg = interp_target(all_pred_trg_aux[0], cfg)
        pred_trg_main = interp_target(all_pred_trg_main[i + 1], cfg)
        pred_trg_main_list.append(pred_trg_main)
        pred_trg_target = interp_target(all_pred_trg_main[0], cfg)
        loss_adv_trg_aux = bce_loss(
            d_aux(prob_2_entropy(class_softmax(pred_trg_aux))), SOURCE_LABEL
        )
        loss = cfg.lambda_adv_aux * loss_adv_trg_aux / 2
        loss_adv_trg_main = bce_loss(
            d_main(prob_2_entropy(class_softmax(pred_trg_main))), SOURCE_LABEL
        )
        loss += cfg.lambda_adv_main * loss_adv_trg_main / 2
        loss_div_trg = loss_div_aux = 0
        if i_iter >= cfg.teacher_iters:
            loss_div_trg = kl_divergence(pred_trg_target, pred_trg_main.detach())
            loss += cfg.lambda_kl_target * loss_div_trg
            loss_div_aux = kl_divergence(pred_trg_aux_trg, pred_trg_aux.detach())
            loss += cfg.lambda_seg_aux * cfg.lambda_kl_target * loss_div_aux / num_targets
        loss.backward()
        log[f"loss_adv_aux_{i}"], log[f"loss_adv_main_{i}"] = loss_adv_trg_aux, loss_adv_trg_main
        log[f"loss_kl_aux_{i}"], log[f"loss_kl_main_{i}"] = loss_div_aux, loss_div_trg
    hook("segmentor_backward")

    set_requires_grad((*d_main_list, *d_aux_list), True)
    for i in range(num_targets):
        d_main = d_main_list[i]
        src_main = pred_src_main[i + 1].detach()
        loss_d_main = bce_loss(d_main(prob_2_entropy(class_softmax(src_main))), SOURCE_LABEL) / 2
        loss_d_main.backward()
        d_aux = d_aux_list[i]
        src_aux = pred_src_aux[i + 1].detach()
        loss_d_aux = bce_loss(d_aux(prob_2_entropy(class_softmax(src_aux))), SOURCE_LABEL) / 2
        loss_d_aux.backward()
        log[f"loss_d_main_{i}"], log[f"loss_d_aux_{i}"] = (
            as_float(loss_d_main),
            as_float(loss_d_aux),
        )
    for i in range(num_targets):
        d_main = d_main_list[i]
        trg_main = pred_trg_main_list[i].detach()
        loss_d_main = bce_loss(d_main(prob_2_entropy(class_softmax(trg_main))), TARGET_LABEL) / 2
        loss_d_main.backward()
        d_aux = d_aux_list[i]
        trg_aux = pred_trg_aux_list[i].detach()
        loss_d_aux = bce_loss(d_aux(prob_2_entropy(class_softmax(trg_aux))), TARGET_LABEL) / 2
        loss_d_aux.backward()
        log[f"loss_d_main_{i}"] += as_float(loss_d_main)
        log[f"loss_d_aux_{i}"] += as_float(loss_d_aux)
    hook("before_step")
    optimizer.step()
    for i in range(num_targets):
        optimizer_d_main_list[i].step()
        optimizer_d_aux_list[i].step()
    return {k: as_float(v) for k, v in log.items()}
