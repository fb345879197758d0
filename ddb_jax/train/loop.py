"""Every training stage (the kinds of :mod:`ddb_jax.methods.registry`): train with its method.

The shape of the Flax ImageNet example's ``train_and_evaluate``: set up, restore the latest
checkpoint, then step, log, summarise, evaluate and checkpoint on their periods; a SIGTERM
saves the current step and stops cleanly (:mod:`ddb_jax.train.preemption`). Non-finite
losses stop the run before a checkpoint of bad parameters is written. What a method does
inside a step is :mod:`ddb_jax.methods`; the files of the workdir are
:mod:`ddb_jax.train.workdir`.

Each wait of the loop on a bucket (the next input batch, checkpoints, exports, the
summaries' copy, the input pipeline's shutdown) is bounded by the storage deadline
(:mod:`ddb_jax.runtime.deadline`): a lost bucket ends the run in one line, exit status 1.
A storage error raised in time ends the stage as any error does; the input pipeline is
then shut down under the deadline and, in the main thread, the process's exit is bounded
too (:func:`ddb_jax.runtime.deadline.bound_exit`: a teardown stuck on the storage is cut
short with status 1 after the error line).
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddb_jax import errors, methods, models, paths
from ddb_jax.methods import assemble, base
from ddb_jax.runtime import deadline, hosts
from ddb_jax.train import checkpointing, preemption, setup, state_layouts
from ddb_jax.train import workdir as workdir_lib
from ddb_jax.train.summaries import Summaries
from input_pipeline import datasets


class NonFiniteLossError(errors.InputError, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def write_metrics(writer, history: list[tuple[int, dict]]) -> None:
    """Checks every pending step's loss, then writes their mean; raises on a non-finite loss."""
    steps = [s for s, _ in history]
    values = jax.device_get([m for _, m in history])
    for step, metrics in zip(steps, values, strict=True):
        if not np.isfinite(metrics["loss"]):
            raise NonFiniteLossError(f"loss is {metrics['loss']} at step {step}")
    mean = {k: float(np.mean([m[k] for m in values])) for k in values[-1]}
    writer.write_scalars(steps[-1], mean)


# Config keys (and groups of keys) a training step's program does not depend on: file
# locations (a method's inputs arrive as arguments), what the data is called, periods of the
# loop, the seed (the state carries the key). Stages whose other keys are all equal share
# one traced and compiled step in a process (a pipeline's reruns, the seeds of a chain, a
# test session).
STEP_FREE_KEYS = frozenset({
    "data.root", "data.source", "data.target", "init_from", "checkpoint", "checkpoint_every",
    "keep_checkpoints", "log_every", "eval_every", "image_summary_every", "seed",
})  # fmt: skip
STEP_FREE_GROUPS = ("eval.", "prototypes.")  # every key under these
_STEPS: collections.OrderedDict = collections.OrderedDict()
_STEPS_LOCK = threading.Lock()
_STEPS_KEPT = 8


def step_fingerprint(config: ml_collections.ConfigDict) -> str:
    flat = workdir_lib.flatten(workdir_lib.config_as_json(config))
    kept = {
        k: v
        for k, v in flat.items()
        if k not in STEP_FREE_KEYS and not k.startswith(STEP_FREE_GROUPS)
    }
    return json.dumps(kept, sort_keys=True)


def shared_train_step(
    config: ml_collections.ConfigDict,
    method: base.Method,
    tx: optax.GradientTransformation | dict[str, optax.GradientTransformation],
    mesh: Mesh,
    with_preview: bool,
    compiler_state_layouts: bool = False,
) -> Callable:
    """:func:`base.make_train_step` for this config, or the one built for an earlier stage
    of this process whose step is the same program: the same method class, the same
    config but for STEP_FREE_KEYS and STEP_FREE_GROUPS (the method and optimiser are built
    from it), the same mesh."""
    key = (type(method), step_fingerprint(config), mesh, with_preview, compiler_state_layouts)
    with _STEPS_LOCK:
        if key in _STEPS:
            _STEPS.move_to_end(key)
            return _STEPS[key]
        step = _STEPS[key] = base.make_train_step(
            method, tx, mesh, with_preview, compiler_state_layouts
        )
        while len(_STEPS) > _STEPS_KEPT:
            _STEPS.popitem(last=False)
        return step


@jax.jit
def all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def flat_scalars(result: dict) -> dict[str, float]:
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": float(v) for k, v in value.items()})
        else:
            flat[key] = float(value)
    return flat


