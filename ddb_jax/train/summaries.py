"""TensorBoard summaries of a stage: CLU's metric writers, in the workdir wherever it is.

CLU writes event files through TensorFlow, whose GCS client cannot be pointed at anything
but Google's endpoint (so a storage emulator cannot check it) and whose object-store
"appends" re-upload the whole file at every flush. For a workdir in a bucket the events
are therefore written to a local scratch directory and copied into the workdir, each file
as one whole object, whenever the stage checkpoints or stops (:meth:`Summaries.sync`).
Only process 0 writes summaries; the others log to the console.

Scratch directories (``ddb_jax_events_<pid>_*`` in the temporary directory) are removed
on every exit the process lives through: :meth:`Summaries.close` (a normal end, an error
or a SIGTERM stop of the loop), else at interpreter exit. One whose copy failed is kept
for the user for a week, with a note saying where its events belong. What a killed process
left is removed at the next start (:func:`remove_stale_scratch`).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import threading
import time

from absl import logging
from clu import metric_writers

from ddb_jax import paths

PREFIX = "ddb_jax_events_"
KEPT_NOTE = "NOT_COPIED.txt"  # in a scratch directory kept after a failed copy
# A scratch directory is stale when nothing in it changed for QUIET_S and the process
# named in it no longer runs here (QUIET_S guards against a process that this one cannot
# see, e.g. in a container sharing the temporary directory: a live stage writes events
# every few minutes); when it names no process (an earlier version's), after a day; and
# after a week whatever it names (its pid reused by another program) or holds (the note
# of a failed copy).
QUIET_S, NO_PID_S, ANY_S = 3600.0, 86400.0, 7 * 86400.0
_LIVE: set[str] = set()  # this process's scratch directories not yet removed
_LIVE_LOCK = threading.Lock()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _last_change(directory: str) -> float:
    """The newest modification time of ``directory`` and anything in it."""
    newest = os.path.getmtime(directory)
    for base, _, files in os.walk(directory):
        for name in files:
            try:
                newest = max(newest, os.path.getmtime(os.path.join(base, name)))
            except OSError:
                pass
    return newest


def is_stale(directory: str, now: float | None = None) -> bool:
    """Whether a scratch directory was left by a process that is gone (the rule above)."""
    quiet = (time.time() if now is None else now) - _last_change(directory)
    match = re.match(rf"{PREFIX}(\d+)_", os.path.basename(directory))
    if os.path.exists(os.path.join(directory, KEPT_NOTE)):
        return quiet > ANY_S
    if match is None:
        return quiet > NO_PID_S
    return quiet > ANY_S or (quiet > QUIET_S and not _pid_running(int(match.group(1))))


def remove_stale_scratch(root: str | None = None) -> list[str]:
    """Removes the stale scratch directories in ``root`` (the temporary directory);
    returns them. Never fails: another user's or a vanished directory is left alone."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(root) if n.startswith(PREFIX)]
    except OSError:
        return removed
    for name in names:
        directory = os.path.join(root, name)
        try:
            if os.path.isdir(directory) and is_stale(directory):
                shutil.rmtree(directory)
                removed.append(directory)
        except OSError as err:
            logging.info("left scratch directory %s (%s)", directory, err)
    if removed:
        logging.info("removed scratch directories of stopped runs: %s", removed)
    return removed


@atexit.register
def _remove_live() -> None:
    """At interpreter exit: the scratch directories whose stage did not close them (an
    error raised before the stage's loop began, say)."""
    with _LIVE_LOCK:
        for directory in sorted(_LIVE):
            shutil.rmtree(directory, ignore_errors=True)
        _LIVE.clear()


class Summaries:
    """The stage's writer (``.writer``) and where its files end up."""

    def __init__(self, workdir: str, primary: bool = True):
        """``primary``: this process writes the events (the stage's first process)."""
        self.workdir = workdir
        self.local_dir = None
        logdir = workdir
        if paths.is_remote(workdir) and primary:
            remove_stale_scratch()
            self.local_dir = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}_")
            with _LIVE_LOCK:
                _LIVE.add(self.local_dir)
            logdir = self.local_dir
        self.writer = metric_writers.create_default_writer(logdir, just_logging=not primary)

    def sync(self) -> None:
        """Copies the event files to a remote workdir (nothing to do for a local one)."""
        if self.local_dir is None:
            return
        self.writer.flush()
        for name in sorted(os.listdir(self.local_dir)):
            source = os.path.join(self.local_dir, name)
            if os.path.isfile(source):
                with open(source, "rb") as f:
                    paths.write_bytes(paths.join(self.workdir, name), f.read())

    def close(self) -> None:
        """Flushes and copies the events; a failed copy is logged (the stage's own outcome
        is what the caller reports), and the local events are then kept for the user."""
        local_dir = self.local_dir
        try:
            self.sync()
        except Exception as err:
            logging.error("copying TensorBoard events to %s failed (%s); they stay in %s for a "
                          "week", self.workdir, err, local_dir)  # fmt: skip
            self.local_dir = None
            try:
                with open(os.path.join(local_dir, KEPT_NOTE), "w") as f:
                    f.write(f"TensorBoard events of {self.workdir}, kept for a week: "
                            f"copying them failed ({err})\n")  # fmt: skip
            except OSError:
                pass
        self.writer.close()
        if self.local_dir is not None:
            shutil.rmtree(self.local_dir, ignore_errors=True)
        with _LIVE_LOCK:
            _LIVE.discard(local_dir)
