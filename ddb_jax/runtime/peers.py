"""A process of a multi-process job that is gone: the others end in one line, promptly.

When one process of a job exits (its storage deadline expired, it crashed, its host went
down), the others learn it at their next collective: gloo's TCP pair is closed by the
peer, NCCL reports a remote error, the coordination service misses its heartbeats. JAX
raises a runtime error with the transport's message, whose traceback says little to a
user; and a normal exit would then run ``jax.distributed``'s shutdown, whose barrier waits
for the process that is gone (measured: forever, with gloo on CPU). So a command-line run
that meets such an error after its stage's own clean-up has run (the error went up through
every ``finally``, each storage wait under the deadline) prints one line, naming the last
complete checkpoint, and ends with ``os._exit(1)``, skipping that shutdown.
"""

from __future__ import annotations

import os
import sys

import jax

from ddb_jax import errors
from ddb_jax.runtime import deadline

# What the transports and the coordination service say when a peer is gone.
MARKERS = (
    "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket closed",
    "remote process exited", "NCCL", "coordination service", "heartbeat",
    "Barrier timed out", "DEADLINE_EXCEEDED", "UNAVAILABLE",
)  # fmt: skip
RUNTIME_ERRORS = ("JaxRuntimeError", "XlaRuntimeError")


def is_lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a multi-process job's runtime error that says a peer is gone."""
    if jax.process_count() == 1 or type(err).__name__ not in RUNTIME_ERRORS:
        return False
    return any(marker in str(err) for marker in MARKERS)


def lost_peer_line(err: BaseException, workdir: str) -> str:
    cause = errors.one_line(err)
    cause = cause if len(cause) <= 240 else cause[:237] + "..."
    return (
        f"error: another process of this job is gone ({cause})"
        + deadline.checkpoint_clause(workdir)
        + "; rerun the job to continue"
    )


def end_if_lost(err: BaseException, workdir: str, traceback: bool = False) -> None:
    """Ends this process in one line (exit 1) if ``err`` says a peer of the job is gone;
    returns otherwise (and with ``traceback``, which keeps the error's own report)."""
    if traceback or not is_lost_peer(err):
        return
    sys.stdout.flush()
    sys.stderr.write(lost_peer_line(err, workdir) + "\n")
    sys.stderr.flush()
    os._exit(1)  # jax.distributed's shutdown would wait for the process that is gone
