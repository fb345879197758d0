"""PyTorch reference: mmseg ResNetV1c + DDB's DLV2AdapterHead (and DAFormer's DLV2Head, the
sum of ASPP branches HRDA uses), written from their semantics.

Module names reproduce the mmseg state-dict keys (``backbone.stem.0.weight``,
``backbone.layer3.0.downsample.1.running_var``, ``decode_head.aspp_modules.1.conv.weight``,
``decode_head.conv_seg.bias``...), so a state dict of this model is a stand-in for a
real DDB/mmseg checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

ARCH = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)  # mmseg: the second conv is never dilated
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)  # 'pytorch' style
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNetV1c(nn.Module):
    """Deep stem, strides (1,2,1,1), dilations (1,1,2,4), contract_dilation=True.

    ``base_channels``: mmseg's stem/base width (64 in every published model; the tests'
    tiny models use less, as ``config.model.base_channels`` does).
    """

    def __init__(
        self, depth: int, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), base_channels: int = 64
    ):
        super().__init__()
        kind, stage_blocks = ARCH[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        half = base_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, 2, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, 1, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, base_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(base_channels),
            nn.ReLU(),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = base_channels
        for i, num_blocks in enumerate(stage_blocks):
            planes = base_channels * 2**i
            cout = planes * block.expansion
            stride, dilation = strides[i], dilations[i]
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )
            first_dilation = dilation // 2 if dilation > 1 else dilation
            blocks = [block(cin, planes, stride, first_dilation, downsample)]
            blocks += [block(cout, planes, 1, dilation) for _ in range(num_blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.num_stages = len(stage_blocks)

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


class ConvModule(nn.Module):
    """mmcv ConvModule with BN and ReLU: children ``conv``, ``bn``, ``activate``."""

    def __init__(self, cin, cout, kernel, dilation=1):
        super().__init__()
        pad = 0 if kernel == 1 else dilation
        self.conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class DLV2AdapterHead(nn.Module):
    def __init__(self, in_channels, channels=256, dilations=(6, 12), num_classes=19, dropout=0.1):
        super().__init__()
        branch = channels // len(dilations)
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, branch, 1 if d == 1 else 3, d) for d in dilations
        )
        self.bottleneck = ConvModule(channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs):
        x = inputs[-1]
        x = torch.cat([m(x) for m in self.aspp_modules], dim=1)
        feature = self.bottleneck(x)
        return self.conv_seg(self.dropout(feature)), feature


class ASPPBranch(nn.Module):
    """mmcv ConvModule without norm or activation: a conv with bias, child ``conv``."""

    def __init__(self, cin, cout, dilation):
        super().__init__()
        kernel, pad = (1, 0) if dilation == 1 else (3, dilation)
        self.conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation)

    def forward(self, x):
        return self.conv(x)


class DLV2SumHead(nn.Module):
    """DAFormer's DLV2Head (HRDA's DeepLabV2 head): dilated convs of the last map straight
    to the classes, summed in order; returns (logits, that map) as it has no feature layer."""

    def __init__(self, in_channels, dilations=(6, 12), num_classes=19):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ASPPBranch(in_channels, num_classes, d) for d in dilations
        )

    def forward(self, inputs):
        x = inputs[-1]
        outs = [m(x) for m in self.aspp_modules]
        logits = outs[0]
        for out in outs[1:]:
            logits = logits + out
        return logits, x


class Segmentor(nn.Module):
    """mmseg EncoderDecoder's parameter layout: ``backbone`` and ``decode_head``.

    ``base_channels`` and ``channels`` (the head's) are config.model's ``base_channels`` and
    ``head_channels``; the defaults are the published models'.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 19,
        dropout: float = 0.1,
        base_channels: int = 64,
        channels: int = 256,
    ):
        super().__init__()
        self.backbone = ResNetV1c(depth, base_channels=base_channels)
        expansion = 4 if ARCH[depth][0] == "bottleneck" else 1
        self.decode_head = DLV2AdapterHead(
            base_channels * 8 * expansion, channels, num_classes=num_classes, dropout=dropout
        )

    def forward(self, x):
        return self.decode_head(self.backbone(x))


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default weights and BN statistics, scaled so activations stay O(1) with depth.

    Conv kernels: He-normal (fan_in). BN: weight U(0.5, 1.5) (U(0.1, 0.4) on the last BN
    of a residual branch, so the residual sum does not blow up over 33 blocks), bias
    N(0, 0.1), running_mean N(0, 0.1), running_var U(0.5, 1.5). conv_seg bias N(0, 0.1).
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=gen) * (high - low) + low

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            std = (2 / fan_in) ** 0.5
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        elif isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.copy_(uniform(n, 0.5, 1.5))
            module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(uniform(n, 0.5, 1.5))
            module.num_batches_tracked.fill_(1000)
    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            last = module.bn3 if isinstance(module, Bottleneck) else module.bn2
            last.weight.copy_(uniform(last.num_features, 0.1, 0.4))
    return model


@torch.no_grad()
def center_classifier(model: Segmentor, images: torch.Tensor) -> Segmentor:
    """Makes the argmax of a random model informative on ``images``.

    With random weights the per-channel means of the feature dominate the logits and one
    class wins everywhere. Rescaling conv_seg to logits of unit spread and setting its
    bias to cancel the mean logit per class leaves the argmax to the spatial variation.
    """
    was_training = model.training
    model.eval()
    _, feature = model(images)
    head = model.decode_head.conv_seg
    centred = feature - feature.mean(dim=(0, 2, 3), keepdim=True)
    logits = torch.einsum("nchw,kc->nkhw", centred, head.weight[:, :, 0, 0])
    head.weight.div_(logits.std())
    mean_feature = feature.mean(dim=(0, 2, 3))
    head.bias.copy_(-(head.weight[:, :, 0, 0] @ mean_feature))
    model.train(was_training)
    return model
