"""PyTorch reference: MTAF's multi-head DeepLabV2 ("ResNetMultiMTKT").

Written from the semantics of valeoai/MTAF ``mtaf/model/deeplabv2.py``: ADVENT's Caffe-style
ResNet (torch_ref/advent.py, the same blocks and frozen BatchNorm affines) with
``num_classifiers`` auxiliary classifiers on layer3's output (``aux_classifier_list``,
multi-level only) and as many main ones on layer4's (``main_classifier_list``), each
ADVENT's four summed dilated 3x3 convs. ``forward`` returns ``(aux list | None, main
list)``; MTKT trains list entry 0 as the target-agnostic student (the one its evaluation
reads) and entry i + 1 as target i's teacher. The SGD groups are ADVENT's: the backbone's
(listed as ADVENT lists them) at 1x, every classifier at 10x.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from torch_ref.advent import (
    ADVENT_BLOCKS,
    CLASSIFIER_DILATIONS,
    ClassifierModule,
    ResNetMulti,
    _frozen_batchnorm,
)


class ResNetMultiMTKT(ResNetMulti):
    """MTAF's ``ResNetMultiMTKT``; ``forward`` -> ``(aux logits list | None, logits list)``."""

    def __init__(self, num_classes: int = 7, multi_level: bool = True, num_classifiers: int = 3,
                 blocks=ADVENT_BLOCKS, base_channels: int = 64):  # fmt: skip
        nn.Module.__init__(self)
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

        def classifiers(channels: int) -> nn.ModuleList:
            return nn.ModuleList(
                ClassifierModule(channels, CLASSIFIER_DILATIONS, num_classes)
                for _ in range(num_classifiers)
            )

        self.aux_classifier_list = classifiers(width * 16) if multi_level else None
        self.layer4 = self._make_layer(width * 8, blocks[3], dilation=4)
        self.main_classifier_list = classifiers(width * 32)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data.normal_(0, 0.01)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.data.fill_(1)
                module.bias.data.zero_()

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        aux = [head(x) for head in self.aux_classifier_list] if self.multi_level else None
        x = self.layer4(x)
        return aux, [head(x) for head in self.main_classifier_list]

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The 10x group (``get_10x_lr_params``): every auxiliary head, then every main one."""
        if self.multi_level:
            yield from self.aux_classifier_list.parameters()
        yield from self.main_classifier_list.parameters()


def get_deeplab_v2_mtkt(num_classes: int = 7, multi_level: bool = True, num_classifiers: int = 3,
                        blocks=ADVENT_BLOCKS, base_channels: int = 64):  # fmt: skip
    """The reference's constructor (ResNet-101 unless ``blocks`` says otherwise)."""
    return ResNetMultiMTKT(num_classes, multi_level, num_classifiers, blocks, base_channels)
