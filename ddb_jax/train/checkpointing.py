"""Train-state checkpoints: orbax's async, keep-N CheckpointManager, and what we add to it.

Orbax makes each step's save atomic by the means the storage has (locally a temporary
directory renamed when complete; on GCS a commit file written last), so a save cut off
half-way is never restored. On top of it: the step whose background write failed is named
in the error, with the latest complete step (from the manager's own record when the storage
cannot be listed) and advice that fits (free space only for a full disk); a step directory
that lacks orbax's metadata (a partial copy, a filesystem without atomic rename) is skipped
on restore.

Saves of stages running side by side in one process are started one at a time: orbax keys
the signals between a save's blocking part and its background commit by a process-wide
"current operation id", which a second manager's save moves on; two saves started at once
in two threads then collide on their temporary directories or wait for a signal that never
comes (a 300 s timeout). Only the blocking part is serialised; the writes still overlap.
The model directories a stage exports (``best/``, ``export/``) are orbax saves too and take
the same lock (:data:`ddb_jax.checkpoints.SAVE_START`). A stage that runs on some of a
multi-host job's processes (the pipeline's process groups) has a manager whose barriers
and primary host are those processes' (:func:`multiprocessing_options`); orbax's
asynchronous directory creation is off (:func:`ddb_jax.checkpoints.async_options`).

Orbax writes a replicated array in slices, one per replica, so that the hosts of a pod share
the write ("replica-parallel"); for the small arrays of a train state (biases, norms: most of
its leaves) each slice is one more device op and its own compile for a few bytes, which
made a save of a 4-device state take twice as long. Slices are used only where each is at
least ``ddb_jax.checkpoints.MIN_REPLICA_SLICE_BYTES``.

Not orbax's ``best_fn``: that ranks the train-state checkpoints themselves and would trade
the latest one (which resumption needs) for the best; the best student is exported as a
model directory instead (:func:`ddb_jax.train.workdir.export_best`).

Every wait on the storage here (restore, the blocking part of a save, its completion,
close) is bounded by the storage deadline (:mod:`ddb_jax.runtime.deadline`): when the
storage does not answer in time, the process ends in one line naming the directory and
the last complete checkpoint, which this class records as each save completes.
"""

from __future__ import annotations

import errno
import re
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from ddb_jax import checkpoints, errors, paths
from ddb_jax.runtime import deadline, hosts
from ddb_jax.train import workdir as workdir_lib

METADATA_FILE = "_CHECKPOINT_METADATA"


class CheckpointWriteError(errors.InputError, RuntimeError):
    """A checkpoint could not be written (disk full, say); the earlier ones are kept."""


def checkpoint_dir(workdir: str) -> str:
    return paths.join(paths.resolve(workdir), workdir_lib.CHECKPOINTS_DIR)


def latest_complete_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest step whose directory orbax finalised (it has its metadata file)."""
    for step in sorted(manager.all_steps(), reverse=True):
        path = paths.join(str(manager.directory), str(step))
        if paths.exists(paths.join(path, METADATA_FILE)):
            return step
        logging.warning("skipping incomplete checkpoint %s", path)
    return None


def multiprocessing_options(
    directory: str, stage_hosts: hosts.Hosts | None
) -> ocp.options.MultiprocessingOptions:
    """Orbax's defaults for a stage on all processes; for one on some of them (beside other
    stages), barriers among those only, under a key of its own, its primary writing."""
    if not hosts.is_group(stage_hosts):
        return ocp.options.MultiprocessingOptions()
    return ocp.options.MultiprocessingOptions(
        primary_host=stage_hosts.primary,
        active_processes=set(stage_hosts.processes),
        barrier_sync_key_prefix=re.sub(r"[^A-Za-z0-9]+", "_", directory),
    )


def is_disk_full(err: BaseException) -> bool:
    """A full disk or quota anywhere in ``err``'s chain (orbax and TensorStore wrap the
    OSError, or only keep its text): the one failure that freeing space cures."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err) for text in ("No space left on device", "Disk quota exceeded")):
            return True
        err = err.__cause__ or err.__context__
    return False


