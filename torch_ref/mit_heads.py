"""PyTorch reference MiT (NVlabs and mmseg module names) and SegFormer/DAFormer heads.

Written from the semantics of the DAFormer repo (NVlabs MiT, SegFormerHead,
DAFormerHead with the sepaspp fusion) and mmseg 0.30's MixVisionTransformer
(nn.MultiheadAttention with fused in_proj, 1x1-conv Mix-FFN) and SegformerHead
(ConvModule per level, fusion_conv, conv_seg). Module names are
the reference ones, so ``state_dict()`` has the real checkpoint keys. Test use only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIT_B0 = dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2))
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
PATCH_EMBEDS = ((7, 4), (3, 2), (3, 2), (3, 2))
NVLABS_EPS = dict(block=1e-6, patch=1e-5, attn=1e-5)
MMSEG_EPS = dict(block=1e-6, patch=1e-6, attn=1e-6)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


# ---------------------------------------------------------------- NVlabs MiT
class NVPatchEmbed(nn.Module):
    def __init__(self, cin, cout, kernel, stride, eps):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(cout, eps=eps)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[2:]
        return self.norm(to_tokens(x)), h, w


class NVAttention(nn.Module):
    def __init__(self, dim, heads, sr, eps):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, h, w):
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, d).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.norm(to_tokens(self.sr(to_map(x, h, w))))
        kv = self.kv(src).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        attn = (q @ kv[0].transpose(-2, -1) * d**-0.5).softmax(-1)
        return self.proj((attn @ kv[1]).transpose(1, 2).reshape(b, n, c))


class NVDWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        return to_tokens(self.dwconv(to_map(x, h, w)))


class NVMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = NVDWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class NVBlock(nn.Module):
    def __init__(self, dim, heads, sr, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps["block"])
        self.attn = NVAttention(dim, heads, sr, eps["attn"])
        self.norm2 = nn.LayerNorm(dim, eps=eps["block"])
        self.mlp = NVMlp(dim, 4 * dim)

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x), h, w)


class NVMiT(nn.Module):
    """NVlabs/DAFormer MixVisionTransformer (eval semantics: no drop path)."""

    def __init__(self, embed_dims, depths, eps=NVLABS_EPS):
        super().__init__()
        cin = 3
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True), start=1):
            kernel, stride = PATCH_EMBEDS[i - 1]
            setattr(self, f"patch_embed{i}", NVPatchEmbed(cin, dim, kernel, stride, eps["patch"]))
            blocks = [NVBlock(dim, NUM_HEADS[i - 1], SR_RATIOS[i - 1], eps) for _ in range(depth)]
            setattr(self, f"block{i}", nn.ModuleList(blocks))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=eps["block"]))
            cin = dim

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = to_map(getattr(self, f"norm{i}")(x), h, w)
            outs.append(x)
        return outs


# ---------------------------------------------------------------- mmseg 0.30 MiT
class MMPatchEmbed(nn.Module):
    def __init__(self, cin, cout, kernel, stride, eps):
        super().__init__()
        self.projection = nn.Conv2d(cin, cout, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(cout, eps=eps)

    def forward(self, x):
        x = self.projection(x)
        h, w = x.shape[2:]
        return self.norm(to_tokens(x)), h, w


class MMEfficientAttention(nn.Module):
    """mmseg's EfficientMultiheadAttention: torch MultiheadAttention on reduced keys."""

    def __init__(self, dim, heads, sr, eps):
        super().__init__()
        self.sr_ratio = sr
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, h, w):
        src = x
        if self.sr_ratio > 1:
            src = self.norm(to_tokens(self.sr(to_map(x, h, w))))
        return self.attn(x, src, src, need_weights=False)[0]


class MMFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(dim, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Conv2d(hidden, dim, 1),
            nn.Dropout(0.0),
        )

    def forward(self, x, h, w):
        return to_tokens(self.layers(to_map(x, h, w)))


class MMLayer(nn.Module):
    def __init__(self, dim, heads, sr, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps["block"])
        self.attn = MMEfficientAttention(dim, heads, sr, eps["attn"])
        self.norm2 = nn.LayerNorm(dim, eps=eps["block"])
        self.ffn = MMFFN(dim, 4 * dim)

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x), h, w)


