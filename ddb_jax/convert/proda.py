"""ProDA's PyTorch checkpoints (microsoft/ProDA) -> Flax variables, every tensor accounted for.

Two kinds of file:

* a trained network (the released warm-up, stage 1, 2 and 3 models, every
  ``*_best_model.pkl`` / ``*_current_model.pkl``): train.py saves ``{net class name:
  {'model_state': state_dict, 'objective_vectors': ...}, 'iter', 'best_iou'}``, so the
  segmentor is ``checkpoint['ResNet101']['model_state']`` (a warm-up file also holds the
  discriminator under ``'FCDiscriminator'``, ignored here). Keys: ``conv1.weight``,
  ``layer3.0.downsample.1.running_var``, ``bn_pretrain.*`` (stages 2 and 3, ``--bn_clr``),
  ``layer5.conv2d_list.1.0.weight`` (branch conv), ``layer5.conv2d_list.1.1.bias``
  (its GroupNorm), ``layer5.bottleneck.0.se.2.weight`` (SE Linear), ``layer5.bottleneck.1``
  (3x3 conv), ``layer5.bottleneck.2`` (GroupNorm), ``layer5.head.1.weight`` (classifier)
  -> :func:`convert_proda`;
* an initialisation of the backbone, read as ``Deeplab()`` reads it: torchvision's
  ImageNet ``resnet101-5d3b4d8f.pth`` (a plain state dict with ``fc.*``) or the SimCLR
  file (``{'state_dict': ...}``) -> :func:`convert_proda_backbone`: conv1, bn1 and
  layer1..4 only. The reference takes whatever keys match and silently keeps the rest
  random; here every backbone tensor must be there and only ``fc.*`` may be left over.

:func:`proda_state_dict` unwraps either layout (or a plain state dict); a ``module.``
prefix on every key (DataParallel) is dropped; BatchNorm's ``num_batches_tracked`` is
unused. Our module names are the torch ones with ``.`` written as ``_`` before an index.
The released files also pickle numpy scalars (``best_iou``): reading them needs
``--allow-pickle``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ddb_jax import models
from ddb_jax.convert.common import (
    ConversionError,
    TorchSource,
    conv_kernel,
    convert_to_shapes,
    identity,
    linear_kernel,
    strip_data_parallel,
)
from ddb_jax.models.proda_deeplabv2 import CLASSIFIER_MODULES, ProdaDeepLabV2

# train.py's wrapper: the network's class name, then its 'model_state'.
NETWORK_KEY, MODEL_STATE_KEY = "ResNet101", "model_state"
# torchvision's ImageNet classifier: in the file, not in the model.
IMAGENET_CLASSIFIER = ("fc.weight", "fc.bias")

MODULE_PATTERN = re.compile(
    r"conv1|bn1|bn_pretrain|layer[1-4]_\d+/(conv[1-3]|bn[1-3]|downsample_[01])"
    r"|layer5/(conv2d_list_\d+_[01]|bottleneck_0/se_[02]|bottleneck_[12]|head_1)"
)
# (collection, flax leaf) -> torch leaf.
LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_name(path: tuple[str, ...]) -> TorchSource:
    """Maps ('params'|'batch_stats', *modules, leaf) of ProdaDeepLabV2 to its torch tensor."""
    collection, *modules, leaf = path
    module = "/".join(modules)
    if (collection, leaf) not in LEAVES or not MODULE_PATTERN.fullmatch(module):
        raise ConversionError(f"no ProDA DeepLabV2 tensor for Flax variable {'/'.join(path)}")
    transform = identity
    if leaf == "kernel":
        transform = linear_kernel if "/se_" in module else conv_kernel
    torch_modules = [re.sub(r"_(\d+)", r".\1", m) for m in modules]
    return TorchSource(".".join([*torch_modules, LEAVES[(collection, leaf)]]), transform)


def proda_state_dict(checkpoint: Mapping, source: str = "checkpoint") -> tuple[str, Mapping]:
    """(where it was, the state dict) of a loaded ProDA file: ``[ResNet101][model_state]``,
    ``[model_state]``, ``[state_dict]`` or the file itself when it is a state dict."""
    for where in ((NETWORK_KEY, MODEL_STATE_KEY), (MODEL_STATE_KEY,), ("state_dict",)):
        node = checkpoint
        for key in where:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            return ".".join(where), node
    if any(isinstance(v, Mapping) for v in checkpoint.values()):
        raise ConversionError(
            f"{source}: no ProDA network in it (expected ['ResNet101']['model_state'] or a "
            f"state dict); it holds {sorted(checkpoint)[:10]}"
        )
    return "", checkpoint


def convert_proda(
    state_dict: Mapping[str, np.ndarray],
    model: ProdaDeepLabV2 | None = None,
    *,
    dtype=np.float32,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """A trained ProDA DeepLabV2 state dict -> ``{"params", "batch_stats"}`` of ``model``.

    Args:
      state_dict: torch key -> numpy array (``module.`` prefixes allowed).
      model: the Flax model to fill; default the reference's, ``ProdaDeepLabV2(19)``. A
        stage 2/3 checkpoint (``bn_pretrain.*`` keys) needs ``bn_clr=True``.
      dtype: the dtype of every returned leaf (float64 for the parity tests).
      source: the file name, for error messages.

    Raises:
      ConversionError: naming every missing and unexpected key and every shape conflict.
    """
    model = ProdaDeepLabV2(num_classes=19) if model is None else model
    return convert_to_shapes(state_dict, models.variable_shapes(model), torch_name,
                             dtype=dtype, source=source)  # fmt: skip


def convert_proda_backbone(
    state_dict: Mapping[str, np.ndarray],
    model: ProdaDeepLabV2 | None = None,
    *,
    dtype=np.float32,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """An ImageNet (torchvision) or SimCLR ResNet-101 -> the backbone variables of ``model``
    (conv1, bn1, layer1..4): layer5 and bn_pretrain stay randomly initialised, as in the
    reference; the file's ``fc`` is ignored."""
    model = ProdaDeepLabV2(num_classes=19) if model is None else model
    return convert_to_shapes(
        state_dict, models.variable_shapes(model), torch_name, dtype=dtype,
        without=CLASSIFIER_MODULES, ignore_keys=IMAGENET_CLASSIFIER, source=source,
    )  # fmt: skip


def is_trained_network(state_dict: Mapping[str, np.ndarray]) -> bool:
    """A whole network (it has ProDA's head, ``layer5.*``) rather than a backbone file."""
    return any(key.startswith("layer5.") for key in strip_data_parallel(state_dict))


def has_bn_clr(state_dict: Mapping[str, np.ndarray]) -> bool:
    """Whether the network has ``bn_pretrain`` (trained with ``--bn_clr``)."""
    return any(key.startswith("bn_pretrain.") for key in strip_data_parallel(state_dict))
