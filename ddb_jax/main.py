"""Entry point: ``python -m ddb_jax.main --config=configs/<setting>.py --workdir=DIR``.

``config.stage`` picks what runs: one self-training path, prototypes, cross-path
distillation, evaluation of a model, or the whole DDB pipeline. Any config key can be
overridden on the command line (``--config.batch_size=2``); a key that does not exist
fails with its name before anything runs. Every mistake a user can make ends in one line
``error: ...`` (exit status 2 for a setting, 1 for a file or a failed run; the traceback
with ``--traceback``): :mod:`ddb_jax.errors`.
"""

from __future__ import annotations

import re

from absl import app, flags, logging
from ml_collections import config_flags

from ddb_jax import config_checks, errors, models
from ddb_jax.runtime import distributed, peers, platforms
from ddb_jax.stages import resolve_stage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results of this run.")
config_flags.DEFINE_config_file("config", None, "A config file under configs/ (FILE or FILE:ARG).")
flags.mark_flags_as_required(["config", "workdir"])
flags.DEFINE_bool("traceback", False, "On an error, print the traceback, not just one line.")
# Multi-host (see ddb_jax/runtime/distributed.py and the README's 'Running at scale').
flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES),
    "auto: initialise jax.distributed when flags, JAX_COORDINATOR_ADDRESS or a cluster "
    "(SLURM, Open MPI, Cloud TPU) say there are several processes; on: always; off: never.",
)  # fmt: skip
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes to join.")


class FlagError(errors.UsageError):
    """A command-line flag or config override that cannot be used."""


def validate(config, workdir: str) -> None:
    """Checks that fail fast, before any data is read, any model is compiled or anything
    is written: every config value against its range (:mod:`ddb_jax.config_checks`), the
    model and the method's settings, then the workdir (created and written to, on trial)."""
    from ddb_jax import methods

    config_checks.check_config(config)
    models.build_model(config.model)
    if methods.is_training(config.stage):
        methods.check_config(config)
    config_checks.check_workdir(workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise FlagError(f"unexpected arguments: {argv[1:]} (flags are --name=value)")
    settings = distributed.resolve(
        FLAGS.distributed,
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        FLAGS.distributed_timeout,
    )
    distributed.initialize(settings)
    config = FLAGS.config
    validate(config, FLAGS.workdir)
    run = resolve_stage(config.stage)
    logging.info("stage %s, workdir %s", config.stage, FLAGS.workdir)
    logging.info("%s", platforms.describe())
    platforms.check_backend(config.get("allow_cpu", False))
    try:
        run(config, FLAGS.workdir)
    except Exception as err:  # a peer of a multi-process job gone: one line, no hang
        peers.end_if_lost(err, FLAGS.workdir, FLAGS.traceback)
        raise


def _flag_message(err: BaseException) -> str:
    """What went wrong in a flag or config override, on one line: a misspelt key with
    ml_collections' suggestion; a config file's failure by its last line, not its traceback."""
    text = str(err)
    missing = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    if isinstance(err, KeyError | AttributeError) and missing:
        return f"config key {missing.group(2)!r} does not exist; did you mean {missing.group(1)!r}?"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0].rstrip(':')}: {lines[-1]}"
    return errors.one_line(err)


# absl's parsing and the run, each error in one line (errors.command_line).
parse_flags, run_main = errors.command_line(FLAGS, main, _flag_message)


if __name__ == "__main__":
    app.run(run_main, flags_parser=parse_flags)
