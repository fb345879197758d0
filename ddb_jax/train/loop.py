"""The training loop shared by self-training and distillation stages.

CLU writers (TensorBoard + console) and periodic progress; orbax checkpoints
(async, keep-N) restored on start so a killed run continues; evaluation every K
steps with the best student exported; image summaries every M steps (process 0);
a SIGTERM saves the current step and stops cleanly. Non-finite losses stop the run
before any checkpoint of bad parameters is written; a failed checkpoint write (disk
full) stops it naming the step and directory, the checkpoints before it untouched
(orbax writes into a temporary directory and renames it only once complete).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions

from ddb_jax import checkpoints

CONFIG_JSON = "config.json"
RESULT_JSON = "result.json"
EXPORT_DIR = "export"  # the student, a model directory (the stage's deliverable)
BEST_DIR = "best"
# Keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_KEYS = (
    "log_every", "image_summary_every", "eval_every", "checkpoint_every", "keep_checkpoints",
    "eval.", "data.root", "data.num_parallel_calls", "model.remat", "stages",
)  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, say); the earlier ones are kept."""


class WorkdirMismatchError(ValueError):
    """The workdir holds a run of another config."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Records the config in a new workdir; refuses a workdir of a different run."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_JSON)
    current = json.loads(json.dumps(config.to_dict(), default=list))
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        a, b = flatten(stored), flatten(current)
        diffs = sorted(
            k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_KEYS)
        )
        if diffs:
            detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diffs[:10])
            raise WorkdirMismatchError(
                f"{workdir} holds a run of another config (differing keys: {detail}); "
                "use a new --workdir or delete the old run"
            )
        return
    tmp = f"{path}.tmp{jax.process_index()}"  # every process writes the same file
    with open(tmp, "w") as f:
        json.dump(current, f, indent=2)
    os.replace(tmp, path)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Async keep-N manager; temporary directories of an interrupted save are removed."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


class _Checkpoints:
    """The manager and the step being written in the background, so a failure names it."""

    def __init__(self, workdir: str, keep: int):
        self.directory = checkpoint_dir(workdir)
        self.manager = make_checkpoint_manager(workdir, keep)
        self.pending: int | None = None

    def _error(self, step: int | None, err: BaseException) -> CheckpointWriteError:
        try:
            self.manager.reload()
            kept = self.manager.latest_step()
        except Exception:  # the listing itself may fail on a broken disk
            kept = "unknown"
        return CheckpointWriteError(
            f"writing the checkpoint of step {step} to {self.directory} failed "
            f"({type(err).__name__}: {err}); the checkpoints written before it are kept "
            f"(latest: step {kept}); free space and rerun to continue from it"
        )

    def wait(self) -> None:
        """Blocks until the background write is done; raises CheckpointWriteError if it failed."""
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._error(step, err) from err

    def save(self, step: int, state) -> None:
        self.wait()  # an earlier write's failure is reported under its own step
        try:
            self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except Exception as err:
            raise self._error(step, err) from err
        self.pending = step

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception as err:  # only reached after wait(), i.e. nothing pending
            logging.warning("closing the checkpoint manager of %s: %s", self.directory, err)


def latest_complete_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest step whose directory orbax finalised (it has its metadata file).

    Orbax skips its own temporary directories, but a step directory cut off some other
    way (a partial copy, a filesystem without atomic rename) would otherwise be chosen.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        path = os.path.join(str(manager.directory), str(step))
        if os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
            return step
        logging.warning("skipping incomplete checkpoint %s", path)
    return None


def all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class StopRequested:
    """Turns SIGTERM into a flag the loop checks once per step (preemption)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def agreed(self, step: int, every: int) -> bool:
        """Whether any process was asked to stop: all processes must stop (and save) at the
        same step, and a signal may reach only some of them. With several processes they
        compare flags every ``every`` steps only (the steps that already wait for metrics),
        so the collective never stalls asynchronous dispatch of the steps between."""
        if jax.process_count() == 1:
            return self.requested
        if step % max(every, 1):
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.max(flags))

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def write_metrics(writer, history: list[tuple[int, dict]]) -> None:
    """Checks every pending step's loss, then writes their mean; raises on a non-finite loss."""
    steps = [s for s, _ in history]
    values = jax.device_get([m for _, m in history])
    for step, metrics in zip(steps, values, strict=True):
        if not np.isfinite(metrics["loss"]):
            raise NonFiniteLossError(f"loss is {metrics['loss']} at step {step}")
    mean = {k: float(np.mean([m[k] for m in values])) for k in values[-1]}
    writer.write_scalars(steps[-1], mean)


