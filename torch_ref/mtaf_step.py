"""PyTorch reference of one MTAF iteration of the multi-target baseline and of MDis, for
step parity (MTKT's: torch_ref/mtaf_mtkt_step.py, with the helpers here).

A transcription of valeoai/MTAF ``mtaf/domain_adaptation/train_UDA.py`` (``train_advent``
and ``train_advent_mdis``: one pass of the ``for i_iter`` loop body each, multi-level,
without logging and snapshots) and ``mtaf/utils/loss.py``'s ``kl_divergence``, with
ADVENT's helpers (torch_ref/advent_step.py: the same ``bce_loss``, ``prob_2_entropy``,
``cross_entropy_2d``, poly rates). It runs on CPU and in float64 when the modules and
inputs are ``.double()``, without apex (``TRAIN.AMP`` False). It imports only torch and
torch_ref.

The loops are transcribed statement by statement, including the loop variables that leak
from one loop into the next, which is what some of the reference's quirks are made of:
MDis's ``d_target_aux`` with more than two targets ends every generator loop at the last
classifier, which the discriminator loop then trains for every target. Discriminators map
(N, C, H, W) to (N, 1, h, w) logits. Each iteration returns every loss term by the names
the JAX methods report them under.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from torch_ref.advent_step import (
    ADAM_BETAS_D,
    ADAM_EPS_D,
    CfgAdvent,
    adjust_learning_rate,
    adjust_learning_rate_discriminator,
    bce_loss,
    interp_source,
    interp_target,
    loss_calc,
    prob_2_entropy,
)

SOURCE_LABEL, TARGET_LABEL = 0, 1


@dataclasses.dataclass(frozen=True)
class CfgMtaf(CfgAdvent):
    """ADVENT's hyper-parameters plus MTKT's (mtaf/domain_adaptation/config.py defaults)."""

    lambda_kl_target: float = 1.0
    teacher_iters: int = 0


def kl_divergence(predict_0: torch.Tensor, predict_1: torch.Tensor) -> torch.Tensor:
    """``F.kl_div(log_softmax(predict_0), softmax(predict_1))`` with the legacy
    ``size_average=True``: the mean over all N*H*W*C elements."""
    n, c, h, w = predict_0.size()
    predict_0 = predict_0.permute(0, 2, 3, 1).reshape(-1, c)
    predict_1 = predict_1.permute(0, 2, 3, 1).reshape(-1, c)
    with warnings.catch_warnings():  # torch warns that 'mean' is not the true KL: as referenced
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(F.log_softmax(predict_0, dim=1), F.softmax(predict_1, dim=1),
                        reduction="mean")  # fmt: skip


def make_adam(d, cfg: CfgMtaf, adam=torch.optim.Adam):
    """A discriminator's optimiser (PyTorch 1.3.1's Adam is today's ``torch.optim.Adam``)."""
    return adam(d.parameters(), lr=cfg.learning_rate_d, betas=ADAM_BETAS_D, eps=ADAM_EPS_D)


def set_requires_grad(modules, flag: bool) -> None:
    for module in modules:
        for param in module.parameters():
            param.requires_grad = flag


def class_softmax(x: torch.Tensor) -> torch.Tensor:
    return F.softmax(x, dim=1)  # the reference's F.softmax(x): implicit dim 1 for 4-D


def as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def hooked(phase_hook):
    return phase_hook or (lambda name: None)


