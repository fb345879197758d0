"""PyTorch reference: one iteration of DAF (dg_ljw train.py ``train_dada``), float64-ready.

Written from the semantics of the reference's loop body, which, per iteration:

1. zeroes both optimisers' gradients and sets the poly rates (segmentor: 1x group, 10x
   group; discriminator: ``learning_rate_d``);
2. freezes the discriminator; source forward, logits and depth upsampled to the source
   size (align_corners=True); ``lambda_seg * CE + lambda_depth * berHu`` (the berHu of
   DADA's ``loss_calc_depth``: c = 0.2 max |diff| as a Python float) -> backward;
3. target forward and upsampling; the target's depth-aware map is
   ``prob_2_entropy(softmax(logits)) * depth * depth`` (the depth twice); BCE of the
   discriminator's output against the source label, times ``lambda_adv`` -> backward;
4. unfreezes the discriminator; on the detached source map ``entropy * depth`` (once)
   BCE against the source label -> backward; on the detached target map (depth twice)
   BCE against the target label -> backward; neither half is halved;
5. steps the SGD and the Adam.

The network's forward returns (aux, main, depth, fused); only main and depth are used.
``phase_hook(name)`` is called after each backward (the tests read the gradients there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from torch_ref.advent_step import (
    ADAM_BETAS_D,
    ADAM_EPS_D,
    SOURCE_LABEL,
    TARGET_LABEL,
    bce_loss,
    loss_calc,
    lr_poly,
    prob_2_entropy,
)


@dataclasses.dataclass(frozen=True)
class CfgDaf:
    """The hyper-parameters one iteration reads (dg_ljw configs/configs.py). Sizes (W, H)."""

    input_size_source: tuple[int, int] = (1280, 760)
    input_size_target: tuple[int, int] = (1024, 512)
    learning_rate: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    learning_rate_d: float = 1e-4
    lambda_seg_main: float = 1.0
    lambda_depth_main: float = 1e-3
    lambda_adv_main: float = 1e-3
    max_iters: int = 90000


def loss_calc_depth(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """berHu: |d| up to c = 0.2 max|d| (a constant), (d^2 + c^2) / 2c beyond; mean."""
    pred = pred.squeeze()
    label = label.squeeze()
    adiff = torch.abs(pred - label)
    batch_max = 0.2 * torch.max(adiff).item()
    t1_mask = adiff.le(batch_max).double()
    t2_mask = adiff.gt(batch_max).double()
    t1 = adiff * t1_mask
    t2 = (adiff * adiff + batch_max * batch_max) / (2 * batch_max) * t2_mask
    return (torch.sum(t1) + torch.sum(t2)) / torch.numel(pred.data)


def make_optimizers(model, d_main, cfg: CfgDaf, sgd=torch.optim.SGD, adam=torch.optim.Adam):
    """(SGD over ``model.optim_parameters(lr)``, Adam over the discriminator)."""
    optimizer = sgd(model.optim_parameters(cfg.learning_rate), lr=cfg.learning_rate,
                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)  # fmt: skip
    optimizer_d = adam(d_main.parameters(), lr=cfg.learning_rate_d, betas=ADAM_BETAS_D,
                       eps=ADAM_EPS_D)  # fmt: skip
    return optimizer, optimizer_d


def _set_rates(optimizer, optimizer_d, i_iter: int, cfg: CfgDaf) -> None:
    lr = lr_poly(cfg.learning_rate, i_iter, cfg.max_iters, cfg.power)
    optimizer.param_groups[0]["lr"] = lr
    optimizer.param_groups[1]["lr"] = 10 * lr
    optimizer_d.param_groups[0]["lr"] = lr_poly(cfg.learning_rate_d, i_iter, cfg.max_iters,
                                                cfg.power)  # fmt: skip


def daf_iteration(model, d_main, optimizer, optimizer_d, images_source, labels, depth,
                  images_target, i_iter: int, cfg: CfgDaf,
                  phase_hook: Callable[[str], None] | None = None) -> dict[str, float]:  # fmt: skip
    """One iteration (see the module docstring); returns the losses by the reference's
    names, and the discriminator's source half as ``loss_d_main_src``."""
    hook = phase_hook or (lambda name: None)
    optimizer.zero_grad()
    optimizer_d.zero_grad()
    _set_rates(optimizer, optimizer_d, i_iter, cfg)

    def interp(x, size):
        return F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=True)

    for param in d_main.parameters():
        param.requires_grad = False
    _, pred_src_main, pred_depth_src_main, _ = model(images_source)
    pred_src_main = interp(pred_src_main, cfg.input_size_source)
    pred_depth_src_main = interp(pred_depth_src_main, cfg.input_size_source)
    loss_depth_src_main = loss_calc_depth(pred_depth_src_main, depth)
    loss_seg_src_main = loss_calc(pred_src_main, labels)
    loss = cfg.lambda_seg_main * loss_seg_src_main + cfg.lambda_depth_main * loss_depth_src_main
    loss.backward()
    hook("source")

    _, pred_trg_main, pred_depth_trg_main, _ = model(images_target)
    pred_trg_main = interp(pred_trg_main, cfg.input_size_target)
    pred_depth_trg_main = interp(pred_depth_trg_main, cfg.input_size_target)
    entropy = prob_2_entropy(F.softmax(pred_trg_main, dim=1))
    d_out_main = d_main(entropy * pred_depth_trg_main * pred_depth_trg_main)
    loss_adv_trg_main = bce_loss(d_out_main, SOURCE_LABEL)
    (cfg.lambda_adv_main * loss_adv_trg_main).backward()
    hook("adversarial")

    for param in d_main.parameters():
        param.requires_grad = True
    pred_src_main = pred_src_main.detach()
    pred_depth_src_main = pred_depth_src_main.detach()
    d_out_main = d_main(prob_2_entropy(F.softmax(pred_src_main, dim=1)) * pred_depth_src_main)
    loss_d_src = bce_loss(d_out_main, SOURCE_LABEL)
    loss_d_src.backward()
    pred_trg_main = pred_trg_main.detach()
    pred_depth_trg_main = pred_depth_trg_main.detach()
    entropy = prob_2_entropy(F.softmax(pred_trg_main, dim=1))
    d_out_main = d_main(entropy * pred_depth_trg_main * pred_depth_trg_main)
    loss_d_main = bce_loss(d_out_main, TARGET_LABEL)
    loss_d_main.backward()
    hook("discriminator")

    optimizer.step()
    optimizer_d.step()
    return {
        "loss_seg_src_main": loss_seg_src_main.item(),
        "loss_depth_src_main": loss_depth_src_main.item(),
        "loss_adv_trg_main": loss_adv_trg_main.item(),
        "loss_d_main": loss_d_main.item(),
        "loss_d_main_src": loss_d_src.item(),
    }
