"""Entry point: ``python -m ddb_jax.main --config=configs/<stage>.py --workdir=DIR``.

``config.stage`` picks what runs: one self-training path, prototypes, cross-path
distillation, evaluation of a model, or the whole DDB pipeline. Any config key
can be overridden on the command line (``--config.batch_size=2``); a key that
does not exist fails with its name before anything runs.
"""

from __future__ import annotations

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from ddb_jax import models

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results of this run.")
config_flags.DEFINE_config_file("config", None, "A stage config file under configs/.")
flags.mark_flags_as_required(["config", "workdir"])

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


def validate(config) -> None:
    """Checks that fail fast, before any data is read or any model is compiled."""
    models.build_model(config.model)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    try:
        validate(config)
        run = resolve_stage(config.stage)
    except (models.ModelConfigError, StageNotAvailable) as err:
        raise app.UsageError(str(err)) from err
    logging.info("stage %s, workdir %s", config.stage, FLAGS.workdir)
    run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
