"""Entry point: ``python -m ddb_jax.main --config=configs/<stage>.py --workdir=DIR``.

``config.stage`` picks what runs: one self-training path, prototypes, cross-path
distillation, evaluation of a model, or the whole DDB pipeline. Any config key
can be overridden on the command line (``--config.batch_size=2``); a key that
does not exist fails with its name before anything runs.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from ddb_jax import distributed, models
from ddb_jax.stages import UnknownStageError, resolve_stage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results of this run.")
config_flags.DEFINE_config_file("config", None, "A stage config file under configs/.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-host (see ddb_jax/distributed.py and the README's 'Running at scale').
flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES),
    "auto: initialise jax.distributed when flags, JAX_COORDINATOR_ADDRESS or a cluster "
    "(SLURM, Open MPI, Cloud TPU) say there are several processes; on: always; off: never.",
)  # fmt: skip
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes to join.")


def validate(config) -> None:
    """Checks that fail fast, before any data is read or any model is compiled."""
    models.build_model(config.model)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        settings = distributed.resolve(
            FLAGS.distributed,
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.distributed_timeout,
        )
    except distributed.DistributedConfigError as err:
        raise app.UsageError(str(err)) from err
    distributed.initialize(settings)
    config = FLAGS.config
    try:
        validate(config)
        run = resolve_stage(config.stage)
    except (models.ModelConfigError, UnknownStageError) as err:
        raise app.UsageError(str(err)) from err
    logging.info("stage %s, workdir %s, %s", config.stage, FLAGS.workdir, distributed.describe())
    run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
