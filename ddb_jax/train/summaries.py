"""TensorBoard summaries of a stage: CLU's metric writers, in the workdir wherever it is.

CLU writes event files through TensorFlow, whose GCS client cannot be pointed at anything
but Google's endpoint (so a storage emulator cannot check it) and whose object-store
"appends" re-upload the whole file at every flush. For a workdir in a bucket the events
are therefore written to a local scratch directory and copied into the workdir, each file
as one whole object, whenever the stage checkpoints or stops (:meth:`Summaries.sync`).
Only process 0 writes summaries; the others log to the console.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from absl import logging
from clu import metric_writers

from ddb_jax import paths


class Summaries:
    """The stage's writer (``.writer``) and where its files end up."""

    def __init__(self, workdir: str, primary: bool = True):
        """``primary``: this process writes the events (the stage's first process)."""
        self.workdir = workdir
        self.local_dir = None
        logdir = workdir
        if paths.is_remote(workdir) and primary:
            self.local_dir = tempfile.mkdtemp(prefix="ddb_jax_events_")
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
        try:
            self.sync()
        except Exception as err:
            logging.error("copying TensorBoard events to %s failed (%s); they stay in %s",
                          self.workdir, err, self.local_dir)  # fmt: skip
            self.local_dir = None
        self.writer.close()
        if self.local_dir is not None:
            shutil.rmtree(self.local_dir, ignore_errors=True)
