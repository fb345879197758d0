"""PyTorch reference: one iteration of DAF/IDA's ISL stage (dg_ljw train_isl.py) and one of
its intra-domain stage (dg_ljw train_intra.py ``train_advent``), float64-ready.

Written from the semantics of the reference's loop bodies on its depth-aware DeepLabV2
(torch_ref/daf.py; its forward here returns (aux, main, depth, fused), the reference's
(aux, main, depth): only ``main`` is read by either stage).

ISL, per iteration (train_isl.py ``train_model``): zero the gradients; poly rates over
MAX_ITERS (90k) from LEARNING_RATE, group 0 at the rate and every further group at 10x
(utils/train_utils.py ``adjust_learning_rate``); the network in training mode on a target
batch; its main logits upsampled to INPUT_SIZE_TARGET (bilinear, align_corners=True);
CrossEntropy2D (utils/loss_fuc.py: the mean CE over the pixels whose label is >= 0 and
not 255) against the pseudo-labels; backward; SGD step. No depth loss, no discriminator.

IDA, per iteration (train_intra.py, ADVENT's ``train_advent`` with MULTI_LEVEL False):
zero the gradients of the SGD and of both discriminators' Adams; poly rates over MAX_ITERS
(250k) from LEARNING_RATE (10x for the classifier group) and LEARNING_RATE_D; freeze the
discriminator; the easy split (the "source": its images and the ranking's labels) forward,
main logits upsampled to INPUT_SIZE_SOURCE, ``LAMBDA_SEG_MAIN * CE`` -> backward; the hard
split forward, main logits upsampled to INPUT_SIZE_TARGET, the discriminator on
``prob_2_entropy(softmax(logits))`` (no depth) against the source label 0, times
``LAMBDA_ADV_MAIN`` -> backward; unfreeze; D on the detached easy map against 0, halved ->
backward; on the detached hard map against 1, halved -> backward; SGD and D's Adam step.
The reference also builds ``d_aux`` and its Adam and sets its rate, but never uses them.

Both stages: the SGD groups are ``model.optim_parameters(lr)`` (ADVENT's listed 1x group,
the classifier and the whole depth head at 10x). The depth regressor (``convR0``,
``bnR0``, ``convR2``) feeds only the depth, which neither stage's loss reads: its
parameters never get a ``.grad`` (None, also in PyTorch 1.7.1, whose ``zero_grad`` only
zeroes existing ones), so SGD skips them: no weight decay, no momentum, never moved.
``phase_hook(name)`` is called after each backward (the tests read the gradients there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from torch_ref.advent_step import (
    SOURCE_LABEL,
    TARGET_LABEL,
    bce_loss,
    loss_calc,
    lr_poly,
    prob_2_entropy,
)
from torch_ref.daf_step import make_optimizers as make_ida_optimizers

__all__ = ["CfgIda", "CfgIsl", "ida_iteration", "isl_iteration", "make_ida_optimizers",
           "make_isl_optimizer"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CfgIsl:
    """What one ISL iteration reads (synthia_to_cityscapes_16cls_isl.yml). Size (W, H)."""

    input_size_target: tuple[int, int] = (1024, 512)
    learning_rate: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    max_iters: int = 90000


@dataclasses.dataclass(frozen=True)
class CfgIda:
    """What one IDA iteration reads (configs/configs_intra.py, intrada.yml). Sizes (W, H)."""

    input_size_source: tuple[int, int] = (1024, 512)  # intrada.yml's, over the config's
    input_size_target: tuple[int, int] = (1024, 512)
    learning_rate: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    learning_rate_d: float = 1e-4
    lambda_seg_main: float = 1.0
    lambda_adv_main: float = 1e-3
    max_iters: int = 250000


def make_isl_optimizer(model, cfg: CfgIsl, sgd=torch.optim.SGD):
    """train_isl.py's SGD over ``model.optim_parameters(LEARNING_RATE)``."""
    return sgd(model.optim_parameters(cfg.learning_rate), lr=cfg.learning_rate,
               momentum=cfg.momentum, weight_decay=cfg.weight_decay)  # fmt: skip


