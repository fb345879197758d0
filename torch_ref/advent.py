"""PyTorch reference: ADVENT's DeepLabV2 ("ResNetMulti") and its output-space discriminator.

Written from the semantics of valeoai/ADVENT (advent/model/deeplabv2.py and
advent/model/discriminator.py), which follows the Caffe DeepLab-v2 ResNet-101:

* the stride of a bottleneck sits on its first 1x1 conv; the 3x3 conv is padded by its
  dilation; layer3 is dilated 2 and layer4 4 in every block (no "contracted" first block);
* the stem is one 7x7/2 conv and a 3x3/2 max-pool in ceil mode; output stride 8;
* the first block of every layer has a 1x1 conv + BN shortcut (the reference builds one
  whenever a layer is dilated, even at stride 1);
* BatchNorm affine parameters have ``requires_grad=False``, which freezes the scale and
  bias only: in ``train()`` mode the layers still normalise with batch statistics and update
  their running statistics;
* ``layer5`` (multi-level only) is the auxiliary classifier on layer3's output, ``layer6``
  the main one on layer4's; each is four 3x3 convs with bias, dilations 6/12/18/24,
  summed. ``forward`` returns ``(aux or None, main)``.

Module names reproduce ADVENT's state-dict keys (``layer3.0.downsample.1.running_var``,
``layer6.conv2d_list.2.bias``...), and the discriminator is an ``nn.Sequential`` as in the
reference (keys ``0.weight`` ... ``8.bias``), so their state dicts stand in for the
released checkpoints. ``blocks`` and ``base_channels`` (3, 4, 23, 3 and 64 in the
reference) make the tiny models of the tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

ADVENT_BLOCKS = (3, 4, 23, 3)
# ADVENT's cfg.TRAIN.IMG_MEAN / cfg.TEST.IMG_MEAN, in BGR order (the inputs are BGR - mean).
IMG_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
CLASSIFIER_DILATIONS = (6, 12, 18, 24)


def _frozen_batchnorm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d whose scale and bias are not trained (its statistics still move)."""
    bn = nn.BatchNorm2d(channels, affine=True)
    for parameter in bn.parameters():
        parameter.requires_grad = False
    return bn


class Bottleneck(nn.Module):
    """Caffe-style bottleneck: stride on ``conv1`` (1x1), dilation on ``conv2`` (3x3)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, stride=stride, bias=False)
        self.bn1 = _frozen_batchnorm(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = _frozen_batchnorm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _frozen_batchnorm(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ClassifierModule(nn.Module):
    """Four dilated 3x3 convs with bias on the same input; their outputs are summed."""

    def __init__(self, in_channels: int, dilations, num_classes: int):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True)
            for d in dilations
        )
        for conv in self.conv2d_list:
            conv.weight.data.normal_(0, 0.01)  # the bias keeps Conv2d's default init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class ResNetMulti(nn.Module):
    """ADVENT's DeepLabV2 (``get_deeplab_v2``); ``forward`` -> ``(aux logits | None, logits)``."""

    def __init__(self, num_classes: int = 19, multi_level: bool = True,
                 blocks=ADVENT_BLOCKS, base_channels: int = 64):  # fmt: skip
        super().__init__()
        self.multi_level = multi_level
        width = base_channels
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _frozen_batchnorm(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self._in_channels = width
        self.layer1 = self._make_layer(width, blocks[0])
        self.layer2 = self._make_layer(width * 2, blocks[1], stride=2)
        self.layer3 = self._make_layer(width * 4, blocks[2], dilation=2)
        self.layer4 = self._make_layer(width * 8, blocks[3], dilation=4)
        if multi_level:
            self.layer5 = ClassifierModule(width * 16, CLASSIFIER_DILATIONS, num_classes)
        self.layer6 = ClassifierModule(width * 32, CLASSIFIER_DILATIONS, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data.normal_(0, 0.01)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.data.fill_(1)
                module.bias.data.zero_()

    def _make_layer(self, planes: int, num_blocks: int, stride: int = 1, dilation: int = 1):
        out_channels = planes * Bottleneck.expansion
        # Always true for these four layers: every first block has a projection shortcut.
        if stride != 1 or self._in_channels != out_channels or dilation in (2, 4):
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride=stride, bias=False),
                _frozen_batchnorm(out_channels),
            )
        else:
            downsample = None
        layers = [Bottleneck(self._in_channels, planes, stride, dilation, downsample)]
        self._in_channels = out_channels
        layers += [Bottleneck(out_channels, planes, 1, dilation) for _ in range(num_blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        aux = self.layer5(x) if self.multi_level else None
        main = self.layer6(self.layer4(x))
        return aux, main

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The reference's 1x-rate group (``get_1x_lr_params_no_scale``), duplicates included.

        The reference walks ``module.modules()`` of conv1, bn1 and layer1..4 and yields
        ``parameters()`` (recursive) of each, keeping those with ``requires_grad``: a conv
        weight inside a bottleneck comes out once per enclosing module (3 times, 4 for a
        shortcut conv; the stem conv once). BN parameters are never yielded.
        """
        for part in (self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4):
            for module in part.modules():
                yield from (p for p in module.parameters() if p.requires_grad)

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The reference's 10x-rate group (``get_10x_lr_params``): layer5 (if any), layer6."""
        if self.multi_level:
            yield from self.layer5.parameters()
        yield from self.layer6.parameters()

    def optim_parameters(self, lr: float, unique: bool = False) -> list[dict]:
        """SGD parameter groups as the reference builds them: backbone at ``lr``, classifiers
        at ``10 * lr``. The backbone group repeats parameters as the reference's does
        (torch warns, and its SGD then steps each occurrence); ``unique=True`` lists each
        once, which is what the reference's docstrings describe."""
        backbone = self.backbone_parameters()
        if unique:
            backbone = list({id(p): p for p in backbone}.values())
        return [
            {"params": backbone, "lr": lr},
            {"params": self.classifier_parameters(), "lr": 10 * lr},
        ]


def get_deeplab_v2(num_classes: int = 19, multi_level: bool = True, blocks=ADVENT_BLOCKS,
                   base_channels: int = 64) -> ResNetMulti:  # fmt: skip
    """The reference's constructor (ResNet-101 unless ``blocks`` says otherwise)."""
    return ResNetMulti(num_classes, multi_level, blocks, base_channels)


def get_fc_discriminator(num_classes: int, ndf: int = 64) -> nn.Sequential:
    """ADVENT's output-space discriminator: five 4x4/2 convs (padding 1, bias), channels
    ndf, 2ndf, 4ndf, 8ndf, 1, LeakyReLU(0.2) between; PyTorch's default init."""
    widths = (num_classes, ndf, ndf * 2, ndf * 4, ndf * 8, 1)
    layers: list[nn.Module] = []
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        if layers:
            layers.append(nn.LeakyReLU(negative_slope=0.2))
        layers.append(nn.Conv2d(cin, cout, 4, stride=2, padding=1))
    return nn.Sequential(*layers)
