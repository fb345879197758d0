"""PyTorch reference: ProDA's DeepLabV2 (``Deeplab`` of microsoft/ProDA models/deeplabv2.py).

Written from the reference's semantics, with its state-dict keys:

* the Caffe-style ResNet-101: 7x7/2 stem, ceil-mode 3x3/2 max-pool, the stride on each
  bottleneck's first 1x1 conv, the 3x3 conv padded by its dilation (2 in layer3, 4 in
  layer4), a 1x1 conv + BN shortcut on the first block of every layer; output stride 8;
* every BatchNorm trains (no ``requires_grad=False``; ProDA's recipes never freeze BN);
  ``bn_clr`` adds ``bn_pretrain``, a BatchNorm on layer4's output;
* ``layer5``: five branches (a 1x1 conv, then 3x3 convs dilated 6/12/18/24), each
  ``Sequential(conv with bias, GroupNorm(32, 256), ReLU)``; their concatenation;
  ``bottleneck = Sequential(SE block, 3x3 conv with bias, GroupNorm(32, 256))``;
  ``head = Sequential(Dropout2d(0.1), bias-free 1x1 conv)``;
* ``forward`` -> ``{'feat': dropout(bottleneck output), 'out': logits}`` at 1/8 of the
  input, as the reference's ``layer5(x, get_feat=True)``.

The initialisation is the one the reference's loops leave (all conv weights N(0, 0.01),
branch biases PyTorch's default, bottleneck conv bias 0, SE Linears PyTorch's default).
The sync-BN of multi-GPU training is plain BatchNorm2d here (one process). ``blocks``,
``base_channels``, ``head_channels`` and ``dropout`` (3, 4, 23, 3; 64; 256; 0.1 in the
reference) make the tests' tiny models.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

PRODA_BLOCKS = (3, 4, 23, 3)
ASPP_DILATIONS = (6, 12, 18, 24)


class Bottleneck(nn.Module):
    """Caffe-style bottleneck: stride on ``conv1`` (1x1), dilation on ``conv2`` (3x3)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class SEBlock(nn.Module):
    """Channels scaled by sigmoid(Linear(ReLU(Linear(global average)))), reduction 16."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.se = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.se(x.mean(dim=(2, 3)))
        return x * weight[:, :, None, None]


class ClassifierModule2(nn.Module):
    """ProDA's head (``Classifier_Module2`` with ``use_se=True``)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256,
                 dropout: float = 0.1):  # fmt: skip
        super().__init__()
        branches = [(1, 1)] + [(3, d) for d in ASPP_DILATIONS]
        self.conv2d_list = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, channels, k, padding=d * (k // 2), dilation=d, bias=True),
                nn.GroupNorm(32, channels),
                nn.ReLU(),
            )
            for k, d in branches
        )
        concat = channels * len(branches)
        self.bottleneck = nn.Sequential(
            SEBlock(concat), nn.Conv2d(concat, channels, 3, padding=1), nn.GroupNorm(32, channels)
        )
        self.head = nn.Sequential(
            nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1, bias=False)
        )
        self.bottleneck[1].bias.data.zero_()  # the head's own init that survives

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = torch.cat([branch(x) for branch in self.conv2d_list], dim=1)
        feat = self.head[0](self.bottleneck(out))
        return {"feat": feat, "out": self.head[1](feat)}


class ResNet101(nn.Module):
    """ProDA's DeepLabV2; ``forward`` -> ``{'feat', 'out'}``."""

    def __init__(self, num_classes: int = 19, blocks=PRODA_BLOCKS, base_channels: int = 64,
                 head_channels: int = 256, dropout: float = 0.1, bn_clr: bool = False):  # fmt: skip
        super().__init__()
        width = base_channels
        self.bn_clr = bn_clr
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self._in_channels = width
        self.layer1 = self._make_layer(width, blocks[0])
        self.layer2 = self._make_layer(width * 2, blocks[1], stride=2)
        self.layer3 = self._make_layer(width * 4, blocks[2], dilation=2)
        self.layer4 = self._make_layer(width * 8, blocks[3], dilation=4)
        self.layer5 = ClassifierModule2(width * 32, num_classes, head_channels, dropout)
        if bn_clr:
            self.bn_pretrain = nn.BatchNorm2d(width * 32)
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
                nn.BatchNorm2d(out_channels),
            )
        else:
            downsample = None
        layers = [Bottleneck(self._in_channels, planes, stride, dilation, downsample)]
        self._in_channels = out_channels
        layers += [Bottleneck(out_channels, planes, 1, dilation) for _ in range(num_blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.bn_clr:
            x = self.bn_pretrain(x)
        return self.layer5(x)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The reference's 1x group (``get_1x_lr_params``), duplicates included: it walks
        ``modules()`` of conv1, bn1 and layer1..4 and yields each one's recursive
        ``parameters()``, so a parameter comes out once per enclosing module."""
        for part in (self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4):
            for module in part.modules():
                yield from (p for p in module.parameters() if p.requires_grad)

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The reference's 10x group (``get_10x_lr_params``): bn_pretrain (if any), layer5."""
        if self.bn_clr:
            yield from self.bn_pretrain.parameters()
        yield from self.layer5.parameters()


def deeplab(num_classes: int = 19, blocks=PRODA_BLOCKS, base_channels: int = 64,
            head_channels: int = 256, dropout: float = 0.1,
            bn_clr: bool = False) -> ResNet101:  # fmt: skip
    """The reference's ``Deeplab`` constructor, without its weight loading."""
    return ResNet101(num_classes, blocks, base_channels, head_channels, dropout, bn_clr)