def _set_rate(optimizer, base: float, i_iter: int, max_iters: int, power: float) -> None:
    lr = lr_poly(base, i_iter, max_iters, power)
    optimizer.param_groups[0]["lr"] = lr
    for group in optimizer.param_groups[1:]:
        group["lr"] = 10 * lr


def _interp(x: torch.Tensor, size_wh) -> torch.Tensor:
    return F.interpolate(x, size=(size_wh[1], size_wh[0]), mode="bilinear", align_corners=True)


def isl_iteration(model, optimizer, images, labels, i_iter: int, cfg: CfgIsl,
                  phase_hook: Callable[[str], None] | None = None) -> float:  # fmt: skip
    """One ISL iteration (module docstring); returns ``loss_sem_target``."""
    hook = phase_hook or (lambda name: None)
    optimizer.zero_grad()
    _set_rate(optimizer, cfg.learning_rate, i_iter, cfg.max_iters, cfg.power)
    _, pred, _, _ = model(images)
    pred = _interp(pred, cfg.input_size_target)
    loss = loss_calc(pred, labels)
    loss.backward()
    hook("target")
    optimizer.step()
    return loss.item()


def ida_iteration(model, d_main, optimizer, optimizer_d, images_source, labels, images_target,
                  i_iter: int, cfg: CfgIda,
                  phase_hook: Callable[[str], None] | None = None) -> dict[str, float]:  # fmt: skip
    """One IDA iteration (module docstring); returns the losses by the reference's names
    (``loss_d_main``: the halved target half, as it logs it) and the halved source half as
    ``loss_d_main_src``."""
    hook = phase_hook or (lambda name: None)
    optimizer.zero_grad()
    optimizer_d.zero_grad()
    _set_rate(optimizer, cfg.learning_rate, i_iter, cfg.max_iters, cfg.power)
    _set_rate(optimizer_d, cfg.learning_rate_d, i_iter, cfg.max_iters, cfg.power)

    for param in d_main.parameters():
        param.requires_grad = False
    _, pred_src_main, _, _ = model(images_source)
    pred_src_main = _interp(pred_src_main, cfg.input_size_source)
    loss_seg_src_main = loss_calc(pred_src_main, labels)
    (cfg.lambda_seg_main * loss_seg_src_main).backward()
    hook("source")

    _, pred_trg_main, _, _ = model(images_target)
    pred_trg_main = _interp(pred_trg_main, cfg.input_size_target)
    d_out_main = d_main(prob_2_entropy(F.softmax(pred_trg_main, dim=1)))
    loss_adv_trg_main = bce_loss(d_out_main, SOURCE_LABEL)
    (cfg.lambda_adv_main * loss_adv_trg_main).backward()
    hook("adversarial")

    for param in d_main.parameters():
        param.requires_grad = True
    pred_src_main = pred_src_main.detach()
    d_out_main = d_main(prob_2_entropy(F.softmax(pred_src_main, dim=1)))
    loss_d_src = bce_loss(d_out_main, SOURCE_LABEL) / 2
    loss_d_src.backward()
    pred_trg_main = pred_trg_main.detach()
    d_out_main = d_main(prob_2_entropy(F.softmax(pred_trg_main, dim=1)))
    loss_d_main = bce_loss(d_out_main, TARGET_LABEL) / 2
    loss_d_main.backward()
    hook("discriminator")

    optimizer.step()
    optimizer_d.step()
    return {
        "loss_seg_src_main": loss_seg_src_main.item(),
        "loss_adv_trg_main": loss_adv_trg_main.item(),
        "loss_d_main": loss_d_main.item(),
        "loss_d_main_src": loss_d_src.item(),
    }
