"""Compiles a stage's train step (or its evaluation) for a named target, from any machine:
memory per device.

  python tools/aot_check.py --config=configs/gta2cs.py:r1_cu --target=v5e-8
  python tools/aot_check.py --config=configs/gta2cs.py:r1_cu --target=v5e-8 \
      --config.model.dtype=bfloat16 --config.batch_size=8 --out report.json
  python tools/aot_check.py --config=configs/gta2cs.py:r1_cu --target=v5e-8 \
      --program=eval --eval_image=512,1024 --eval_label=1024,2048

The step is the training loop's (:mod:`ddb_jax.runtime.aot`): the stage's method, optimisers,
mesh over the target's devices, shardings and donated state, lowered from abstract arrays
and compiled by the target's compiler; nothing of full size is allocated and no accelerator
is needed (TPU targets need libtpu: make venv EXTRAS=test,aot; NVIDIA targets the CUDA
plugin: EXTRAS=test,aot,aot-gpu). Prints a markdown table
(memory per device against the device's, FLOPs, bytes, roofline bound, collectives,
transposes and copies, compile time); ``--out`` writes the report as JSON. ``--program=eval``
compiles the evaluation of one image (:mod:`ddb_jax.runtime.aot_programs`: the config's
``eval`` mode, windows and flip) on one device of the target instead; ``--program=prototypes``
the prototype pass's update of one batch (``prototypes.batch_size`` crops).
``--target=local`` compiles for this machine's own devices (a TPU VM's chips, a GPU host's
cards) and ``--measure=N`` then runs the compiled step N times (random state and batch,
:mod:`ddb_jax.runtime.aot_measure`) and sets its time and peak memory beside the estimate.
``--search_batch=N`` finds the largest train batch per device (up to N) that fits the target
(:mod:`ddb_jax.runtime.aot_search`: doubling, then bisection, each a compile). Any config key
can be overridden (``--config.batch_size=8``). What a stage reads but never trains (CKD's two
teachers and prototype tables, DAFormer's ImageNet backbone) enters as shapes from the config:
no exported model or prototype file is needed. Targets: ``--target=list`` prints them.
An unknown target, a missing compiler or a config mistake is one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import sys

_LOCAL = "--target=local" in sys.argv or "--target local" in " ".join(sys.argv)
if not _LOCAL:  # the compilers need no device (set before jax); 'local' runs on this machine's
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddb_jax import config_checks, errors  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file under configs/ (FILE or FILE:ARG).")
flags.DEFINE_string("target", "v5e-8", "A target of ddb_jax.runtime.aot.TARGETS, or 'list'.")
flags.DEFINE_string("out", None, "Write the report as JSON here.")
flags.DEFINE_enum(
    "program", "train", ["train", "eval", "prototypes"],
    "The train step, the evaluation of one image, or the prototype pass's update.",
)  # fmt: skip
flags.DEFINE_string("eval_image", "512,1024", "--program=eval: the image's H,W after resizing.")
flags.DEFINE_string("eval_label", "1024,2048", "--program=eval: the label's H,W.")
flags.DEFINE_integer(
    "search_batch", 0,
    "--program=train: also find the largest batch per device that fits, up to this many "
    "(compiles about 2 log2(N) times); 0: compile the config's batch only.",
)  # fmt: skip
flags.DEFINE_bool(
    "compiler_state_layouts", False,
    "--program=train: the train state in the layouts the compiler picks (on a GPU, no "
    "per-step transposes of the conv kernels to cuDNN's layout), as the loop trains with "
    "--config.state_layouts=compiler; default: the config's state_layouts.",
)  # fmt: skip
flags.DEFINE_integer(
    "measure", 0,
    "--target=local --program=train: also run the compiled step this many times on this "
    "machine's devices (random state and batch) and set the time and peak memory beside "
    "the estimate.",
)  # fmt: skip
flags.DEFINE_string(
    "hlo_out", None, "--program=train: also write the compiled program's HLO text here."
)
flags.DEFINE_bool("traceback", False, "On an error, print the traceback, not just one line.")


def size_flag(name: str) -> tuple[int, int]:
    """``--NAME=H,W`` as two positive ints, or a one-line error naming the flag."""
    from ddb_jax.runtime import aot

    parts = FLAGS[name].value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise aot.AotError(f"--{name}={FLAGS[name].value!r}: expected H,W (two positive ints)")
    return int(parts[0]), int(parts[1])


def main(argv: list[str]) -> None:
    from ddb_jax.runtime import aot, aot_figures

    if len(argv) > 1:
        raise aot.AotError(f"unexpected arguments: {argv[1:]} (flags are --name=value)")
    if FLAGS.target == "list":
        for name in aot.target_names():
            t = aot.TARGETS[name]
            memory = t.memory_bytes / aot.GIB
            print(f"{name}: {t.topology}, {t.devices} x {t.device}, {memory:g} GiB each")
        return
    aot.get_target(FLAGS.target)  # an unknown target fails before the config is read
    if FLAGS.search_batch < 0 or (FLAGS.search_batch and FLAGS.program != "train"):
        raise aot.AotError(
            f"--search_batch={FLAGS.search_batch}: expected 0, or a positive limit with "
            "--program=train"
        )
    if FLAGS.compiler_state_layouts and (FLAGS.program != "train" or FLAGS.search_batch):
        raise aot.AotError("--compiler_state_layouts: only with --program=train, no search")
    if FLAGS.measure < 0 or (
        FLAGS.measure and (FLAGS.target != aot.LOCAL or FLAGS.program != "train"
                           or FLAGS.search_batch)
    ):  # fmt: skip
        raise aot.AotError(
            f"--measure={FLAGS.measure}: expected 0, or a positive count with "
            "--target=local --program=train and no --search_batch"
        )
    if FLAGS.config is None:
        raise aot.AotError("--config is required (e.g. --config=configs/gta2cs.py:r1_cu)")
    config = FLAGS.config
    config_checks.check_config(config)
    if FLAGS.program == "eval":
        from ddb_jax.runtime import aot_programs

        image, label = (size_flag(name) for name in ("eval_image", "eval_label"))
        report = aot_figures.numpy_free(
            aot_programs.compile_evaluation(config, FLAGS.target, image, label)
        )
        print(aot_programs.markdown(report))
    elif FLAGS.program == "prototypes":
        from ddb_jax.runtime import aot_programs

        report = aot_figures.numpy_free(aot_programs.compile_prototypes(config, FLAGS.target))
        print(aot_programs.prototypes_markdown(report))
    elif FLAGS.search_batch:
        from ddb_jax.runtime import aot_search

        report = aot_figures.numpy_free(
            aot_search.largest_batch(config, FLAGS.target, FLAGS.search_batch)
        )
        if report["report"] is not None:
            print(aot_figures.markdown(report["report"]))
        print(aot_figures.table(aot_search.markdown_rows(report)))
    elif FLAGS.measure:
        from ddb_jax.runtime import aot_measure

        report = aot_figures.numpy_free(aot_measure.measure(config, FLAGS.measure))
        print(
            aot_figures.table(aot_figures.markdown_rows(report) + aot_measure.markdown_rows(report))
        )
    else:
        report = aot.compile_stage(
            config, FLAGS.target, compiler_state_layouts=FLAGS.compiler_state_layouts,
            keep_hlo=bool(FLAGS.hlo_out),
        )  # fmt: skip
        report = aot_figures.numpy_free(report)
        if FLAGS.hlo_out:
            with open(FLAGS.hlo_out, "w") as f:
                f.write(report.pop("hlo_text"))
        print(aot_figures.markdown(report))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {FLAGS.out}")


parse_flags, run_main = errors.command_line(FLAGS, main)


if __name__ == "__main__":
    app.run(run_main, flags_parser=parse_flags)
