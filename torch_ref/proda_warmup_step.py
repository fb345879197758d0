"""PyTorch reference of ProDA's warm-up iteration, for step parity (float64 on CPU).

A transcription of microsoft/ProDA ``models/adaptation_modelv2.py`` (``CustomModel.step_adv``
and the warm-up branches of ``CustomModel.__init__``: the discriminator, its Adam, the
segmentor's two-group SGD, the GAN loss), ``models/discriminator.py`` (``FCDiscriminator``)
and ``models/utils.py`` (``PolynomialLR``, ``cross_entropy2d``), as ``train.py`` calls them
with ``--stage warm_up`` and parser_train.py's defaults (``--gan LS --adv 0.01``,
``--S_pseudo_src 0``). Standard torch only; imports nothing of the project.

The segmentor is any module returning ``{'out': logits, ...}`` at any resolution, with the
reference's parameter groups as ``backbone_parameters()`` (``get_1x_lr_params``: nested
modules listed again) and ``classifier_parameters()`` (``get_10x_lr_params``).

Changes that let it run in float64 and leave the arithmetic as it is:

1. The constant label maps (``torch.FloatTensor(...).fill_(label)``, float32 in the
   reference) are made in the prediction's dtype; 0 and 1 are exact in any dtype.
2. The ignore label is a parameter (the reference's ``cross_entropy2d`` hard-codes 250;
   the project uses 255).
3. ``DataParallel`` and SyncBN are left out (one device: plain BN on the same batch).

What the reference does, kept: the discriminator's parameters do not require gradients
while the segmentor's loss is back-propagated through it; the segmentor steps before the
discriminator's forward, which reads the segmentor's outputs of this iteration (computed
before that step) detached; the discriminator's loss is the sum of its two halves (not
halved, unlike ADVENT's); every loss is a mean over its elements.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

SOURCE_LABEL, TARGET_LABEL = 0, 1  # adv_source_label / adv_target_label
ADAM_BETAS_D = (0.9, 0.99)


class FCDiscriminator(nn.Module):
    """ProDA's ``FCDiscriminator``: four 3x3/2 convs (planes x 1, 2, 4, 8), ReLU after the
    first three, LeakyReLU(0.2) after the fourth, a 1x1 classifier; PyTorch's default init."""

    def __init__(self, inplanes: int, planes: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(planes, planes * 2, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(planes * 2, planes * 4, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(planes * 4, planes * 8, kernel_size=3, stride=2, padding=1)
        self.classifier = nn.Conv2d(planes * 8, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.leaky_relu(self.conv4(x), negative_slope=0.2)
        return self.classifier(x)


@dataclasses.dataclass
class Options:
    """The ``opt`` fields the warm-up reads (parser_train.py defaults)."""

    n_class: int = 19
    gan: str = "LS"  # 'LS' (MSELoss) | 'Vanilla' (BCEWithLogitsLoss)
    adv: float = 0.01
    lr: float = 1e-4  # the segmentor's (the 10x group: 10 lr)
    lr_d: float = 1e-4  # the discriminator's Adam (hard-coded in the reference)
    train_iters: int = 90000  # PolynomialLR's horizon, both optimisers
    ignore_index: int = 250


def gan_loss(kind: str):
    """CustomModel's ``self.bceloss``: MSELoss for 'LS', BCEWithLogitsLoss for 'Vanilla'."""
    if kind == "LS":
        return nn.MSELoss()
    if kind == "Vanilla":
        return nn.BCEWithLogitsLoss()
    raise ValueError(f"gan={kind!r}")


def filled(like: torch.Tensor, label: int) -> torch.Tensor:
    return torch.full_like(like, float(label))


def cross_entropy2d(logits, target, ignore_index: int):
    """models/utils.py cross_entropy2d: mean CE over the non-ignored pixels."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")


def make_optimizers(model, disc, opt: Options, sgd=torch.optim.SGD, unique: bool = False):
    """(BaseOpti, optimizer_D): SGD over [1x group at lr, 10x group at 10 lr], momentum 0.9,
    weight decay 2e-4; Adam(lr_d, betas (0.9, 0.99)). ``sgd``: the SGD class (torch 1.x's,
    which steps each listing of a parameter, for the reference as it ran); ``unique``: each
    parameter of the 1x group listed once."""
    backbone = list(model.backbone_parameters())
    if unique:
        backbone = list({id(p): p for p in backbone}.values())
    groups = [
        {"params": backbone, "lr": opt.lr},
        {"params": list(model.classifier_parameters()), "lr": opt.lr * 10},
    ]
    base = sgd(groups, lr=opt.lr, weight_decay=2e-4, momentum=0.9)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=opt.lr_d, betas=ADAM_BETAS_D)
    return base, disc_opt


def poly_rate(optimizer, base_lrs, it: int, max_iter: int, gamma: float = 0.9) -> None:
    """PolynomialLR at ``last_epoch = it`` (stepped once per iteration, after it):
    ``base (1 - it / max_iter) ** gamma``, floored at 0."""
    factor = max((1 - it / float(max_iter)) ** gamma, 0)
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def step_adv(model, disc, base_opti, optimizer_d, source_x, source_label, target_x,
             opt: Options, record: dict | None = None) -> dict:  # fmt: skip
    """One ``step_adv`` (mutates the models and the optimisers). Returns the reference's
    three logged losses (``loss_adv_G`` weighted by ``adv``) as floats; ``record`` gets the
    segmentor's and the discriminator's gradients."""
    bceloss = gan_loss(opt.gan)
    for param in disc.parameters():
        param.requires_grad = False
    base_opti.zero_grad()

    source_output = model(source_x)
    source_up = F.interpolate(source_output["out"], size=source_x.shape[2:], mode="bilinear",
                              align_corners=True)  # fmt: skip
    loss_gta = cross_entropy2d(source_up, source_label, opt.ignore_index)

    target_output = model(target_x)
    target_up = F.interpolate(target_output["out"], size=target_x.shape[2:], mode="bilinear",
                              align_corners=True)  # fmt: skip
    target_d_out = disc(F.softmax(target_up, dim=1))
    loss_adv_g = bceloss(target_d_out, filled(target_d_out, SOURCE_LABEL)) * opt.adv
    loss_g = loss_adv_g + loss_gta
    loss_g.backward()
    if record is not None:
        record["grads"] = _grads(model)
    base_opti.step()

    for param in disc.parameters():
        param.requires_grad = True
    optimizer_d.zero_grad()
    source_d_out = disc(F.softmax(source_up.detach(), dim=1))
    target_d_out = disc(F.softmax(target_up.detach(), dim=1))
    loss_d_source = bceloss(source_d_out, filled(source_d_out, SOURCE_LABEL))
    loss_d_target = bceloss(target_d_out, filled(target_d_out, TARGET_LABEL))
    loss_d = loss_d_source + loss_d_target
    loss_d.backward()
    if record is not None:
        record["disc_grads"] = _grads(disc)
    optimizer_d.step()
    return {
        "loss_GTA": loss_gta.item(), "loss_adv_G": loss_adv_g.item(), "loss_D": loss_d.item(),
        "loss_D_source": loss_d_source.item(), "loss_D_target": loss_d_target.item(),
    }  # fmt: skip
