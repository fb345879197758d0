"""Stage name -> the function that runs it, imported only when it runs.

Kept apart from ``main`` so the pipeline can dispatch stages without importing the
absl entry point (which defines the command-line flags).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ddb_jax import errors

# stage name -> "module:function(config, workdir)"
STAGES = {
    "self_training": "ddb_jax.train.loop:train_and_evaluate",
    "supervised": "ddb_jax.train.loop:train_and_evaluate",
    "ckd": "ddb_jax.train.loop:train_and_evaluate",
    "prototypes": "ddb_jax.prototype_stage:run",
    "evaluate": "ddb_jax.eval_stage:run",
    "pipeline": "ddb_jax.pipeline:run",
}


class UnknownStageError(errors.UsageError, ValueError):
    """config.stage names no stage."""


def resolve_stage(stage: str) -> Callable:
    """The function that runs ``stage`` (config, workdir)."""
    if stage not in STAGES:
        raise UnknownStageError(f"config.stage={stage!r} is not a stage; known: {sorted(STAGES)}")
    module_name, function_name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module_name), function_name)