def baseline_iteration(model, d_aux, d_main, optimizer, optimizer_d_aux, optimizer_d_main,
                       source_images, source_labels, target_images: Sequence[torch.Tensor],
                       i_iter: int, cfg: CfgMtaf, *,
                       phase_hook: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """One iteration of ``train_advent`` (multi-level), one batch per target."""
    hook, num_targets, log = hooked(phase_hook), len(target_images), {}
    optimizer_d_aux.zero_grad()
    optimizer_d_main.zero_grad()
    adjust_learning_rate_discriminator(optimizer_d_aux, i_iter, cfg)
    adjust_learning_rate_discriminator(optimizer_d_main, i_iter, cfg)
    optimizer.zero_grad()
    adjust_learning_rate(optimizer, i_iter, cfg)
    set_requires_grad((d_aux, d_main), False)

    pred_src_aux, pred_src_main = model(source_images)
    pred_src_aux = interp_source(pred_src_aux, cfg)
    log["loss_seg_aux"] = loss_seg_src_aux = loss_calc(pred_src_aux, source_labels)
    pred_src_main = interp_source(pred_src_main, cfg)
    log["loss_seg_main"] = loss_seg_src_main = loss_calc(pred_src_main, source_labels)
    (cfg.lambda_seg_main * loss_seg_src_main + cfg.lambda_seg_aux * loss_seg_src_aux).backward()

    pred_trg_main_list, pred_trg_aux_list = [], []
    for i in range(num_targets):
        pred_trg_aux, pred_trg_main = model(target_images[i])
        pred_trg_aux = interp_target(pred_trg_aux, cfg)
        loss_adv_trg_aux = bce_loss(
            d_aux(prob_2_entropy(class_softmax(pred_trg_aux))), SOURCE_LABEL
        )
        pred_trg_main = interp_target(pred_trg_main, cfg)
        pred_trg_main_list.append(pred_trg_main)
        pred_trg_aux_list.append(pred_trg_aux)
        d_out_main = d_main(prob_2_entropy(class_softmax(pred_trg_main)))
        loss_adv_trg_main = bce_loss(d_out_main, SOURCE_LABEL)
        log[f"loss_adv_aux_{i}"], log[f"loss_adv_main_{i}"] = loss_adv_trg_aux, loss_adv_trg_main
        (cfg.lambda_adv_main * loss_adv_trg_main + cfg.lambda_adv_aux * loss_adv_trg_aux).backward()
    hook("segmentor_backward")

    set_requires_grad((d_aux, d_main), True)
    log["loss_d_aux"] = log["loss_d_main"] = 0.0
    pred_src_aux = pred_src_aux.detach()
    for _ in range(num_targets):  # the source half once per target
        loss_d_aux = bce_loss(d_aux(prob_2_entropy(class_softmax(pred_src_aux))), SOURCE_LABEL)
        loss_d_aux = loss_d_aux / (1 + num_targets)
        loss_d_aux.backward()
        log["loss_d_aux"] += as_float(loss_d_aux)
    pred_src_main = pred_src_main.detach()
    for _ in range(num_targets):
        loss_d_main = (
            bce_loss(d_main(prob_2_entropy(class_softmax(pred_src_main))), SOURCE_LABEL) / 2
        )
        loss_d_main.backward()
        log["loss_d_main"] += as_float(loss_d_main)
    for i in range(num_targets):
        pred_trg_aux = pred_trg_aux_list[i].detach()
        loss_d_aux = bce_loss(d_aux(prob_2_entropy(class_softmax(pred_trg_aux))), TARGET_LABEL) / 2
        loss_d_aux.backward()
        pred_trg_main = pred_trg_main_list[i].detach()
        loss_d_main = (
            bce_loss(d_main(prob_2_entropy(class_softmax(pred_trg_main))), TARGET_LABEL) / 2
        )
        loss_d_main.backward()
        log["loss_d_aux"] += as_float(loss_d_aux)
        log["loss_d_main"] += as_float(loss_d_main)
    hook("before_step")
    optimizer.step()
    for _ in range(num_targets):  # each discriminator stepped once per target
        optimizer_d_aux.step()
        optimizer_d_main.step()
    return {k: as_float(v) for k, v in log.items()}


def mdis_iteration(model, d_main_list, d_aux_list, d_target, d_target_aux, optimizer,
                   optimizer_d_main_list, optimizer_d_aux_list, optimizer_d_target,
                   optimizer_d_target_aux, source_images, source_labels,
                   target_images: Sequence[torch.Tensor], i_iter: int, cfg: CfgMtaf, *,
                   phase_hook: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """One iteration of ``train_advent_mdis`` (multi-level). ``d_target`` /
    ``d_target_aux`` (and their optimisers): one module for two targets, else a list (the
    reference's ``d_target_list`` / ``d_target_aux_list``)."""
    hook, num_targets, log = hooked(phase_hook), len(target_images), {}
    many = num_targets > 2
    d_target_list = d_target if many else None
    d_target_aux_list = d_target_aux if many else None
    classifier_opts = ([*optimizer_d_target, *optimizer_d_target_aux] if many
                       else [optimizer_d_target, optimizer_d_target_aux])  # fmt: skip
    for opt in (*optimizer_d_main_list, *optimizer_d_aux_list, *classifier_opts):
        opt.zero_grad()
        adjust_learning_rate_discriminator(opt, i_iter, cfg)
    optimizer.zero_grad()
    adjust_learning_rate(optimizer, i_iter, cfg)
    classifiers = [*d_target_list, *d_target_aux_list] if many else [d_target, d_target_aux]
    set_requires_grad((*d_aux_list, *d_main_list, *classifiers), False)

    pred_src_aux, pred_src_main = model(source_images)
    pred_src_aux = interp_source(pred_src_aux, cfg)
    log["loss_seg_aux"] = loss_seg_src_aux = loss_calc(pred_src_aux, source_labels)
    pred_src_main = interp_source(pred_src_main, cfg)
    log["loss_seg_main"] = loss_seg_src_main = loss_calc(pred_src_main, source_labels)
    (cfg.lambda_seg_main * loss_seg_src_main + cfg.lambda_seg_aux * loss_seg_src_aux).backward()

    pred_trg_main_list, pred_trg_aux_list = [], []
    for i in range(num_targets):
        d_aux, d_main = d_aux_list[i], d_main_list[i]
        pred_trg_aux, pred_trg_main = model(target_images[i])
        pred_trg_aux = interp_target(pred_trg_aux, cfg)
        loss_adv_trg_aux = bce_loss(
            d_aux(prob_2_entropy(class_softmax(pred_trg_aux))), SOURCE_LABEL
        )
        if many:
            loss_adv_trg_target_aux = 0
            for j in range(num_targets):
                d_target_aux = d_target_aux_list[j]  # assigned before the skip: ends at the last
                if i == j:
                    continue
                d_out = d_target_aux(prob_2_entropy(class_softmax(pred_trg_aux)))
                loss_adv_trg_target_aux = loss_adv_trg_target_aux + bce_loss(d_out, 0)
            loss_adv_trg_target_aux = loss_adv_trg_target_aux / (num_targets - 1)
        else:
            d_out = d_target_aux(prob_2_entropy(class_softmax(pred_trg_aux)))
            loss_adv_trg_target_aux = bce_loss(d_out, 1 - i)
        pred_trg_main = interp_target(pred_trg_main, cfg)
        pred_trg_main_list.append(pred_trg_main)
        pred_trg_aux_list.append(pred_trg_aux)
        loss_adv_trg_main = bce_loss(
            d_main(prob_2_entropy(class_softmax(pred_trg_main))), SOURCE_LABEL
        )
        if many:
            loss_adv_trg_target = 0
            for j in range(num_targets):
                d_target = d_target_list[j]
                if i == j:
                    continue
                d_out = d_target(prob_2_entropy(class_softmax(pred_trg_main)))
                loss_adv_trg_target = loss_adv_trg_target + bce_loss(d_out, 0)
            loss_adv_trg_target = loss_adv_trg_target / (num_targets - 1)
        else:
            loss_adv_trg_target = bce_loss(
                d_target(prob_2_entropy(class_softmax(pred_trg_main))), 1 - i
            )
        log[f"loss_adv_aux_{i}"], log[f"loss_adv_main_{i}"] = loss_adv_trg_aux, loss_adv_trg_main
        log[f"loss_dom_aux_{i}"], log[f"loss_dom_main_{i}"] = (loss_adv_trg_target_aux,
                                                               loss_adv_trg_target)  # fmt: skip
        (cfg.lambda_adv_main * loss_adv_trg_main + cfg.lambda_adv_aux * loss_adv_trg_aux
         + cfg.lambda_adv_main * loss_adv_trg_target
         + cfg.lambda_adv_aux * loss_adv_trg_target_aux).backward()  # fmt: skip
    hook("segmentor_backward")

    if many:
        for i in range(num_targets):
            d_target_aux, d_target = d_target_aux_list[i], d_target_list[i]
    set_requires_grad((*classifiers, *d_aux_list, *d_main_list), True)
    names = ([f"dt_{lv}_{j}" for lv in ("main", "aux") for j in range(num_targets)] if many
             else ["dt_main", "dt_aux"])  # fmt: skip
    names += [f"d_{lv}_{i}" for lv in ("main", "aux") for i in range(num_targets)]
    d_losses = dict.fromkeys(names, 0.0)

    def add(name, loss):
        loss.backward()
        d_losses[name] += as_float(loss)

    pred_src_aux = pred_src_aux.detach()
    for i in range(num_targets):
        loss = bce_loss(d_aux_list[i](prob_2_entropy(class_softmax(pred_src_aux))), SOURCE_LABEL)
        add(f"d_aux_{i}", loss / (1 + num_targets))
    pred_src_main = pred_src_main.detach()
    for i in range(num_targets):
        loss = bce_loss(d_main_list[i](prob_2_entropy(class_softmax(pred_src_main))), SOURCE_LABEL)
        add(f"d_main_{i}", loss / 2)
    for i in range(num_targets):
        d_aux, d_main = d_aux_list[i], d_main_list[i]
        pred_trg_aux = pred_trg_aux_list[i].detach()
        add(
            f"d_aux_{i}",
            bce_loss(d_aux(prob_2_entropy(class_softmax(pred_trg_aux))), TARGET_LABEL) / 2,
        )
        if many:
            trained = f"dt_aux_{d_target_aux_list.index(d_target_aux)}"
            for j in range(num_targets):
                d_out = d_target_aux(prob_2_entropy(class_softmax(pred_trg_aux)))
                if i == j:
                    add(trained, bce_loss(d_out, 0) / 2)
                else:
                    add(trained, bce_loss(d_out, 1) / (2 * (num_targets - 1)))
        else:
            add(
                "dt_aux", bce_loss(d_target_aux(prob_2_entropy(class_softmax(pred_trg_aux))), i) / 2
            )
        pred_trg_main = pred_trg_main_list[i].detach()
        d_out = d_main(prob_2_entropy(class_softmax(pred_trg_main)))
        add(f"d_main_{i}", bce_loss(d_out, TARGET_LABEL) / 2)
        if many:
            for j in range(num_targets):
                d_out = d_target_list[j](prob_2_entropy(class_softmax(pred_trg_main)))
                if i == j:
                    add(f"dt_main_{j}", bce_loss(d_out, SOURCE_LABEL) / 2)
                else:
                    add(f"dt_main_{j}", bce_loss(d_out, TARGET_LABEL) / (2 * (num_targets - 1)))
        else:
            add("dt_main", bce_loss(d_target(prob_2_entropy(class_softmax(pred_trg_main))), i) / 2)
    hook("before_step")
    optimizer.step()
    for opt in (*optimizer_d_aux_list, *optimizer_d_main_list, *classifier_opts):
        opt.step()
    log.update({f"loss_{name}": value for name, value in d_losses.items()})
    return {k: as_float(v) for k, v in log.items()}
