"""ADVENT's PyTorch checkpoints (valeoai/ADVENT) -> Flax variables, every tensor accounted for.

Three kinds of file:

* a trained segmentation network (the released ``gta2cityscapes_advent.pth``,
  ``gta2cityscapes_advent_cyclegan.pth``, ``gta2cityscapes_minent_ER.pth``, and every
  ``model_{i}.pth`` snapshot): ``ResNetMulti.state_dict()`` as it is, loaded strictly by
  ADVENT's evaluation (``conv1.weight``, ``bn1.running_var``, ``layer3.0.downsample.1.bias``,
  ``layer5.conv2d_list.0.weight`` (auxiliary, multi-level), ``layer6.conv2d_list.3.bias``
  (main)...) -> :func:`convert_advent`;
* the ImageNet initialisation ``DeepLab_resnet_pretrained_imagenet.pth``: the same
  backbone keys under a first component (``Scale.``) that ADVENT's train.py drops, along
  with that file's own ``layer5`` classifier -> :func:`convert_advent_imagenet` (no
  classifier variables: they stay randomly initialised, as in ADVENT);
* a discriminator snapshot ``model_{i}_D_main.pth`` / ``_D_aux.pth``: an ``nn.Sequential``
  (``0.weight`` ... ``8.bias``) -> :func:`convert_discriminator`, which also reads
  AdaptSegNet's named layout (``conv1.weight`` ... ``classifier.bias``).

MTAF (valeoai/MTAF) saves ``model.state_dict()`` the same way: its baseline and MDis
networks are ADVENT's (7 classes); MTKT's ``ResNetMultiMTKT`` replaces ``layer5``/``layer6``
by classifier lists, ``aux_classifier_list.{i}.conv2d_list.{j}.*`` (multi-level only) and
``main_classifier_list.{i}.*``, one entry per head, 0 the student its evaluation reads. Our
``layer5/head_{i}`` and ``layer6/head_{i}`` (:func:`mtkt_torch_name`); :func:`configure`
reads the layout, the head count and the class count off the keys.

A ``module.`` prefix on every key (a ``DataParallel`` state dict) is dropped. BatchNorm's
``num_batches_tracked`` carries nothing the model uses. Our module names are the torch ones
with ``.`` written as ``_`` before an index, so the map is a rename plus the layout
transform of each leaf kind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from ddb_jax import models
from ddb_jax.convert.common import (
    ConversionError,
    TorchSource,
    conv_kernel,
    convert_to_shapes,
    identity,
    strip_data_parallel,
)
from ddb_jax.models.advent_deeplabv2 import CLASSIFIER_MODULES, AdventDeepLabV2
from ddb_jax.models.discriminator import LAYER_NAMES, FCDiscriminator

# (collection, flax leaf) -> (torch leaf, transform).
LEAVES = {
    ("params", "kernel"): ("weight", conv_kernel),
    ("params", "bias"): ("bias", identity),
    ("params", "scale"): ("weight", identity),
    ("batch_stats", "mean"): ("running_mean", identity),
    ("batch_stats", "var"): ("running_var", identity),
}
MODULE_PATTERN = re.compile(
    r"conv1|bn1|layer[1-4]_\d+/(conv[1-3]|bn[1-3]|downsample_[01])|layer[56]/conv2d_list_\d+"
)
# MTKT's classifier lists (ResNetMultiMTKT) in place of ADVENT's layer5 / layer6.
HEAD_LISTS = {"layer5": "aux_classifier_list", "layer6": "main_classifier_list"}
_MAIN_HEAD = re.compile(r"main_classifier_list\.(\d+)\.")
# Our discriminator layer -> the index of its conv in ADVENT's nn.Sequential.
SEQUENTIAL_INDEX = {name: str(2 * i) for i, name in enumerate(LAYER_NAMES)}


def _torch_module(name: str) -> str:
    """'layer3_12' -> 'layer3.12', 'conv2d_list_0' -> 'conv2d_list.0'; 'bn1' stays."""
    return re.sub(r"_(\d+)$", r".\1", name)


def torch_name(path: tuple[str, ...]) -> TorchSource:
    """Maps ('params'|'batch_stats', *modules, leaf) of AdventDeepLabV2 to its torch tensor."""
    collection, *modules, leaf = path
    if (collection, leaf) not in LEAVES or not MODULE_PATTERN.fullmatch("/".join(modules)):
        raise ConversionError(f"no ADVENT DeepLabV2 tensor for Flax variable {'/'.join(path)}")
    torch_leaf, transform = LEAVES[(collection, leaf)]
    return TorchSource(".".join([*map(_torch_module, modules), torch_leaf]), transform)


def mtkt_torch_name(path: tuple[str, ...]) -> TorchSource:
    """:func:`torch_name`, and for a multi-head model ``layer5/head_{i}`` / ``layer6/head_{i}``
    -> MTKT's ``aux_classifier_list.{i}`` / ``main_classifier_list.{i}`` (a one-head model
    keeps ADVENT's names)."""
    collection, *modules, leaf = path
    if len(modules) == 3 and modules[0] in HEAD_LISTS and re.fullmatch(r"head_\d+", modules[1]):
        inner = torch_name((collection, "layer6", modules[2], leaf))
        head = modules[1].removeprefix("head_")
        key = inner.key.replace("layer6.", f"{HEAD_LISTS[modules[0]]}.{head}.", 1)
        return TorchSource(key, inner.transform)
    return torch_name(path)


