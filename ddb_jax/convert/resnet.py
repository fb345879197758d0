"""Flax leaf path -> mmseg state-dict key for ResNetV1c + DLV2 head (DeepLabV2 of DDB).

Our module names are the torch ones with ``.`` written as ``_`` before an index
(``layer3_0/downsample_1`` is ``layer3.0.downsample.1``), so the map is a rename
plus the layout transform of each leaf kind.
"""

from __future__ import annotations

import re

from ddb_jax.convert.common import ConversionError, TorchSource, conv_kernel, identity

# The open-mmlab ImageNet resnet*_v1c files also hold the ImageNet classifier.
IMAGENET_IGNORED_KEYS = ("fc.weight", "fc.bias")

# (collection, flax leaf) -> (torch leaf, transform). Every conv here is a 2-D conv,
# including the 1x1 conv_seg (a torch Conv2d, OIHW weight).
LEAVES = {
    ("params", "kernel"): ("weight", conv_kernel),
    ("params", "bias"): ("bias", identity),
    ("params", "scale"): ("weight", identity),
    ("batch_stats", "mean"): ("running_mean", identity),
    ("batch_stats", "var"): ("running_var", identity),
}

MODULE_PATTERNS = {
    "backbone": re.compile(r"stem_[013467]|layer[1-4]_\d+/(conv[1-3]|bn[1-3]|downsample_[01])"),
    "decode_head": re.compile(r"(aspp_modules_\d+|bottleneck)/(conv|bn)|conv_seg"),
}


def _torch_module(name: str) -> str:
    """'layer3_12' -> 'layer3.12'; 'conv_seg' and 'bn2' stay as they are."""
    return re.sub(r"_(\d+)$", r".\1", name)


def torch_name(path: tuple[str, ...]) -> TorchSource:
    """Maps ('params'|'batch_stats', 'backbone'|'decode_head', *modules, leaf) to its source."""
    if len(path) < 4 or (path[0], path[-1]) not in LEAVES or path[1] not in MODULE_PATTERNS:
        raise ConversionError(f"no mmseg ResNet/DLV2 tensor for Flax variable {'/'.join(path)}")
    collection, root, *modules, leaf = path
    if not MODULE_PATTERNS[root].fullmatch("/".join(modules)):
        raise ConversionError(f"no mmseg ResNet/DLV2 tensor for Flax variable {'/'.join(path)}")
    torch_leaf, transform = LEAVES[(collection, leaf)]
    key = ".".join([root, *(_torch_module(m) for m in modules), torch_leaf])
    return TorchSource(key, transform)
