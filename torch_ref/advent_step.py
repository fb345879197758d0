"""PyTorch reference of one ADVENT training iteration (AdvEnt and MinEnt), for step parity.

A transcription of valeoai/ADVENT (commit 3e58d45, ``advent/domain_adaptation/train_UDA.py``
``train_advent`` / ``train_minent`` and the helpers in ``advent/utils/func.py`` and
``advent/utils/loss.py``), written to run on CPU and in float64 when the modules and the
inputs are ``.double()``. One call = one pass of the reference's ``for i_iter`` loop body
(without logging, snapshots and tensorboard). It imports only torch and numpy.

The segmentor is any module whose forward returns ``(aux_logits, main_logits)`` (``aux``
None when not multi-level) at any resolution, and which has ADVENT's
``optim_parameters(lr)`` returning the two SGD groups
``[{'params': 1x params, 'lr': lr}, {'params': 10x params, 'lr': 10 * lr}]``
(``advent/model/deeplabv2.py`` ``ResNetMulti.optim_parameters``: group 0 = conv1, bn1,
layer1-4 restricted to ``requires_grad`` parameters, so the frozen BatchNorm affines are in
no group; group 1 = the ASPP classifiers layer5 (only when multi-level) and layer6,
weights and biases). The discriminators are any modules mapping (N, C, H, W) to
(N, 1, h, w) logits (the reference's ``get_fc_discriminator``).

Quirks of the reference that change results (file, function):

1. Label constants (train_UDA.py, train_advent): ``source_label = 0``, ``target_label = 1``.
   The segmentor's adversarial loss on the *target* entropy maps uses the *source* label 0
   (fool D into "source"); D is trained with 0 on source maps and 1 on target maps.
2. Both discriminator losses are halved (train_UDA.py, train_advent): D gets
   ``bce(D(src), 0) / 2`` and ``bce(D(trg), 1) / 2`` as two separate backward calls, so its
   gradient is ``0.5 * (g_src + g_trg)``. No lambda weights the D losses. The logged
   ``loss_d_aux`` / ``loss_d_main`` are the *target* halves only (the variable is
   overwritten); the source halves are never logged. Not multi-level: the logged
   ``loss_d_aux`` is the int 0.
3. Discriminators are frozen by ``requires_grad = False`` on their parameters from before
   the source forward until after the segmentor's adversarial backward (train_UDA.py,
   train_advent): gradient flows *through* D into the segmentor, but D's ``.grad`` gets
   nothing from that phase. D then trains on ``.detach()``-ed predictions, so the segmentor
   gets nothing from the D phase.
4. Gradient accumulation: the segmentor's gradient is the sum of two backward calls (the
   source segmentation loss, then the weighted target adversarial / entropy loss) before a
   single ``optimizer.step()``. All forwards (segmentor on source and target, D on the
   segmentor's maps and on the detached maps) use the parameters from before any step of
   this iteration; the steps come last, in the order segmentor SGD, ``optimizer_d_aux``
   (only when multi-level), ``optimizer_d_main``. The order of the steps therefore does
   not change results.
5. Interpolation (train_UDA.py, ``interp`` / ``interp_target``): ``nn.Upsample(size=(
   INPUT_SIZE[1], INPUT_SIZE[0]), mode='bilinear', align_corners=True)``; INPUT_SIZE is
   (W, H), so the size is (H, W). Source predictions go to the *source* input size
   (default H x W = 720 x 1280), target predictions to the *target* input size (512 x
   1024). Both the segmentation loss and the discriminators see the upsampled full
   input-resolution maps (D on source maps is run at 720 x 1280, on target maps at
   512 x 1024, so D's outputs differ in size and each BCE is averaged over its own map).
6. ``F.softmax(pred)`` is called without ``dim`` (train_UDA.py); for a 4-D tensor torch's
   implicit choice is dim 1, the class axis.
7. ``cross_entropy_2d`` (loss.py): valid pixels are ``target >= 0`` and ``target != 255``
   with 255 hard-coded (``cfg.TRAIN.IGNORE_LABEL`` is never read); the loss is the mean of
   the per-pixel CE over the valid pixels of the *whole batch* (``size_average=True``), not
   a per-image mean. Its ``if not target.data.dim(): return zeros(1)`` branch is dead
   since PyTorch 0.4 (boolean indexing returns a 1-D, possibly empty, tensor), so a batch
   with no valid pixel gives a NaN loss (0/0) and a zero gradient for that term (in this
   transcription, as in current torch). A label >= C other than 255 is an error.
8. ``bce_loss`` (func.py): ``BCEWithLogitsLoss`` (mean over all N*1*h*w elements of D's
   output) against a constant map filled with the label. The reference builds that map as
   a ``torch.FloatTensor`` (float32) whatever the prediction's dtype; the labels 0 and 1
   are exact in any dtype, so this transcription builds it in the prediction's dtype
   (current torch would otherwise return a float32 loss for float64 logits).
9. ``prob_2_entropy`` (func.py): ``-p * log2(p + 1e-30) / log2(C)`` element-wise, base-2
   logarithm, normalised by ``np.log2(C)``; the 1e-30 is added inside the log only.
10. ``entropy_loss`` (loss.py, MinEnt): ``-sum(p * log2(p + 1e-30)) / (N * H * W * log2 C)``,
    i.e. the mean over pixels of the normalised per-pixel entropy = ``prob_2_entropy(p)``
    summed over classes and averaged over N, H, W. It is computed on the softmax of the
    *upsampled* target logits (full target input resolution), with no detach.
11. MinEnt always uses the aux head (train_UDA.py, train_minent): ``interp_target(pred_trg_aux)``
    is called whatever ``MULTI_LEVEL`` says, so with ``MULTI_LEVEL = False`` the reference
    crashes (aux is None). ``minent_iteration`` raises ValueError in that case.
12. LR schedule (func.py, ``lr_poly`` / ``_adjust_learning_rate``): ``base * (1 - i /
    MAX_ITERS) ** POWER`` with MAX_ITERS = 250000 while training stops at EARLY_STOP =
    120000 (AdvEnt loops ``range(EARLY_STOP + 1)``, MinEnt ``range(EARLY_STOP)``, both
    break at the first snapshot with ``i_iter >= EARLY_STOP - 1``), so the rate never
    decays below ``(1 - 0.48) ** 0.9`` = 0.555 of the base. ``i_iter`` starts at 0 and the
    rate is set before the step, so step 0 uses the base rate. Group 1 (classifier) gets
    10x. The discriminators' Adam uses the same poly law from LEARNING_RATE_D (one group,
    no 10x); d_aux's rate is adjusted even when it is not multi-level (and never steps).
13. Optimizers (train_UDA.py): segmentor SGD(momentum 0.9, weight_decay 5e-4, no nesterov,
    dampening 0), weight decay coupled (added to the gradient before momentum) and applied
    to every parameter in the groups, classifier biases included, lr applied to the
    momentum buffer (torch: ``buf = m * buf + (g + wd * p)``, first step ``buf = g + wd *
    p``; ``p -= lr_t * buf``). Discriminators: Adam(betas=(0.9, 0.99), eps 1e-8, no weight
    decay). The paper used PyTorch 0.4.1, whose Adam divided by ``sqrt(v) + eps`` and scaled
    the step by ``sqrt(1 - b2^t) / (1 - b1^t)`` (eps effectively ``eps / sqrt(1 - b2^t)``
    relative to the bias-corrected form); this transcription uses current
    ``torch.optim.Adam`` (``m_hat / (sqrt(v_hat) + eps)``, as optax.adam). The difference
    only shows where |grad| is near 1e-8.
14. BatchNorm (train_UDA.py ``model.train()``, deeplabv2.py): the segmentor is in train
    mode throughout, so its (affine-frozen) BatchNorms normalise with the statistics of
    the current batch (batch size 1 by default) and update their running statistics on
    both the source and the target forward. This file does not change the modules'
    train/eval mode: call ``model.train()`` first to match the reference.
15. ``optimizer.zero_grad()`` is called at the top of the iteration (PyTorch 0.4.1 zeroed
    the tensors, current torch sets them to None). Every parameter in the groups gets a
    gradient each iteration, so this does not change results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

SOURCE_LABEL = 0  # train_advent's ``source_label``
TARGET_LABEL = 1  # train_advent's ``target_label``
IGNORE_LABEL = 255  # hard-coded in cross_entropy_2d
ENTROPY_EPS = 1e-30  # inside log2 in prob_2_entropy and entropy_loss
ADAM_BETAS_D = (0.9, 0.99)  # the discriminators' Adam
ADAM_EPS_D = 1e-8  # torch.optim.Adam's default, not set by the reference


@dataclasses.dataclass(frozen=True)
class CfgAdvent:
    """The hyper-parameters one iteration reads, with the reference's defaults (config.py).

    Input sizes are (W, H), as the reference's INPUT_SIZE_SOURCE / INPUT_SIZE_TARGET.
    """

    num_classes: int = 19
    multi_level: bool = True
    input_size_source: tuple[int, int] = (1280, 720)
    input_size_target: tuple[int, int] = (1024, 512)
    learning_rate: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    learning_rate_d: float = 1e-4
    lambda_seg_main: float = 1.0
    lambda_seg_aux: float = 0.1
    lambda_adv_main: float = 1e-3
    lambda_adv_aux: float = 2e-4
    lambda_ent_main: float = 1e-3
    lambda_ent_aux: float = 2e-4
    max_iters: int = 250000  # the poly schedule's horizon
    early_stop: int = 120000  # where training stops (not read by one iteration)


def _cfg(cfg: CfgAdvent | Mapping) -> CfgAdvent:
    return cfg if isinstance(cfg, CfgAdvent) else CfgAdvent(**cfg)


# ----------------------------------------------------------------------------- losses


def prob_2_entropy(prob: torch.Tensor) -> torch.Tensor:
    """Weighted self-information map: ``-p * log2(p + 1e-30) / log2(C)``, same shape."""
    _, c, _, _ = prob.size()
    return -torch.mul(prob, torch.log2(prob + ENTROPY_EPS)) / np.log2(c)


def bce_loss(y_pred: torch.Tensor, y_label: float) -> torch.Tensor:
    """BCE-with-logits of ``y_pred`` against a constant map of ``y_label``; mean over all."""
    truth = torch.full_like(y_pred, float(y_label))
    return F.binary_cross_entropy_with_logits(y_pred, truth, reduction="mean")


def cross_entropy_2d(predict: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over the batch's valid pixels (``target >= 0`` and ``!= 255``).

    predict (N, C, H, W) logits, target (N, H, W) integer labels. No valid pixel: NaN.
    """
    assert not target.requires_grad
    assert predict.dim() == 4 and target.dim() == 3
    assert predict.shape[0] == target.shape[0]
    assert predict.shape[2:] == target.shape[1:], f"{predict.shape} vs {target.shape}"
    n, c, h, w = predict.size()
    valid = (target >= 0) & (target != IGNORE_LABEL)
    target = target[valid]
    # (the reference's "return zeros(1) when empty" branch cannot trigger since torch 0.4)
    predict = predict.permute(0, 2, 3, 1).contiguous()
    predict = predict[valid.view(n, h, w, 1).repeat(1, 1, 1, c)].view(-1, c)
    return F.cross_entropy(predict, target, reduction="mean")


