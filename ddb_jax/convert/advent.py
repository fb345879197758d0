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
    """A trained ADVENT DeepLabV2 state dict -> ``{"params", "batch_stats"}`` of ``model``.

    Args:
      state_dict: torch key -> numpy array (``module.`` prefixes allowed).
      model: the Flax model to fill; default the reference's, ``AdventDeepLabV2(19)``
        (ResNet-101, multi-level). A single-level checkpoint needs ``multi_level=False``.
      dtype: the dtype of every returned leaf (float64 for the parity tests).
      source: the file name, for error messages.

    Raises:
      ConversionError: naming every missing and unexpected key and every shape conflict.
    """
    model = AdventDeepLabV2(num_classes=19) if model is None else model
    return convert_to_shapes(state_dict, models.variable_shapes(model), torch_name,
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