def head_count(state_dict: Mapping[str, np.ndarray]) -> int:
    """Classifier pairs of a trained network: MTKT's ``main_classifier_list`` entries, 1 for
    ADVENT's ``layer6``, 0 for neither (the ImageNet initialisation)."""
    heads = {m.group(1) for key in state_dict if (m := _MAIN_HEAD.match(key))}
    if heads:
        return len(heads)
    return int(any(key.startswith("layer6.") for key in state_dict))


def configure(
    state_dict: Mapping[str, np.ndarray], model_cfg: ml_collections.ConfigDict, source: str
) -> bool:
    """Sets in ``model_cfg`` (a copy) what a trained network's keys fix: ``advent_heads``
    (MTKT's head count, else 1) and ``advent_multi_level`` (an auxiliary classifier present).

    A config's ``advent_heads`` of 1 (the default) takes the file's; any other value must be
    it, and ``num_classes`` the classifiers' outputs: a one-line error otherwise, before any
    tensor is compared. Returns False, changing nothing, for the ImageNet initialisation.
    """
    heads = head_count(state_dict)
    if heads == 0:
        return False
    multi_head = any(_MAIN_HEAD.match(key) for key in state_dict)
    wanted = int(model_cfg.get("advent_heads", 1))
    if wanted not in (1, heads):
        layout = f"MTKT's {heads} classifier pairs" if multi_head else "ADVENT's one classifier"
        raise ConversionError(
            f"{source} holds {layout}; the config says config.model.advent_heads={wanted}"
        )
    main = f"{HEAD_LISTS['layer6']}.0" if multi_head else "layer6"
    bias = f"{main}.conv2d_list.0.bias"
    classes = int(np.shape(state_dict[bias])[0]) if bias in state_dict else model_cfg.num_classes
    if classes != model_cfg.num_classes:
        raise ConversionError(
            f"{source}: {bias} has {classes} classes, the config (config.model.num_classes, "
            f"--num-classes) says {model_cfg.num_classes}"
        )
    aux = HEAD_LISTS["layer5"] if multi_head else "layer5"
    model_cfg.advent_heads = heads
    model_cfg.advent_multi_level = any(key.startswith(f"{aux}.") for key in state_dict)
    return True


def discriminator_torch_name(path: tuple[str, ...], layout: str = "sequential") -> TorchSource:
    """Maps ('params', 'conv1'..'classifier', 'kernel'|'bias') to ADVENT's ``nn.Sequential``
    key (``layout='sequential'``) or AdaptSegNet's named one (``'named'``)."""
    if len(path) != 3 or path[0] != "params" or path[1] not in LAYER_NAMES:
        raise ConversionError(f"no discriminator tensor for Flax variable {'/'.join(path)}")
    torch_leaf, transform = LEAVES[("params", path[2])]
    module = SEQUENTIAL_INDEX[path[1]] if layout == "sequential" else path[1]
    return TorchSource(f"{module}.{torch_leaf}", transform)


def convert_advent(
    state_dict: Mapping[str, np.ndarray],
    model: AdventDeepLabV2 | None = None,
    *,
    dtype=np.float32,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """A trained ADVENT DeepLabV2 state dict (or MTAF's, MTKT's multi-head one included) ->
    ``{"params", "batch_stats"}`` of ``model``.

    Args:
      state_dict: torch key -> numpy array (``module.`` prefixes allowed).
      model: the Flax model to fill; default the reference's, ``AdventDeepLabV2(19)``
        (ResNet-101, multi-level). A single-level checkpoint needs ``multi_level=False``,
        an MTKT one ``num_heads`` = its heads (:func:`configure` reads both off the keys).
      dtype: the dtype of every returned leaf (float64 for the parity tests).
      source: the file name, for error messages.

    Raises:
      ConversionError: naming every missing and unexpected key and every shape conflict.
    """
    model = AdventDeepLabV2(num_classes=19) if model is None else model
    return convert_to_shapes(state_dict, models.variable_shapes(model), mtkt_torch_name,
                             dtype=dtype, source=source)  # fmt: skip


def convert_advent_imagenet(
    state_dict: Mapping[str, np.ndarray],
    model: AdventDeepLabV2 | None = None,
    *,
    dtype=np.float32,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """ADVENT's ImageNet initialisation -> the backbone variables of ``model`` (no layer5 or
    layer6), read as ADVENT's train.py reads it: the first key component (``Scale``)
    dropped, the file's own ``layer5`` classifier ignored."""
    model = AdventDeepLabV2(num_classes=19) if model is None else model
    state = {}
    for key, value in strip_data_parallel(state_dict).items():
        parts = key.split(".")
        if len(parts) < 2:
            raise ConversionError(f"{source}: key {key!r} has no prefix component to drop")
        if parts[1] != "layer5":
            state[".".join(parts[1:])] = value
    return convert_to_shapes(state, models.variable_shapes(model), torch_name, dtype=dtype,
                             without=CLASSIFIER_MODULES, source=source)  # fmt: skip


def convert_discriminator(
    state_dict: Mapping[str, np.ndarray],
    model: FCDiscriminator | None = None,
    *,
    num_classes: int = 19,
    dtype=np.float32,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """An ADVENT (or AdaptSegNet) discriminator state dict -> ``{"params"}`` of ``model``.

    ``num_classes``: the discriminator's input channels (the segmentation classes); the
    default model is the reference's, ``FCDiscriminator(ndf=64)``.
    """
    model = FCDiscriminator() if model is None else model
    state = strip_data_parallel(state_dict)
    layout = "named" if any(k.startswith(f"{LAYER_NAMES[0]}.") for k in state) else "sequential"
    inputs = jax.ShapeDtypeStruct((1, 64, 64, num_classes), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), inputs)
    return convert_to_shapes(state, shapes, lambda path: discriminator_torch_name(path, layout),
                             dtype=dtype, source=source)  # fmt: skip
