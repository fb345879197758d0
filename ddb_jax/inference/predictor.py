"""The model of a run and its jitted inference: the evaluate stage's, argmax to train ids.

A model directory or a PyTorch ``.pth`` (converted in memory) becomes a :class:`Predictor`:
:func:`ddb_jax.evaluation.evaluate.predict_probabilities` (whole / slide / flip, the
settings of ``config.eval``) gives the class probabilities at the requested size (the image's
own: the eval stage's label size), and the argmax is the prediction. One place for this so
that the tool, the demo's pictures and the tests predict as the evaluate stage does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddb_jax import checkpoints, models, paths
from ddb_jax.evaluation import evaluate
from ddb_jax.inference.errors import InputError

PTH_EXTENSIONS = (".pth", ".pt")


def load_model(
    source: str,
    pth_model_cfg: ml_collections.ConfigDict | None = None,
    which: str | None = None,
    allow_pickle: bool = False,
    dtype: str = "float32",
) -> tuple[dict[str, Any], ml_collections.ConfigDict, str]:
    """(variables, model config, description) of a model directory or a PyTorch ``.pth``.

    A ``.pth`` (DDB: ``--which`` picks its model; mmseg) is converted in memory as
    ``tools/convert_checkpoint.py`` would (``pth_model_cfg`` gives the architecture it
    cannot tell: backbone, head, class count); nothing is written.
    """
    if paths.isdir(source):
        variables, model_cfg = checkpoints.load_model_dir(source)
        origin = f"model directory {source}"
    elif source.lower().endswith(PTH_EXTENSIONS) and paths.isfile(source):
        from ddb_jax.convert import convert_torch_checkpoint

        if pth_model_cfg is None:
            raise InputError(f"{source}: a .pth needs the model's architecture")
        local = paths.local_copy(source)
        try:
            models.build_model(pth_model_cfg)  # a bad --backbone/--head fails before reading
            variables, model_cfg, provenance = convert_torch_checkpoint(
                local, pth_model_cfg, which=which, allow_pickle=allow_pickle
            )
        finally:
            if local != source:
                os.remove(local)
        origin = f"{source} (model {provenance['prefix'] or 'unprefixed'}, converted in memory)"
    else:
        raise InputError(f"{source}: neither a model directory nor a .pth file")
    is_backbone = models.backbone_predicate(models.build_model(model_cfg))
    if all(is_backbone(name) for name in variables.get("params", {})):
        raise checkpoints.CheckpointError(
            f"{source} holds only a backbone (an ImageNet file?); it cannot predict"
        )
    if model_cfg.num_classes > 255:
        raise checkpoints.CheckpointError(f"{source}: {model_cfg.num_classes} classes > 255")
    model_cfg.dtype = dtype
    description = (
        f"{model_cfg.backbone}+{model_cfg.head}, {model_cfg.num_classes} classes, from {origin}"
    )
    return variables, model_cfg, description


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "out_size", "mode", "crop", "stride", "flip")
)
def predict_train_ids(
    variables, images, *, apply_fn, out_size, mode, crop, stride, flip
) -> jax.Array:
    """(n, H, W) uint8 train ids at ``out_size`` of a batch of normalised images."""
    logits_fn = lambda x: apply_fn(variables, x, train=False)["logits"]
    probs = evaluate.predict_probabilities(logits_fn, images, out_size, mode, crop, stride, flip)
    return jnp.argmax(probs, axis=-1).astype(jnp.uint8)


@dataclasses.dataclass
class Predictor:
    """A model and the evaluate stage's inference settings (``config.eval``)."""

    apply_fn: Callable
    variables: Any
    mode: str = "whole"
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    flip: bool = False

    @classmethod
    def from_model(cls, variables, model_cfg: ml_collections.ConfigDict, **settings) -> Predictor:
        if settings.get("mode", "whole") not in evaluate.EVAL_MODES:
            raise InputError(f"--mode={settings['mode']!r}; use one of {list(evaluate.EVAL_MODES)}")
        apply_fn = models.build_model(model_cfg).apply
        return cls(apply_fn, jax.device_put(variables), **settings)

    def __call__(self, images: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        """(n, H, W) uint8 train ids of (n, h, w, 3) normalised images, at ``out_size``."""
        ids = predict_train_ids(
            self.variables, images, apply_fn=self.apply_fn, out_size=tuple(out_size),
            mode=self.mode, crop=tuple(self.crop), stride=tuple(self.stride), flip=self.flip,
        )  # fmt: skip
        return np.asarray(ids)
