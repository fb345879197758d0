"""PyTorch (mmseg / DDB / DAFormer / HRDA / ADVENT / ProDA / ImageNet) weights -> Flax variables.

``convert_model_state`` takes one model's numpy state dict (see ``torch_io``) and
the model config, and returns Flax variables; strict: every tensor is used once
(``common.convert_state_dict``). Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from ddb_jax import models
from ddb_jax.convert import hrda
from ddb_jax.convert.common import ConversionError, convert_state_dict, strip_data_parallel

SEGMENTOR_PREFIXES = ("backbone.", "decode_head.")


def is_segmentor_state(state: Mapping[str, np.ndarray]) -> bool:
    """Segmentor dicts put every tensor under backbone./decode_head.; ImageNet files do not."""
    return any(k.startswith(SEGMENTOR_PREFIXES) for k in state)


def _architecture(family: str):
    """The name map and ImageNet classifier keys of one model family."""
    if family == "resnet":
        from ddb_jax.convert import resnet as arch
    else:
        from ddb_jax.convert import mit as arch
    return arch


def _hrda_enabled(model_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the config builds HRDA's segmentor (configs without the section do not)."""
    return bool(model_cfg.get("hrda") is not None and model_cfg.hrda.get("enabled", False))


def _prune_none(tree):
    """Drops skipped (None) leaves and the empty dicts they leave behind."""
    if isinstance(tree, Mapping):
        pruned = {k: _prune_none(v) for k, v in tree.items()}
        return {
            k: v
            for k, v in pruned.items()
            if v is not None and not (isinstance(v, Mapping) and not v)
        }
    return tree


def convert_model_state(
    state: Mapping[str, np.ndarray],
    model_cfg: ml_collections.ConfigDict,
    source: str = "checkpoint",
) -> tuple[dict[str, Any], ml_collections.ConfigDict, str]:
    """Converts one model's state dict.

    Returns:
      (variables, model_cfg, kind): ``kind`` is 'segmentor' (backbone + head) or
      'backbone' (an ImageNet file: only ``backbone`` subtrees are returned);
      ``model_cfg`` is a copy with what the file fixes (MiT key layout, class count).
    """
    model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    if model_cfg.backbone == models.ADVENT_BACKBONE:
        return _convert_advent(state, model_cfg, source)
    if model_cfg.backbone == models.PRODA_BACKBONE:
        return _convert_proda(state, model_cfg, source)
    family, _ = models.parse_backbone(model_cfg.backbone)
    arch = _architecture(family)
    kind = "segmentor" if is_segmentor_state(state) else "backbone"
    if kind == "backbone":
        state = {f"backbone.{k}": v for k, v in state.items()}
    else:
        hrda.configure(state, model_cfg, source)  # HRDA's layout fixes config.model.hrda
    if family == "mit":
        # The key layout fixes the LayerNorm eps the model must use (docs/method.md §1.7).
        model_cfg.mit_layout = arch.detect_mit_layout(state)
        if kind == "segmentor" and not hrda.is_hrda_state(state):
            arch.check_head(state, model_cfg.head, source)
        if model_cfg.mit_layout == "mmseg":
            state = arch.mmseg_to_nvlabs(state)
        ignore = tuple(arch.unused_keys(state))
    else:
        ignore = tuple(f"backbone.{k}" for k in arch.IMAGENET_IGNORED_KEYS)
    if kind == "segmentor" and "decode_head.conv_seg.weight" in state:
        num_classes = int(state["decode_head.conv_seg.weight"].shape[0])
        if num_classes != model_cfg.num_classes:
            raise ConversionError(
                f"{source}: decode_head.conv_seg has {num_classes} classes, the config "
                f"(config.model.num_classes) says {model_cfg.num_classes}"
            )
    shapes = models.variable_shapes(models.build_model(model_cfg))
    skip = (lambda path: path[1] != "backbone") if kind == "backbone" else (lambda path: False)
    names = hrda.torch_name(arch.torch_name) if _hrda_enabled(model_cfg) else arch.torch_name
    variables = convert_state_dict(
        state, shapes, names, skip=skip, ignore_keys=ignore, source=source
    )
    variables = jax.tree_util.tree_map(np.asarray, _prune_none(variables))
    return variables, model_cfg, kind


def _convert_advent(state, model_cfg: ml_collections.ConfigDict, source: str):
    """ADVENT's DeepLabV2: a trained model (``layer6``, or MTAF's MTKT classifier lists:
    ``advent.configure`` sets the heads and levels) or its ImageNet initialisation
    (``Scale.``-prefixed keys: the backbone alone)."""
    from ddb_jax.convert import advent

    model = models.build_model(model_cfg)
    plain = strip_data_parallel(state)
    if advent.configure(plain, model_cfg, source):
        model = models.build_model(model_cfg)
        return advent.convert_advent(plain, model, source=source), model_cfg, "segmentor"
    return advent.convert_advent_imagenet(plain, model, source=source), model_cfg, "backbone"


def _convert_proda(state, model_cfg: ml_collections.ConfigDict, source: str):
    """ProDA's DeepLabV2: a trained network (``layer5`` present; ``bn_pretrain`` fixes
    ``proda_bn_clr``) or an ImageNet/SimCLR ResNet-101 (the backbone alone)."""
    from ddb_jax.convert import proda

    if proda.is_trained_network(state):
        model_cfg.proda_bn_clr = proda.has_bn_clr(state)
        model = models.build_model(model_cfg)
        return proda.convert_proda(state, model, source=source), model_cfg, "segmentor"
    model = models.build_model(model_cfg)
    return proda.convert_proda_backbone(state, model, source=source), model_cfg, "backbone"


def _read_proda(path: str, which: str | None, allow_pickle: bool):
    """(where in the file, numpy state dict) of a ProDA file (``convert.proda`` layouts)."""
    from ddb_jax.convert import proda, torch_io

    if which:
        raise torch_io.CheckpointFormatError(f"--which={which!r} does not apply to ProDA files")
    checkpoint = torch_io.load_torch_file(path, allow_pickle=allow_pickle)
    prefix, state = proda.proda_state_dict(checkpoint, source=path)
    return prefix, torch_io.to_numpy_state_dict(state, path)


def convert_torch_checkpoint(
    path: str,
    model_cfg: ml_collections.ConfigDict,
    which: str | None = None,
    allow_pickle: bool = False,
) -> tuple[dict[str, Any], ml_collections.ConfigDict, dict[str, str]]:
    """Reads a ``.pth`` (DDB, mmseg, ADVENT, ProDA or ImageNet) and converts the chosen model."""
    from ddb_jax.convert import torch_io

    if model_cfg.backbone == models.PRODA_BACKBONE:
        prefix, state = _read_proda(path, which, allow_pickle)
    else:
        prefix, state = torch_io.read_model_state_dict(path, which=which, allow_pickle=allow_pickle)
    variables, model_cfg, kind = convert_model_state(state, model_cfg, source=path)
    provenance = {"source": str(path), "prefix": prefix, "kind": kind}
    return variables, model_cfg, provenance