def loss_calc(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The reference's loss_calc without the device: labels cast to long, then CE-2d."""
    return cross_entropy_2d(pred, label.long().to(pred.device))


def entropy_loss(v: torch.Tensor) -> torch.Tensor:
    """MinEnt: ``-sum(p log2(p + 1e-30)) / (N * H * W * log2 C)`` over an (N, C, H, W) map."""
    assert v.dim() == 4
    n, c, h, w = v.size()
    return -torch.sum(torch.mul(v, torch.log2(v + ENTROPY_EPS))) / (n * h * w * np.log2(c))


# ------------------------------------------------------------------------ schedules


def lr_poly(base_lr: float, i_iter: int, max_iter: int, power: float) -> float:
    """``base_lr * (1 - i_iter / max_iter) ** power``."""
    return base_lr * ((1 - float(i_iter) / max_iter) ** power)


def _adjust_learning_rate(optimizer, i_iter, cfg: CfgAdvent, learning_rate: float) -> float:
    lr = lr_poly(learning_rate, i_iter, cfg.max_iters, cfg.power)
    optimizer.param_groups[0]["lr"] = lr
    if len(optimizer.param_groups) > 1:
        optimizer.param_groups[1]["lr"] = lr * 10
    return lr


def adjust_learning_rate(optimizer, i_iter: int, cfg) -> float:
    """Segmentor SGD: group 0 at the poly rate, group 1 (classifier) at 10x. Returns group 0's."""
    return _adjust_learning_rate(optimizer, i_iter, _cfg(cfg), _cfg(cfg).learning_rate)


def adjust_learning_rate_discriminator(optimizer, i_iter: int, cfg) -> float:
    """Discriminator Adam: the poly rate from ``learning_rate_d`` (10x only if a 2nd group)."""
    return _adjust_learning_rate(optimizer, i_iter, _cfg(cfg), _cfg(cfg).learning_rate_d)


# ---------------------------------------------------------------------------- step


def interp_source(x: torch.Tensor, cfg) -> torch.Tensor:
    """The reference's ``interp``: bilinear, align_corners=True, to the source (H, W)."""
    w, h = _cfg(cfg).input_size_source
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)


