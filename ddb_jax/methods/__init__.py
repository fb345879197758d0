"""DDB's training methods behind one protocol (:mod:`ddb_jax.methods.base`).

``config.stage`` names the method: 'self_training' (one bridging path), 'ckd' (cross-path
distillation) or 'supervised' (source-only and oracle rows). :func:`create` builds it for
a student model; :func:`load_frozen` reads what it needs besides the student (CKD's
teachers, the frozen ImageNet backbone of DAFormer's feature distance), checking every
input before anything long runs. Importing the package registers self-training's optional
terms (``feature_distance``: ``config.fdist``; ``mic``: ``config.mic``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from ddb_jax import bridging, errors, models
from ddb_jax.methods import ckd, feature_distance, mic, self_training, supervised, teachers
from ddb_jax.methods.base import Method

# Modules whose import registers a self-training term (self_training.register_term).
OPTIONAL_TERM_MODULES = (feature_distance, mic)

_CREATE: dict[str, Callable] = {
    "self_training": self_training.create,
    "ckd": ckd.create,
    "supervised": supervised.create,
}
KINDS = tuple(_CREATE)


def create(config: ml_collections.ConfigDict, student_apply: Callable) -> Method:
    """The method ``config.stage`` names, training a student with ``student_apply``."""
    if config.stage not in _CREATE:
        raise ValueError(f"config.stage={config.stage!r} is not a training method: {KINDS}")
    return _CREATE[config.stage](config, student_apply, models.build_model)


class MethodConfigError(errors.UsageError, ValueError):
    """A setting of the bridging that does not exist."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of the method's own settings and input files."""
    if config.stage in ("self_training", "ckd") and config.st.mask not in bridging.MASK_MODES:
        raise MethodConfigError(
            f"config.st.mask={config.st.mask!r}; use one of {list(bridging.MASK_MODES)}"
        )
    if config.stage == "ckd":
        teachers.check_config(config)
    if config.stage == "self_training":
        self_training.check_config(config)


def load_frozen(config: ml_collections.ConfigDict) -> Any:
    """What the method reads but does not train, as host arrays (None if nothing)."""
    if config.stage == "ckd":
        return teachers.load_teachers(config)
    if config.stage == "self_training":
        return self_training.load_frozen(config)
    return None
