"""Flax leaf path -> PyTorch key for MiT + SegFormer/DAFormer heads; MiT and head layouts.

Our module names are the NVlabs/mmseg ones with ``.`` before an index written
``_`` (``block2_1/attn/kv`` is ``block2.1.attn.kv``), so the map is a rename plus
the layout transform of each leaf kind. MiT checkpoints come in two key layouts:
NVlabs/DAFormer (``patch_embed1.proj``, ``block1.0.attn.q``, ...) and mmseg
(``layers.0.0.projection``, fused ``attn.attn.in_proj_weight``, 1x1-conv FFN).
``mmseg_to_nvlabs`` rewrites the second into the first so one name map serves
both; the model must still be built with the matching ``layout`` (LayerNorm eps).
Decode heads are not rewritten: ``check_head`` tells which head a checkpoint holds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ddb_jax.convert.common import ConversionError, TorchSource, conv_kernel, identity

# SegFormer ImageNet files (mit_b*.pth) carry the classifier; the lead's loader adds
# 'backbone.' to bare backbone files, so both spellings are listed.
IMAGENET_IGNORED_KEYS = ("head.weight", "head.bias", "backbone.head.weight", "backbone.head.bias")
# The DAFormer repo's SegFormerHead builds BaseDecodeHead's conv_seg but predicts with
# linear_pred: conv_seg is in every such checkpoint and never used.
SEGFORMER_UNUSED_KEYS = ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias")


def is_imagenet_classifier_key(key: str) -> bool:
    """True for the ImageNet classifier tensors of a MiT ImageNet file."""
    return key in IMAGENET_IGNORED_KEYS


def unused_keys(state_dict: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """Keys of ``state_dict`` that no Flax variable reads, by construction of the reference.

    Pass as ``convert_state_dict(..., ignore_keys=unused_keys(sd))``.
    """
    unused = [k for k in state_dict if is_imagenet_classifier_key(k)]
    if "decode_head.linear_pred.weight" in state_dict:
        unused += [k for k in SEGFORMER_UNUSED_KEYS if k in state_dict]
    return tuple(unused)


def kernel(x: np.ndarray) -> np.ndarray:
    """torch conv OIHW -> HWIO, torch Linear (out, in) -> Dense (in, out)."""
    if x.ndim == 4:
        return conv_kernel(x)
    if x.ndim == 2:
        return x.T
    raise ConversionError(f"a weight of shape {x.shape} is neither a conv nor a Linear weight")


LEAVES = {
    ("params", "kernel"): ("weight", kernel),
    ("params", "bias"): ("bias", identity),
    ("params", "scale"): ("weight", identity),
    ("batch_stats", "mean"): ("running_mean", identity),
    ("batch_stats", "var"): ("running_var", identity),
}

_CONV_BN = r"(conv|bn)"
MODULE_PATTERNS = {
    "backbone": re.compile(
        r"patch_embed[1-4]/(proj|norm)|norm[1-4]"
        r"|block[1-4]_\d+/(norm1|norm2|attn/(q|kv|proj|sr|norm)|mlp/(fc1|fc2|dwconv/dwconv))"
    ),
    "decode_head": re.compile(
        rf"(linear_c|embed_layers)_\d+/proj|linear_pred|conv_seg|linear_fuse/{_CONV_BN}"
        rf"|(convs_\d+|fusion_conv)/{_CONV_BN}"
        rf"|fuse_layer/(bottleneck|aspp_modules_\d+(/(depthwise|pointwise)_conv)?)/{_CONV_BN}"
    ),
}


def _torch_module(name: str) -> str:
    """'block3_17' -> 'block3.17'; 'patch_embed1' and 'conv_seg' stay as they are."""
    return re.sub(r"_(\d+)$", r".\1", name)


def torch_name(path: tuple[str, ...]) -> TorchSource:
    """Maps ('params'|'batch_stats', 'backbone'|'decode_head', *modules, leaf) to its source.

    Keys are in the NVlabs layout with the segmentor prefixes; run ``mmseg_to_nvlabs``
    on mmseg-layout state dicts first.
    """
    error = ConversionError(f"no MiT/SegFormer tensor for Flax variable {'/'.join(path)}")
    if len(path) < 4 or (path[0], path[-1]) not in LEAVES or path[1] not in MODULE_PATTERNS:
        raise error
    collection, root, *modules, leaf = path
    if not MODULE_PATTERNS[root].fullmatch("/".join(modules)):
        raise error
    torch_leaf, transform = LEAVES[(collection, leaf)]
    key = ".".join([root, *(_torch_module(m) for m in modules), torch_leaf])
    return TorchSource(key, transform)


# config.model.head -> (what it is, key prefixes only its checkpoints have).
HEAD_LAYOUTS = {
    "segformer": (
        "the DAFormer/NVlabs SegFormer head (decode_head.linear_c.N.proj, linear_fuse)",
        ("decode_head.linear_c.", "decode_head.linear_fuse."),
    ),
    "daformer": (
        "the DAFormer head (decode_head.embed_layers.N.proj, fuse_layer)",
        ("decode_head.embed_layers.", "decode_head.fuse_layer."),
    ),
    "mmseg_segformer": (
        "mmseg's SegformerHead (decode_head.convs.N.conv/bn, fusion_conv)",
        ("decode_head.convs.", "decode_head.fusion_conv."),
    ),
}


def detect_head(state_dict: Mapping[str, np.ndarray]) -> str | None:
    """The MiT head whose keys ``state_dict`` has; None when no single head's keys are there."""
    found = [
        head
        for head, (_, prefixes) in HEAD_LAYOUTS.items()
        if any(k.startswith(prefixes) for k in state_dict)
    ]
    return found[0] if len(found) == 1 else None


