"""HRDA and MIC(HRDA) checkpoints: the layout, what it fixes in the model config, the names.

An HRDA segmentor's state dict holds the backbone (``backbone.*``) and two heads of one
kind: the single-scale head (``decode_head.head.*``) and the scale attention
(``decode_head.scale_attention.*``), DAFormer's head on MiT or DAFormer's DLV2Head on
ResNetV1c. Their keys below ``decode_head.{head,scale_attention}.`` are those of the
single-scale segmentor, so the MiT and ResNet name maps serve both; the one addition is the
attention's 1x1 ConvModule fusion (``fuse_layer.{conv,bn}``) of the DAFormer variant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_collections
import numpy as np

from ddb_jax.convert import mit
from ddb_jax.convert.common import ConversionError, TorchSource

MARKER = "decode_head.scale_attention."
SUBHEADS = ("head", "scale_attention")
# config.model.head -> (what it is, the key of its classifier below decode_head.<subhead>.).
HEAD_LAYOUTS = {
    "daformer": ("DAFormer's head (decode_head.head.embed_layers, fuse_layer)", "conv_seg.weight"),
    "dlv2_sum": (
        "DAFormer's DLV2Head (decode_head.head.aspp_modules)",
        "aspp_modules.0.conv.weight",
    ),
}


def is_hrda_state(state: Mapping[str, np.ndarray]) -> bool:
    """HRDA's segmentors, and only they, have a scale-attention head."""
    return any(key.startswith(MARKER) for key in state)


def detect_head(state: Mapping[str, np.ndarray]) -> str | None:
    """The single-scale head of an HRDA state dict ('daformer' | 'dlv2_sum'), None if neither."""
    if any(key.startswith("decode_head.head.embed_layers.") for key in state):
        return "daformer"
    if any(key.startswith("decode_head.head.aspp_modules.") for key in state):
        return "dlv2_sum"
    return None


def configure(
    state: Mapping[str, np.ndarray], model_cfg: ml_collections.ConfigDict, source: str
) -> None:
    """Sets in ``model_cfg`` (a copy) what an HRDA file fixes (``hrda.enabled``, the
    attention's class-wise output and, for DAFormer's head, its width); a one-line error
    when the config cannot hold the file (another head, class count, or HRDA on a
    single-scale file and the reverse)."""
    hrda_cfg = model_cfg.get("hrda")
    if not is_hrda_state(state):
        if hrda_cfg is not None and hrda_cfg.get("enabled", False):
            raise ConversionError(
                f"{source} holds a single-scale segmentor (no {MARKER}*): convert it with "
                "config.model.hrda.enabled=False"
            )
        return
    if hrda_cfg is None:
        raise ConversionError(
            f"{source} holds an HRDA segmentor but the model config has no config.model.hrda "
            "section (it predates HRDA); start from configs/default.py's get_model_config()"
        )
    head = detect_head(state)
    if head is None:
        raise ConversionError(
            f"{source} holds an HRDA segmentor whose head is neither of "
            f"{[what for what, _ in HEAD_LAYOUTS.values()]}"
        )
    if model_cfg.head != head:
        raise ConversionError(
            f"{source} holds HRDA with {HEAD_LAYOUTS[head][0]}: convert it with --head={head} "
            f"(config.model.head={head!r}), not --head={model_cfg.head}"
        )
    classifier = HEAD_LAYOUTS[head][1]
    head_weight = state.get(f"decode_head.head.{classifier}")
    attention_weight = state.get(f"{MARKER}{classifier}")
    if head_weight is not None and head_weight.shape[0] != model_cfg.num_classes:
        raise ConversionError(
            f"{source}: decode_head.head has {head_weight.shape[0]} classes, the config "
            f"(config.model.num_classes) says {model_cfg.num_classes}"
        )
    hrda_cfg.enabled = True
    if attention_weight is not None:
        hrda_cfg.attention_classwise = bool(attention_weight.shape[0] != 1)
        if head == "daformer":
            hrda_cfg.attention_channels = int(attention_weight.shape[1])


def torch_name(
    family_name: Callable[[tuple[str, ...]], TorchSource],
) -> Callable[[tuple[str, ...]], TorchSource]:
    """The HRDA name map over a single-scale one (``convert.mit`` or ``convert.resnet``'s
    ``torch_name``): ``decode_head/{head,scale_attention}/...`` is the single-scale
    ``decode_head/...`` with the sub-head in the key."""

    def name(path: tuple[str, ...]) -> TorchSource:
        collection, root, *rest = path
        if root != "decode_head" or len(rest) < 2 or rest[0] not in SUBHEADS:
            return family_name(path)
        subhead, *inner = rest
        if len(inner) == 3 and inner[0] == "fuse_layer" and inner[1] in ("conv", "bn"):
            if (collection, inner[-1]) not in mit.LEAVES:
                raise ConversionError(f"no HRDA tensor for Flax variable {'/'.join(path)}")
            torch_leaf, transform = mit.LEAVES[(collection, inner[-1])]
            return TorchSource(
                f"decode_head.{subhead}.fuse_layer.{inner[1]}.{torch_leaf}", transform
            )
        source = family_name((collection, "decode_head", *inner))
        key = source.key.removeprefix("decode_head.")
        return TorchSource(f"decode_head.{subhead}.{key}", source.transform)

    return name
