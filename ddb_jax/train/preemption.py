"""Preemption: a SIGTERM stops the run at a step every process agrees on, after saving it.

With several processes (``jax.distributed``) this is JAX's preemption service, through
orbax's ``CheckpointManager.reached_preemption``: JAX catches SIGTERM on whichever process
gets it and agrees on a sync step across all of them in the background, with no
collective in the step loop. With one process (where that service does not exist) our own
SIGTERM handler sets a flag that the loop reads once per step.
"""

from __future__ import annotations

import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


def _jax_service_running() -> bool:
    from jax._src import distributed  # the service's state is not public in jax 0.10

    return distributed.global_state.preemption_sync_manager is not None


class StopRequested:
    """``should_stop(step)`` after a SIGTERM, on every process at the same step."""

    def __init__(self, manager: ocp.CheckpointManager, agree_every: int):
        self.manager = manager
        self.agree_every = max(agree_every, 1)
        self.requested = False
        self._previous = None
        self._use_jax = jax.process_count() > 1 and _jax_service_running()

    def __enter__(self):
        if not self._use_jax:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._previous = None
        return self

    def should_stop(self, step: int) -> bool:
        if self._use_jax:
            return self.manager.reached_preemption(step)
        if jax.process_count() == 1:
            return self.requested
        # Several processes without JAX's service (it was disabled): compare flags every
        # ``agree_every`` steps only (steps that wait for metrics anyway).
        if step % self.agree_every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