class Checkpoints:
    """The manager, and the step being written in the background (so a failure names it)."""

    def __init__(self, workdir: str, keep: int, stage_hosts: hosts.Hosts | None = None):
        grouped = hosts.is_group(stage_hosts)
        checkpoints.use_array_handler(stage_hosts.primary if grouped else 0)
        self.directory = checkpoint_dir(workdir)
        if grouped:  # orbax creates the directory only for all processes: each one does
            paths.makedirs(self.directory)
        processes = multiprocessing_options(self.directory, stage_hosts)
        self._saving: int | None = None  # the step of the save started last
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not grouped,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            multiprocessing_options=processes,
            async_options=checkpoints.async_options(),
        )
        # The handlers are given, not left to orbax's defaults: those have process 0 as
        # their primary, whatever the options say.
        handler = ocp.StandardCheckpointHandler(multiprocessing_options=processes)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handler)
        self.pending: int | None = None

        # The deadline's line names the newest complete checkpoint, asked when it expires.
        deadline.record_checkpoint(self.directory, None, self._settled)

    def _settled(self) -> int | None:
        """The step of the save started last if orbax has committed it (no save in
        progress, no error), else None; without waiting on the storage."""
        if self._saving is None or self.manager.is_saving_in_progress():
            return None
        self.manager.check_for_errors()  # raises the background save's error, if any
        return self._saving

    def restore_latest(self, state: Any) -> tuple[Any, int | None]:
        """(the latest complete checkpoint, its step), or (``state``, None) if none."""
        with self._deadline("restoring the latest checkpoint"):
            step = latest_complete_step(self.manager)
            if step is None:
                return state, None
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(state))
        deadline.record_checkpoint(self.directory, step)
        return restored, step

    def _deadline(self, doing: str):
        return deadline.storage(self.directory, doing)

    def _latest_on_record(self, failed: int | None) -> int | None:
        """The newest complete checkpoint: from the storage when it answers; when it does
        not (a lost connection), the steps this manager has on record, ``failed`` left out
        (a save waits for the one before it, so those were written whole)."""
        recorded = deadline.last_checkpoint(self.directory)
        if paths.is_remote(self.directory) and recorded is not None:
            return recorded  # no listing: it would retry for minutes on a lost connection
        try:
            with self._deadline("listing the checkpoints"):
                self.manager.reload()
                return latest_complete_step(self.manager)
        except Exception:  # the listing itself fails on a lost connection or a broken disk
            return max((s for s in self.manager.all_steps() if s != failed), default=None)

    def _error(self, step: int | None, err: BaseException) -> CheckpointWriteError:
        kept = self._latest_on_record(step)
        rerun = "rerun" if kept is None else "rerun to continue from it"
        if is_disk_full(err):
            advice = f"free space and {rerun}"
        else:
            advice = f"{rerun} once {self.directory} can be written again"
        return CheckpointWriteError(
            f"writing the checkpoint of step {step} to {self.directory} failed "
            f"({type(err).__name__}: {err}); the checkpoints written before it are kept "
            f"(latest: {'none complete yet' if kept is None else f'step {kept}'}); {advice}"
        )

    def wait(self) -> None:
        """Blocks until the background write is done; raises CheckpointWriteError if it failed."""
        step, self.pending = self.pending, None
        try:
            with self._deadline(f"writing the checkpoint of step {step}"):
                self.manager.wait_until_finished()
        except Exception as err:
            raise self._error(step, err) from err
        deadline.record_checkpoint(self.directory, step)

    def save(self, step: int, state: Any) -> None:
        self.wait()  # an earlier write's failure is reported under its own step
        self._saving = step
        try:
            with self._deadline(f"writing the checkpoint of step {step}"), checkpoints.SAVE_START:
                self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except Exception as err:
            raise self._error(step, err) from err
        self.pending = step

    def close(self) -> None:
        """Finishes the pending write (a failure is logged, not raised) and closes."""
        try:
            self.wait()
        except CheckpointWriteError as err:
            logging.error("%s", err)
        try:
            with self._deadline("closing the checkpoint manager"):
                self.manager.close()
        except Exception as err:
            logging.warning("closing the checkpoint manager of %s: %s", self.directory, err)
        deadline.forget_probe(self.directory)
