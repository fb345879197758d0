"""Preemption: a SIGTERM stops the run at a step every process of a stage agrees on, after
saving it.

Our SIGTERM handler sets a flag (in whichever process got the signal; the stages the
pipeline runs side by side in threads all read it). With one process a stage stops at the
step it is on. With several, the processes of a stage compare flags every ``agree_every``
steps (steps that wait for metrics anyway) with a collective over the stage's own mesh,
and stop together; a process that got the signal also announces it to the whole job
through the coordination service, so stages running on other processes (the pipeline's
groups) stop at their next agreement too. JAX's own preemption service is not used
(:func:`ddb_jax.runtime.distributed.initialize` turns it off): it agrees on one step across all of
the job's processes, which stages running on different processes at different steps
cannot do.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
from absl import logging

from ddb_jax.runtime import hosts as hosts_lib

_REQUESTED = threading.Event()
_INSTALLED = threading.Event()


def _handle(signum, frame) -> None:
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    _REQUESTED.set()


@contextlib.contextmanager
def sigterm_handler():
    """Turns SIGTERM into the stop flag for the duration (from the main thread; inside an
    outer ``sigterm_handler``, or in another thread, it does nothing)."""
    if _INSTALLED.is_set() or threading.current_thread() is not threading.main_thread():
        yield
        return
    _REQUESTED.clear()
    previous = signal.signal(signal.SIGTERM, _handle)
    _INSTALLED.set()
    try:
        yield
    finally:
        # None: the handler before ours was not Python's (it cannot be put back).
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        _INSTALLED.clear()


class StopRequested:
    """``should_stop(step)`` after a SIGTERM, on every process of the stage at one step."""

    def __init__(self, hosts: hosts_lib.Hosts, agree_every: int):
        self.hosts = hosts
        self.agree_every = max(agree_every, 1)
        self._handler = sigterm_handler()

    def __enter__(self):
        self._handler.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handler.__exit__(*exc)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return _REQUESTED.is_set()
        if step % self.agree_every:
            return False
        asked = _REQUESTED.is_set()
        if asked:
            hosts_lib.announce_stop()
        else:
            asked = hosts_lib.stop_announced()
        return self.hosts.any(asked)
