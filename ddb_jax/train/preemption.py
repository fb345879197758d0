"""Preemption: a SIGTERM stops the run at a step every process agrees on, after saving it.

With several processes (``jax.distributed``) this is JAX's preemption service, through
orbax's ``CheckpointManager.reached_preemption``: JAX catches SIGTERM on whichever process
gets it and agrees on a sync step across all of them in the background, with no
collective in the step loop. With one process (where that service does not exist) our own
SIGTERM handler sets a flag that every running stage reads once per step: the stages the
pipeline runs side by side in threads all stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_REQUESTED = threading.Event()
_INSTALLED = threading.Event()


def _jax_service_running() -> bool:
    from jax._src import distributed  # the service's state is not public in jax 0.10

    return distributed.global_state.preemption_sync_manager is not None


def _handle(signum, frame) -> None:
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    _REQUESTED.set()


@contextlib.contextmanager
def sigterm_handler():
    """Turns SIGTERM into the stop flag for the duration (from the main thread; inside an
    outer ``sigterm_handler``, or in another thread, it does nothing)."""
    if (
        _INSTALLED.is_set()
        or threading.current_thread() is not threading.main_thread()
        or (jax.process_count() > 1 and _jax_service_running())  # JAX's service handles it
    ):
        yield
        return
    _REQUESTED.clear()
    previous = signal.signal(signal.SIGTERM, _handle)
    _INSTALLED.set()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _INSTALLED.clear()


class StopRequested:
    """``should_stop(step)`` after a SIGTERM, on every process at the same step."""

    def __init__(self, manager: ocp.CheckpointManager, agree_every: int):
        self.manager = manager
        self.agree_every = max(agree_every, 1)
        self._use_jax = jax.process_count() > 1 and _jax_service_running()
        self._handler = contextlib.nullcontext() if self._use_jax else sigterm_handler()

    def __enter__(self):
        self._handler.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handler.__exit__(*exc)

    def should_stop(self, step: int) -> bool:
        if self._use_jax:
            return self.manager.reached_preemption(step)
        if jax.process_count() == 1:
            return _REQUESTED.is_set()
        # Several processes without JAX's service (it was disabled): compare flags every
        # ``agree_every`` steps only (steps that wait for metrics anyway).
        if step % self.agree_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(_REQUESTED.is_set()))
        return bool(np.max(flags))