def interp_target(x: torch.Tensor, cfg) -> torch.Tensor:
    """The reference's ``interp_target``: bilinear, align_corners=True, to the target (H, W)."""
    w, h = _cfg(cfg).input_size_target
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)


def make_optimizers(model, d_aux, d_main, cfg, sgd=torch.optim.SGD, adam=torch.optim.Adam):
    """(SGD over ``model.optim_parameters(lr)``, Adam for d_aux, Adam for d_main).

    ``sgd`` / ``adam``: the optimiser classes (``torch_ref.optim041``'s for PyTorch 0.4.1's,
    which the reference ran on).

    ``model.optim_parameters(lr)`` must return ADVENT's two groups (1x, then 10x); the
    rates are overwritten by ``adjust_learning_rate`` at every iteration anyway. ``d_aux``
    may be None (its optimizer is then None).
    """
    cfg = _cfg(cfg)
    optimizer = sgd(
        model.optim_parameters(cfg.learning_rate),
        lr=cfg.learning_rate,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )

    def make_adam(d):
        if d is None:
            return None
        return adam(d.parameters(), lr=cfg.learning_rate_d, betas=ADAM_BETAS_D, eps=ADAM_EPS_D)

    return optimizer, make_adam(d_aux), make_adam(d_main)


def _set_requires_grad(module, flag: bool) -> None:
    if module is not None:
        for param in module.parameters():
            param.requires_grad = flag