def check_head(state_dict: Mapping[str, np.ndarray], head: str, source: str = "checkpoint") -> None:
    """Raises a one-line error naming the right ``--head`` when the checkpoint holds another head.

    The heads share the MiT backbone, so without this the strict engine would list every
    head key as missing and unexpected; a checkpoint matching no single head is left to it.
    """
    found = detect_head(state_dict)
    if found is None or found == head:
        return
    raise ConversionError(
        f"{source} holds {HEAD_LAYOUTS[found][0]}: convert it with --head={found} "
        f"(config.model.head={found!r}), not --head={head}"
    )


_NVLABS_PROBE = re.compile(r"(^|\.)patch_embed1\.proj\.weight$")
_MMSEG_PROBE = re.compile(r"(^|\.)layers\.0\.0\.projection\.weight$")


def detect_mit_layout(state_dict: Mapping[str, np.ndarray]) -> str:
    """'nvlabs' or 'mmseg', from the first patch embedding's key; an error if neither."""
    nvlabs = any(_NVLABS_PROBE.search(k) for k in state_dict)
    mmseg = any(_MMSEG_PROBE.search(k) for k in state_dict)
    if nvlabs == mmseg:
        found = "both" if nvlabs else "neither"
        raise ConversionError(
            f"cannot tell the MiT key layout: {found} of 'patch_embed1.proj.weight' (NVlabs) and "
            f"'layers.0.0.projection.weight' (mmseg) found; first keys: {list(state_dict)[:5]}"
        )
    return "nvlabs" if nvlabs else "mmseg"


# mmseg MiT key (after 'layers.{stage}.') -> NVlabs key; {s} = stage + 1.
_LAYERS_KEY = re.compile(r"(?P<prefix>(.*\.)?backbone\.|)layers\.(?P<stage>[0-3])\.(?P<rest>.+)")
_BLOCK_RENAMES = (
    (r"(\d+)\.(norm1|norm2)\.(weight|bias)", r"block{s}.\1.\2.\3"),
    (r"(\d+)\.attn\.attn\.out_proj\.(weight|bias)", r"block{s}.\1.attn.proj.\2"),
    (r"(\d+)\.attn\.(sr|norm)\.(weight|bias)", r"block{s}.\1.attn.\2.\3"),
    (r"(\d+)\.ffn\.layers\.0\.(weight|bias)", r"block{s}.\1.mlp.fc1.\2"),
    (r"(\d+)\.ffn\.layers\.1\.(weight|bias)", r"block{s}.\1.mlp.dwconv.dwconv.\2"),
    (r"(\d+)\.ffn\.layers\.4\.(weight|bias)", r"block{s}.\1.mlp.fc2.\2"),
)
_IN_PROJ = re.compile(r"(\d+)\.attn\.attn\.in_proj_(weight|bias)")


def _rename_stage_key(rest: str, stage: int) -> str | None:
    """NVlabs name for 'layers.{stage}.{rest}' (without prefix); None if not a MiT key."""
    s = stage + 1
    for pattern, replacement in (
        (r"0\.projection\.(weight|bias)", r"patch_embed{s}.proj.\1"),
        (r"0\.norm\.(weight|bias)", r"patch_embed{s}.norm.\1"),
        (r"2\.(weight|bias)", r"norm{s}.\1"),
    ):
        if re.fullmatch(pattern, rest):
            return re.sub(pattern, replacement.format(s=s), rest)
    if rest.startswith("1."):
        block_rest = rest[2:]
        for pattern, replacement in _BLOCK_RENAMES:
            if re.fullmatch(pattern, block_rest):
                return re.sub(pattern, replacement.format(s=s), block_rest)
    return None


def mmseg_to_nvlabs(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrites mmseg MiT keys (bare or under '...backbone.') to the NVlabs layout.

    Splits the fused in_proj (q rows first, then k and v = NVlabs' kv) and flattens the
    1x1-conv FFN weights to Linear weights. Keys outside 'layers.*' pass unchanged.
    """
    out: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray, source: str) -> None:
        if key in out:
            raise ConversionError(f"mmseg MiT key {source} maps onto {key}, already present")
        out[key] = value

    for key, value in state_dict.items():
        match = _LAYERS_KEY.fullmatch(key)
        if match is None:
            put(key, value, key)
            continue
        prefix, stage, rest = match["prefix"], int(match["stage"]), match["rest"]
        in_proj = _IN_PROJ.fullmatch(rest[2:]) if rest.startswith("1.") else None
        if in_proj is not None:
            value = np.asarray(value)
            if value.shape[0] % 3:
                raise ConversionError(f"{key}: shape {value.shape} is not 3 x embed_dim rows")
            dim = value.shape[0] // 3
            base = f"{prefix}block{stage + 1}.{in_proj[1]}.attn"
            put(f"{base}.q.{in_proj[2]}", value[:dim], key)
            put(f"{base}.kv.{in_proj[2]}", value[dim:], key)
            continue
        renamed = _rename_stage_key(rest, stage)
        if renamed is None:
            raise ConversionError(f"{key}: not a known mmseg MiT tensor name")
        if re.search(r"mlp\.fc[12]\.weight$", renamed):
            value = np.asarray(value)
            if value.ndim != 4 or value.shape[2:] != (1, 1):
                raise ConversionError(f"{key}: expected a 1x1 conv weight, got {value.shape}")
            value = value.reshape(value.shape[:2])
        put(prefix + renamed, value, key)
    return out
