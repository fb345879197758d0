"""Training methods behind one protocol (:mod:`ddb_jax.methods.base`), by name.

Every module of this package is imported here, and each method module declares itself in
:mod:`ddb_jax.methods.registry` (its stage kinds: 'supervised', 'self_training', 'ckd',
'advent', ...), so adding a method is one module: no table or condition to extend
elsewhere. :func:`create` builds the method ``config.stage`` names for a segmentor;
:func:`check_config` and :func:`load_frozen` check and read what it needs besides the
segmentor before anything long runs. Self-training's optional terms register themselves
the same way (``feature_distance``: ``config.fdist``; ``mic``: ``config.mic``).

The methods sit below the training loop: nothing here imports ``ddb_jax.train``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

import ml_collections

from ddb_jax import models
from ddb_jax.methods import registry
from ddb_jax.methods.base import Method
from ddb_jax.methods.registry import MethodConfigError, UnknownMethodError
from ddb_jax.models import batch_norm

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Method", "MethodConfigError", "UnknownMethodError", "create", "check_config", "is_training",
    "kinds", "load_frozen", "frozen_shapes",
]  # fmt: skip


def kinds() -> tuple[str, ...]:
    """The stage kinds that train with a method."""
    return registry.kinds()


def is_training(stage: str) -> bool:
    return stage in registry.kinds()


def create(config: ml_collections.ConfigDict, student_apply: Callable) -> Method:
    """The method ``config.stage`` names, training a segmentor with ``student_apply``, whose
    BatchNorm layers reduce their batch statistics as ``config.model.bn_statistics`` says
    (the teachers a method builds run on their running statistics)."""
    statistics = config.model.get("bn_statistics", "two_pass")
    student_apply = batch_norm.with_batch_statistics(student_apply, statistics)
    return registry.spec_for(config.stage).create(config, student_apply, models.build_model)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of the method's own settings and input files."""
    registry.spec_for(config.stage).check(config)


def load_frozen(config: ml_collections.ConfigDict) -> Any:
    """What the method reads but does not train, as host arrays (None if nothing)."""
    return registry.spec_for(config.stage).load_frozen(config)


def frozen_shapes(config: ml_collections.ConfigDict) -> Any:
    """What :func:`load_frozen` returns as ``jax.ShapeDtypeStruct`` leaves (None if nothing),
    for compiling the step without its teachers' or ImageNet files: the method's settings
    are checked; files are read only by a method that declares no shapes of its own."""
    spec = registry.spec_for(config.stage)
    if spec.frozen_shapes is not None:
        return spec.frozen_shapes(config)
    spec.check(config)
    return registry.shapes_of(spec.load_frozen(config))
