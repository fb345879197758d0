"""DDB's training methods behind one protocol (:mod:`ddb_jax.methods.base`).

``config.stage`` names the method: 'self_training' (one bridging path), 'ckd' (cross-path
distillation) or 'supervised' (source-only and oracle rows). :func:`create` builds it for
a student model; :func:`load_frozen` reads what it needs besides the student (CKD's
teachers), checking every input before anything long runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from ddb_jax import models
from ddb_jax.methods import ckd, self_training, supervised, teachers
from ddb_jax.methods.base import Method

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


def check_config(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of the method's own settings and input files."""
    if config.stage == "ckd":
        teachers.check_config(config)


def load_frozen(config: ml_collections.ConfigDict) -> Any:
    """What the method reads but does not train, as host arrays (None if nothing)."""
    if config.stage == "ckd":
        return teachers.load_teachers(config)
    return None