class MMMiT(nn.Module):
    """mmseg 0.30 MixVisionTransformer: layers[i] = [patch embed, blocks, norm]."""

    def __init__(self, embed_dims, depths, eps=MMSEG_EPS):
        super().__init__()
        self.layers = nn.ModuleList()
        cin = 3
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            kernel, stride = PATCH_EMBEDS[i]
            blocks = [MMLayer(dim, NUM_HEADS[i], SR_RATIOS[i], eps) for _ in range(depth)]
            self.layers.append(
                nn.ModuleList(
                    [
                        MMPatchEmbed(cin, dim, kernel, stride, eps["patch"]),
                        nn.ModuleList(blocks),
                        nn.LayerNorm(dim, eps=eps["block"]),
                    ]
                )
            )
            cin = dim

    def forward(self, x):
        outs = []
        for embed, blocks, norm in self.layers:
            x, h, w = embed(x)
            for block in blocks:
                x = block(x, h, w)
            x = to_map(norm(x), h, w)
            outs.append(x)
        return outs


# ---------------------------------------------------------------- heads
class ConvModule(nn.Module):
    """mmcv ConvModule with BN + ReLU (bias-free conv)."""

    def __init__(self, cin, cout, kernel=1, dilation=1, groups=1):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, 1, pad, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    def __init__(self, cin, cout, dilation):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, 3, dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class MLP(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, x):
        h, w = x.shape[2:]
        return to_map(self.proj(to_tokens(x)), h, w)


def embed_upsample(embeds: nn.ModuleDict, features: list) -> torch.Tensor:
    size = features[0].shape[2:]
    outs = []
    for i, f in enumerate(features):
        e = embeds[str(i)](f)
        if e.shape[2:] != size:
            e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
        outs.append(e)
    return torch.cat(outs, 1)


class SegFormerHead(nn.Module):
    """DAFormer repo SegFormerHead; returns (logits, fused feature). conv_seg is unused."""

    def __init__(self, in_channels, embed_dim, num_classes=19, channels=128):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(0.1)
        self.linear_c = nn.ModuleDict(
            {str(i): MLP(c, embed_dim) for i, c in enumerate(in_channels)}
        )
        self.linear_fuse = ConvModule(embed_dim * len(in_channels), embed_dim)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features):
        feature = self.linear_fuse(embed_upsample(self.linear_c, features))
        return self.linear_pred(self.dropout(feature)), feature


class ASPPWrapper(nn.Module):
    """sep=True, pool=False, dilations (1, 6, 12, 18)."""

    def __init__(self, cin, channels, dilations=(1, 6, 12, 18)):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, channels, 1)
            if d == 1
            else DepthwiseSeparableConvModule(cin, channels, d)
            for d in dilations
        )
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3)

    def forward(self, x):
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], 1))


class DAFormerHead(nn.Module):
    """DAFormer's head; ``fusion='conv'``: a 1x1 ConvModule instead of the separable ASPP
    (HRDA's scale-attention head, fusion_cfg type 'conv')."""

    def __init__(self, in_channels, channels=256, num_classes=19, dropout=0.1, fusion="aspp"):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.embed_layers = nn.ModuleDict(
            {str(i): MLP(c, channels) for i, c in enumerate(in_channels)}
        )
        fused_in = channels * len(in_channels)
        if fusion == "conv":
            self.fuse_layer = ConvModule(fused_in, channels, 1)
        else:
            self.fuse_layer = ASPPWrapper(fused_in, channels)

    def forward(self, features):
        feature = self.fuse_layer(embed_upsample(self.embed_layers, features))
        return self.conv_seg(self.dropout(feature)), feature


class MMSegSegformerHead(nn.Module):
    """mmseg 0.x SegformerHead; returns (logits, fusion_conv output).

    Each level: 1x1 ConvModule (conv, BN, ReLU) to ``channels``, then resized to level 0.
    """

    def __init__(self, in_channels, channels=256, num_classes=19, dropout_ratio=0.1):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels)
        self.fusion_conv = ConvModule(channels * len(in_channels), channels, 1)

    def forward(self, features):
        size = features[0].shape[2:]
        levels = []
        for conv, f in zip(self.convs, features, strict=True):
            level = conv(f)
            if level.shape[2:] != size:
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            levels.append(level)
        feature = self.fusion_conv(torch.cat(levels, 1))
        return self.conv_seg(self.dropout(feature)), feature


class EncoderDecoder(nn.Module):
    def __init__(self, backbone, decode_head):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, x):
        return self.decode_head(self.backbone(x))


# ---------------------------------------------------------------- weights
@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fills every parameter and BN running statistic with seeded random values.

    Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2), biases ~ N(0, 0.2): no
    default-init structure (zero biases, unit scales) that could hide a mapping error.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.ndim >= 2:
            param.copy_(noise / param[0].numel() ** 0.5)
        elif name.endswith("weight"):
            param.copy_(1.0 + 0.2 * noise)
        else:
            param.copy_(0.2 * noise)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(0.2 * torch.randn(buf.shape, generator=gen))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
    return model
