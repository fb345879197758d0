"""Stage name -> the function that runs it, imported only when it runs.

Kept apart from ``main`` so the pipeline can dispatch stages without importing the
absl entry point (which defines the command-line flags).
"""

from __future__ import annotations

import importlib

from absl import app

# stage name -> "module:function(config, workdir)"
STAGES = {
    "self_training": "ddb_jax.train.self_training:train_and_evaluate",
    "supervised": "ddb_jax.train.supervised:train_and_evaluate",
    "ckd": "ddb_jax.train.distillation:train_and_evaluate",
    "prototypes": "ddb_jax.prototype_stage:run",
    "evaluate": "ddb_jax.eval_stage:run",
    "pipeline": "ddb_jax.pipeline:run",
}


class StageNotAvailable(RuntimeError):
    """The config names a stage this build does not have yet."""


def resolve_stage(stage: str):
    """The function that runs ``stage``; a clear error for unknown or missing stages."""
    if stage not in STAGES:
        raise app.UsageError(f"config.stage={stage!r} is not a stage; known: {sorted(STAGES)}")
    module_name, function_name = STAGES[stage].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise StageNotAvailable(
            f"config.stage={stage!r} is not implemented in this version of ddb-jax "
            f"({module_name} does not exist yet); see the README's status section"
        ) from err
    return getattr(module, function_name)