def exporter(stage_hosts: hosts.Hosts) -> Callable:
    """``export(write, workdir, variables, ...)`` for the stage's processes: its only or
    first process writes the model directory of the whole job's stage; a stage on some of a
    job's processes writes it with all of them (:func:`ddb_jax.checkpoints.save_model_dir`)."""
    together = hosts.is_group(stage_hosts)

    def export(write: Callable, workdir: str, variables, *args) -> None:
        if together:
            write(workdir, variables, *args, stage_hosts=stage_hosts)
        elif stage_hosts.is_primary:
            write(workdir, jax.device_get(variables), *args)

    return export


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices=None
) -> tuple[Any, dict | None]:
    """Trains ``config.stage``'s method to ``config.num_steps``, resuming if interrupted.

    ``devices``: the devices of this stage when the pipeline runs it beside others (else
    all, or ``config.mesh_devices``). Returns (final state, final evaluation), or
    (state, None) when stopped by a SIGTERM.
    """
    # Every input is checked (method settings, datasets, teachers, init weights, mesh) before the
    # config is recorded in the workdir or any data is read.
    # Each read or write of the set-up is bounded by the storage deadline, as the loop's are.
    data_root = str(config.data.root)
    with deadline.storage(workdir, "checking the workdir's bucket"):
        paths.check_bucket(workdir, "--workdir")
    methods.check_config(config)
    with deadline.storage(data_root, "listing the datasets"):
        datasets.check_available(config.data, config.eval.split if config.eval_every > 0 else None)
    with deadline.storage(data_root, "reading the frozen models"):
        frozen = methods.load_frozen(config)
    mesh = setup.make_mesh(config, devices=devices)
    stage_hosts = hosts.Hosts.of(mesh)
    model = models.build_model(config.model)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = setup.initial_variables(config, model, init_key)
    with deadline.storage(workdir, "recording the config"):
        workdir_lib.record_config(workdir, config)

    stage = assemble.assemble(config, variables, state_key)
    method = stage.method
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(stage.state, replicated)
    frozen = None if frozen is None else jax.device_put(frozen, replicated)
    with deadline.storage(workdir, "opening the checkpoints"):
        ckpt = checkpointing.Checkpoints(workdir, config.keep_checkpoints, stage_hosts)
    with deadline.storage(workdir, "restoring the latest checkpoint"):
        state, restored = ckpt.restore_latest(state)
    if restored is not None:
        logging.info("resumed %s at step %d", workdir, restored)
    start = int(jax.device_get(state.step))

    with_preview = config.image_summary_every > 0
    compiler_layouts = config.get("state_layouts", "row_major") == "compiler"
    train_step = shared_train_step(config, method, stage.txs, mesh, with_preview, compiler_layouts)
    run_step = None if compiler_layouts else train_step  # compiled at the first batch
    evaluate = setup.student_evaluator(config, model.apply, stage_hosts)
    summaries = Summaries(workdir, stage_hosts.is_primary)
    writer = summaries.writer
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=config.num_steps, writer=writer, every_steps=config.log_every
    )
    export = exporter(stage_hosts)
    with deadline.storage(workdir, "reading the best score"):
        best = workdir_lib.read_best_score(workdir)
    batches = setup.batch_stream(config, mesh)(start)
    history: list[tuple[int, dict]] = []
    result: dict[str, Any] = {}
    try:
        with preemption.StopRequested(stage_hosts, config.log_every) as stop:
            for step in range(start + 1, config.num_steps + 1):
                with deadline.storage(data_root, f"reading the batch of step {step}"):
                    batch = next(batches)
                if run_step is None:
                    run_step, state = state_layouts.compile_and_place(
                        train_step, state, batch, frozen
                    )
                outputs = run_step(state, batch, frozen)
                state, metrics = outputs[:2]
                history.append((step, metrics))
                report_progress(step)
                last = step == config.num_steps
                due_eval = config.eval_every > 0 and (last or step % config.eval_every == 0)
                stopping = stop.should_stop(step)
                due_ckpt = last or stopping or step % config.checkpoint_every == 0
                if last or due_eval or due_ckpt or step % config.log_every == 0:
                    write_metrics(writer, history)
                    history = []
                if with_preview and step % config.image_summary_every == 0:
                    images = jax.device_get(outputs[2])
                    if stage_hosts.is_primary:
                        writer.write_images(step, images)
                if due_eval:
                    result = evaluate(state.variables())
                    writer.write_scalars(step, flat_scalars(result))
                    if result["miou"] > best:  # the same on every process of the stage
                        best = result["miou"]
                        with deadline.storage(workdir, "exporting best/"):
                            export(
                                workdir_lib.export_best, workdir, state.variables(),
                                config.model, config.stage, step, best,
                            )  # fmt: skip
                if due_ckpt:
                    if not bool(jax.device_get(all_finite(state.tree_params()))):
                        raise NonFiniteLossError(f"parameters are not finite at step {step}")
                    ckpt.save(step, state)
                    with deadline.storage(workdir, "copying the TensorBoard events"):
                        summaries.sync()
                if stopping:
                    ckpt.wait()
                    logging.warning("stopped at step %d on request; rerun to continue", step)
                    return state, None
        ckpt.wait()
    except BaseException as err:
        if is_storage_error(err, workdir, data_root):
            deadline.bound_exit()
        raise
    finally:
        # Any exit (an error, a NaN, a stop) still finalises the checkpoints already started;
        # a failure there is logged, the first error is the one raised.
        with deadline.storage(data_root, "shutting the input pipeline down"):
            batches.close()  # now, under the deadline: its readers may wait on the storage
        ckpt.close()
        with deadline.storage(workdir, "copying the TensorBoard events"):
            summaries.close()
    if not result and config.eval_every > 0:
        # Resumed at the last step (its export was lost): evaluate again for result.json.
        result = evaluate(state.variables())
    with deadline.storage(workdir, "exporting export/"):
        export(workdir_lib.export_final, workdir, state.variables(), config, result)
    return state, result


def is_storage_error(err: BaseException, workdir: str, data_root: str) -> bool:
    """An error of a bucket's storage that ends the process (the main thread's stage
    reads or writes a bucket and failed on a file, a checkpoint or a read of tf.data)."""
    if threading.current_thread() is not threading.main_thread():
        return False  # a pipeline's stage beside others: the pipeline decides
    if not (paths.is_remote(workdir) or paths.is_remote(data_root)):
        return False
    tf_error = type(err).__module__.startswith("tensorflow")
    return isinstance(err, OSError | checkpointing.CheckpointWriteError) or tf_error
