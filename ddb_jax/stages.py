"""Stage name -> the function that runs it, imported only when it runs.

Kept apart from ``main`` so the pipeline can dispatch stages without importing the
absl entry point (which defines the command-line flags).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ddb_jax import errors

# stage name -> "module:function(config, workdir)"; every training method's kinds (declared
# in ddb_jax.methods.registry) run the training loop.
TRAIN = "ddb_jax.train.loop:train_and_evaluate"
STAGES = {
    "prototypes": "ddb_jax.offline.prototype_stage:run",
    "evaluate": "ddb_jax.evaluation.eval_stage:run",
    "proda_soft_labels": "ddb_jax.offline.proda_labels:run",
    "proda_pseudo_labels": "ddb_jax.offline.proda_labels:run",
    "daf_pseudo_labels": "ddb_jax.offline.daf_labels:run",
    "daf_rank": "ddb_jax.offline.daf_labels:run",
    "pipeline": "ddb_jax.pipeline.runner:run",
}


class UnknownStageError(errors.UsageError, ValueError):
    """config.stage names no stage."""


def known_stages() -> dict[str, str]:
    """Every stage kind -> "module:function": the training methods' and the others."""
    from ddb_jax import methods

    return {**{kind: TRAIN for kind in methods.kinds()}, **STAGES}


def resolve_stage(stage: str) -> Callable:
    """The function that runs ``stage`` (config, workdir)."""
    known = known_stages()
    if stage not in known:
        raise UnknownStageError(f"config.stage={stage!r} is not a stage; known: {sorted(known)}")
    module_name, function_name = known[stage].split(":")
    return getattr(importlib.import_module(module_name), function_name)