def _item(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _seg_losses(model, source_images, source_labels, cfg: CfgAdvent):
    """Source forward, upsampling to the source size, weighted CE; returns the preds too."""
    pred_src_aux, pred_src_main = model(source_images)
    if cfg.multi_level:
        pred_src_aux = interp_source(pred_src_aux, cfg)
        loss_seg_src_aux = loss_calc(pred_src_aux, source_labels)
    else:
        loss_seg_src_aux = 0
    pred_src_main = interp_source(pred_src_main, cfg)
    loss_seg_src_main = loss_calc(pred_src_main, source_labels)
    loss = cfg.lambda_seg_main * loss_seg_src_main + cfg.lambda_seg_aux * loss_seg_src_aux
    return loss, loss_seg_src_aux, loss_seg_src_main, pred_src_aux, pred_src_main


def advent_iteration(
    model,
    d_aux,
    d_main,
    optimizer,
    optimizer_d_aux,
    optimizer_d_main,
    source_images,
    source_labels,
    target_images,
    i_iter,
    cfg,
    *,
    phase_hook: Callable[[str], None] | None = None,
) -> dict:
    """One iteration of train_advent (mutates the modules and optimizers).

    ``source_labels`` (N, H_s, W_s) at the source input size (values 0..C-1, 255 = ignore).
    ``phase_hook(name)``, if given, is called after each backward ('seg_backward',
    'adv_backward', 'd_src_backward', 'd_trg_backward') and before the steps
    ('before_step'), for tests. Returns the losses as floats: the reference's logged names
    (``loss_d_aux`` / ``loss_d_main`` = the halved target-phase losses, as it logs them)
    plus ``loss_d_*_src`` / ``loss_d_*_trg`` (both halved, as back-propagated), the
    weighted totals ``loss_seg`` and ``loss_adv``, and the rates ``lr`` and ``lr_d``.
    """
    cfg = _cfg(cfg)
    hook = phase_hook or (lambda name: None)

    # reset optimizers, adapt the rates
    optimizer.zero_grad()
    if optimizer_d_aux is not None:
        optimizer_d_aux.zero_grad()
    optimizer_d_main.zero_grad()
    lr = adjust_learning_rate(optimizer, i_iter, cfg)
    if optimizer_d_aux is not None:
        adjust_learning_rate_discriminator(optimizer_d_aux, i_iter, cfg)
    lr_d = adjust_learning_rate_discriminator(optimizer_d_main, i_iter, cfg)

    # train the segmentor only: no gradient into the discriminators' parameters
    _set_requires_grad(d_aux, False)
    _set_requires_grad(d_main, False)

    # source: supervised segmentation
    loss_seg, loss_seg_src_aux, loss_seg_src_main, pred_src_aux, pred_src_main = _seg_losses(
        model, source_images, source_labels, cfg
    )
    loss_seg.backward()
    hook("seg_backward")

    # target: fool the discriminators (target entropy maps labelled as source)
    pred_trg_aux, pred_trg_main = model(target_images)
    if cfg.multi_level:
        pred_trg_aux = interp_target(pred_trg_aux, cfg)
        d_out_aux = d_aux(prob_2_entropy(F.softmax(pred_trg_aux, dim=1)))
        loss_adv_trg_aux = bce_loss(d_out_aux, SOURCE_LABEL)
    else:
        loss_adv_trg_aux = 0
    pred_trg_main = interp_target(pred_trg_main, cfg)
    d_out_main = d_main(prob_2_entropy(F.softmax(pred_trg_main, dim=1)))
    loss_adv_trg_main = bce_loss(d_out_main, SOURCE_LABEL)
    loss_adv = cfg.lambda_adv_main * loss_adv_trg_main + cfg.lambda_adv_aux * loss_adv_trg_aux
    loss_adv.backward()
    hook("adv_backward")

    # train the discriminators on detached maps
    _set_requires_grad(d_aux, True)
    _set_requires_grad(d_main, True)
    loss_d_aux_src = 0
    if cfg.multi_level:
        pred_src_aux = pred_src_aux.detach()
        d_out_aux = d_aux(prob_2_entropy(F.softmax(pred_src_aux, dim=1)))
        loss_d_aux_src = bce_loss(d_out_aux, SOURCE_LABEL) / 2
        loss_d_aux_src.backward()
    pred_src_main = pred_src_main.detach()
    d_out_main = d_main(prob_2_entropy(F.softmax(pred_src_main, dim=1)))
    loss_d_main_src = bce_loss(d_out_main, SOURCE_LABEL) / 2
    loss_d_main_src.backward()
    hook("d_src_backward")

    loss_d_aux_trg = 0
    if cfg.multi_level:
        pred_trg_aux = pred_trg_aux.detach()
        d_out_aux = d_aux(prob_2_entropy(F.softmax(pred_trg_aux, dim=1)))
        loss_d_aux_trg = bce_loss(d_out_aux, TARGET_LABEL) / 2
        loss_d_aux_trg.backward()
    pred_trg_main = pred_trg_main.detach()
    d_out_main = d_main(prob_2_entropy(F.softmax(pred_trg_main, dim=1)))
    loss_d_main_trg = bce_loss(d_out_main, TARGET_LABEL) / 2
    loss_d_main_trg.backward()
    hook("d_trg_backward")

    hook("before_step")
    optimizer.step()
    if cfg.multi_level:
        optimizer_d_aux.step()
    optimizer_d_main.step()

    return {
        "loss_seg_src_aux": _item(loss_seg_src_aux),
        "loss_seg_src_main": _item(loss_seg_src_main),
        "loss_adv_trg_aux": _item(loss_adv_trg_aux),
        "loss_adv_trg_main": _item(loss_adv_trg_main),
        "loss_d_aux": _item(loss_d_aux_trg),
        "loss_d_main": _item(loss_d_main_trg),
        "loss_d_aux_src": _item(loss_d_aux_src),
        "loss_d_aux_trg": _item(loss_d_aux_trg),
        "loss_d_main_src": _item(loss_d_main_src),
        "loss_d_main_trg": _item(loss_d_main_trg),
        "loss_seg": _item(loss_seg),
        "loss_adv": _item(loss_adv),
        "lr": lr,
        "lr_d": lr_d,
    }


def minent_iteration(
    model,
    optimizer,
    source_images,
    source_labels,
    target_images,
    i_iter,
    cfg,
    *,
    phase_hook: Callable[[str], None] | None = None,
) -> dict:
    """One iteration of train_minent (mutates the model and optimizer).

    Needs ``cfg.multi_level`` (the reference always uses the aux head here). Returns the
    reference's logged losses as floats plus the weighted totals ``loss_seg``,
    ``loss_ent`` and the rate ``lr``. ``phase_hook`` as in ``advent_iteration``
    ('seg_backward', 'ent_backward', 'before_step').
    """
    cfg = _cfg(cfg)
    if not cfg.multi_level:
        raise ValueError("train_minent always uses the aux prediction: needs multi_level=True")
    hook = phase_hook or (lambda name: None)

    optimizer.zero_grad()
    lr = adjust_learning_rate(optimizer, i_iter, cfg)

    loss_seg, loss_seg_src_aux, loss_seg_src_main, _, _ = _seg_losses(
        model, source_images, source_labels, cfg
    )
    loss_seg.backward()
    hook("seg_backward")

    pred_trg_aux, pred_trg_main = model(target_images)
    pred_trg_aux = interp_target(pred_trg_aux, cfg)
    pred_trg_main = interp_target(pred_trg_main, cfg)
    loss_ent_aux = entropy_loss(F.softmax(pred_trg_aux, dim=1))
    loss_ent_main = entropy_loss(F.softmax(pred_trg_main, dim=1))
    loss_ent = cfg.lambda_ent_aux * loss_ent_aux + cfg.lambda_ent_main * loss_ent_main
    loss_ent.backward()
    hook("ent_backward")

    hook("before_step")
    optimizer.step()

    return {
        "loss_seg_src_aux": _item(loss_seg_src_aux),
        "loss_seg_src_main": _item(loss_seg_src_main),
        "loss_ent_aux": _item(loss_ent_aux),
        "loss_ent_main": _item(loss_ent_main),
        "loss_seg": _item(loss_seg),
        "loss_ent": _item(loss_ent),
        "lr": lr,
    }