def train_loop(
    config: ml_collections.ConfigDict,
    workdir: str,
    state,
    train_step: Callable,
    make_batches: Callable[[int], Iterator[dict]],
    evaluate_fn: Callable[[Any], dict[str, float]] | None,
    export_variables: Callable[[Any], dict],
    preview_fn: Callable[[Any, dict], dict[str, np.ndarray]] | None = None,
):
    """Runs ``train_step`` to ``config.num_steps``, resuming from the latest checkpoint.

    ``preview_fn(state, batch)`` (the state after the step that consumed ``batch``) returns
    uint8 images {tag: (N, H, W, 3)}, written every ``config.image_summary_every`` steps;
    it runs on every process (it may be a sharded jit), only process 0 writes.
    """
    ckpt = _Checkpoints(workdir, config.keep_checkpoints)
    manager = ckpt.manager
    latest = latest_complete_step(manager)
    if latest is not None:
        state = manager.restore(latest, args=ocp.args.StandardRestore(state))
        logging.info("resumed %s at step %d", workdir, latest)
    start = int(jax.device_get(state.step))
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    progress = periodic_actions.ReportProgress(
        num_train_steps=config.num_steps, writer=writer, every_steps=config.log_every
    )
    best = _read_best(workdir)
    batches = make_batches(start)
    history: list[tuple[int, dict]] = []
    result: dict[str, Any] = {}
    try:
        with StopRequested() as stop:
            for step in range(start + 1, config.num_steps + 1):
                batch = next(batches)
                state, metrics = train_step(state, batch)
                history.append((step, metrics))
                progress(step)
                last = step == config.num_steps
                due_eval = (
                    evaluate_fn is not None
                    and config.eval_every > 0
                    and (last or step % config.eval_every == 0)
                )
                stopping = stop.agreed(step, config.log_every)
                due_ckpt = last or step % config.checkpoint_every == 0 or stopping
                if last or due_eval or due_ckpt or step % config.log_every == 0:
                    write_metrics(writer, history)
                    history = []
                if (
                    preview_fn is not None
                    and config.image_summary_every > 0
                    and step % config.image_summary_every == 0
                ):
                    images = jax.device_get(preview_fn(state, batch))
                    if jax.process_index() == 0:
                        writer.write_images(step, images)
                if due_eval:
                    result = evaluate_fn(state)
                    writer.write_scalars(step, _flat_scalars(result))
                    best = _maybe_export_best(
                        workdir, config, state, export_variables, result, best
                    )
                if due_ckpt:
                    if not bool(jax.device_get(all_finite(state.params))):
                        raise NonFiniteLossError(f"parameters are not finite at step {step}")
                    ckpt.save(step, state)
                if stopping:
                    ckpt.wait()
                    logging.warning("stopped at step %d on request; rerun to continue", step)
                    writer.flush()
                    ckpt.close()
                    return state, None
        ckpt.wait()
    except BaseException:
        # Any exit (an error, a NaN) still finalises the checkpoints already started; a
        # failure there is logged, the first error is the one raised.
        try:
            ckpt.wait()
        except CheckpointWriteError as err:
            logging.error("%s", err)
        ckpt.close()
        raise
    ckpt.close()
    if not result and evaluate_fn is not None and config.eval_every > 0:
        # Resumed at the last step (its export was lost): evaluate again for result.json.
        result = evaluate_fn(state)
    writer.flush()
    if jax.process_index() == 0:
        checkpoints.save_model_dir(
            os.path.join(workdir, EXPORT_DIR),
            export_variables(state),
            config.model,
            {"stage": config.stage, "step": str(config.num_steps)},
            overwrite=True,
        )
        summary = {k: v for k, v in result.items() if not isinstance(v, dict)}
        _write_json(os.path.join(workdir, RESULT_JSON), {"step": config.num_steps, **summary})
    return state, result


def _flat_scalars(result: dict) -> dict[str, float]:
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": float(v) for k, v in value.items()})
        else:
            flat[key] = float(value)
    return flat


def _read_best(workdir: str) -> float:
    path = os.path.join(workdir, BEST_DIR, "score.json")
    if os.path.exists(path):
        with open(path) as f:
            return float(json.load(f)["miou"])
    return -1.0


def _maybe_export_best(workdir, config, state, export_variables, result, best: float) -> float:
    score = float(result.get("miou", -1.0))
    if score <= best or jax.process_index() != 0:
        return best
    out = os.path.join(workdir, BEST_DIR)
    checkpoints.save_model_dir(
        out, export_variables(state), config.model, {"stage": config.stage}, overwrite=True
    )
    _write_json(os.path.join(out, "score.json"), {"miou": score, "step": int(state.step)})
    return score


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
