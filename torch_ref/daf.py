"""PyTorch reference: DAF's depth-aware DeepLabV2 ("ResNetMultiDepth").

Written from the semantics of 3D-Vision-Lab-of-JUST/dg_ljw model/deeplabv2_depth.py, built
on ADVENT's ResNetMulti (torch_ref/advent.py): a channel attention and an up-projection
on each of the four ResNet stages, their 4 x 16 maps fused (``mff``), a one-channel depth
regressed from them (``convR0``, ``bnR0``, ``convR2``) and upsampled to a fixed 228 x 304,
and ``dec4`` (1x1 conv + ReLU) of the fused maps multiplying layer 4's output before the
main classifier. Every Conv2d weight is re-drawn N(0, 0.01) and every BatchNorm set to
(1, 0) after construction, as the reference's ``__init__`` does.

One change: with ``multi_level`` the reference applies ``layer5`` to the stem's output,
which cannot run; here it reads layer 3's output, as ADVENT's ResNetMulti does.
Module names are the reference's, so a state dict stands in for its snapshots.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref.advent import ADVENT_BLOCKS, ResNetMulti

DEPTH_SIZE = (228, 304)


class UpProjection(nn.Module):
    """5x5 conv (no bias), BN, ReLU, then bilinear (align_corners=True) to ``size``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def attention(channels: int) -> nn.Sequential:
    """Squeeze-excitation without biases: pool, 1x1 to C/16, ReLU, 1x1 back, sigmoid."""
    hidden = max(channels // 16, 1)
    return nn.Sequential(
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Conv2d(channels, hidden, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(hidden, channels, 1, bias=False),
        nn.Sigmoid(),
    )


class ResNetMultiDepth(ResNetMulti):
    """``forward`` -> (aux logits | None, logits, depth (N, 1, 228, 304), fused maps)."""

    def __init__(self, num_classes: int = 16, multi_level: bool = False, blocks=ADVENT_BLOCKS,
                 base_channels: int = 64, features: int = 16, depth_size=DEPTH_SIZE):  # fmt: skip
        super().__init__(num_classes, multi_level, blocks, base_channels)
        channels = [base_channels * 4 * 2**i for i in range(4)]
        fused = 4 * features
        self.depth_size = tuple(depth_size)
        self.dec4 = nn.Conv2d(fused, channels[3], 1, bias=True)
        for i, c in enumerate(channels, start=1):
            setattr(self, f"att{i}", attention(c))
            setattr(self, f"up{i}", UpProjection(c, features))
        self.mff_conv = nn.Conv2d(fused, fused, 5, padding=2, bias=False)
        self.mff_bn = nn.BatchNorm2d(fused)
        self.convR0 = nn.Conv2d(fused, fused, 5, padding=2, bias=False)
        self.bnR0 = nn.BatchNorm2d(fused)
        self.convR2 = nn.Conv2d(fused, 1, 5, padding=2, bias=True)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data.normal_(0, 0.01)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.data.fill_(1)
                module.bias.data.zero_()

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        b1 = self.layer1(x)
        b2 = self.layer2(b1)
        b3 = self.layer3(b2)
        b4 = self.layer4(b3)
        aux = self.layer5(b3) if self.multi_level else None
        size = [b2.size(2), b2.size(3)]
        maps = [
            getattr(self, f"up{i}")(b * getattr(self, f"att{i}")(b), size)
            for i, b in enumerate((b1, b2, b3, b4), start=1)
        ]
        fused = F.relu(self.mff_bn(self.mff_conv(torch.cat(maps, 1))))
        out = self.convR2(F.relu(self.bnR0(self.convR0(fused))))
        depth = out
        if self.depth_size:
            depth = F.interpolate(out, size=list(self.depth_size), mode="bilinear",
                                  align_corners=True)  # fmt: skip
        main = self.layer6(b4 * self.relu(self.dec4(fused)))
        return aux, main, depth, fused

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The reference's 10x group (``get_10x_lr_params``): the classifiers and every
        module of the depth head, each parameter once."""
        names = ["layer5"] if self.multi_level else []
        names += ["layer6", "att1", "att2", "att3", "att4", "up1", "up2", "up3", "up4",
                  "mff_bn", "mff_conv", "convR0", "convR2", "bnR0", "dec4"]  # fmt: skip
        for name in names:
            yield from getattr(self, name).parameters()


def get_deeplab_v2_depth(num_classes: int = 16, multi_level: bool = False, blocks=ADVENT_BLOCKS,
                         base_channels: int = 64, features: int = 16,
                         depth_size=DEPTH_SIZE) -> ResNetMultiDepth:  # fmt: skip
    return ResNetMultiDepth(num_classes, multi_level, blocks, base_channels, features, depth_size)
