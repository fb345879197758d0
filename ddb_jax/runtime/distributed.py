"""Multi-host start-up: ``jax.distributed.initialize`` from flags, the environment or the cluster.

Where the settings come from, first match wins:

1. flags ``--coordinator_address``, ``--num_processes``, ``--process_id``;
2. the environment: ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself),
   ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
3. a cluster JAX detects by itself: SLURM (``srun``, one task per process), Open MPI
   (``mpirun``), Cloud TPU VMs (every host of a pod slice runs the same command).

Without any of these the run is one process and nothing is initialised, so single-machine
use needs no flag. Settings are validated before anything else runs, and a bad one names
the flag or variable it came from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

from ddb_jax import errors

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
MODES = ("auto", "on", "off")


class DistributedConfigError(errors.UsageError, ValueError):
    """Inconsistent multi-host settings (names the flag or environment variable)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``jax.distributed.initialize`` gets; ``None`` fields are left to JAX's detection."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300


def _int_setting(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{name}={value!r} is not an integer") from None


def _cluster_detected(environ: Mapping[str, str]) -> str | None:
    """The cluster JAX would auto-detect with more than one process, if any (no network)."""
    if int(environ.get("SLURM_NTASKS", environ.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1:
        if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ:
            return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:  # pragma: no cover - other JAX versions
        running_in_cloud_tpu_vm = False
    if running_in_cloud_tpu_vm:
        return "cloud_tpu"
    return None


def resolve(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
    environ: Mapping[str, str] | None = None,
) -> Settings | None:
    """The settings to initialise with, or ``None`` for a single-process run."""
    environ = os.environ if environ is None else environ
    if mode not in MODES:
        raise DistributedConfigError(f"--distributed={mode!r}; use one of {MODES}")
    if mode == "off":
        return None
    coordinator = coordinator_address or environ.get(ENV_COORDINATOR) or None
    count_src = "--num_processes" if num_processes is not None else ENV_NUM_PROCESSES
    id_src = "--process_id" if process_id is not None else ENV_PROCESS_ID
    count = _int_setting(
        num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES), count_src
    )
    index = _int_setting(
        process_id if process_id is not None else environ.get(ENV_PROCESS_ID), id_src
    )
    if timeout_s <= 0:
        raise DistributedConfigError(f"--distributed_timeout={timeout_s}; use a positive number")
    if coordinator is not None:
        if count is None or index is None:
            raise DistributedConfigError(
                f"a coordinator address ({coordinator}) needs --num_processes and --process_id "
                f"(or {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})"
            )
        if ":" not in coordinator:
            raise DistributedConfigError(
                f"coordinator address {coordinator!r} has no port; use HOST:PORT"
            )
        if count < 1:
            raise DistributedConfigError(f"{count_src}={count}; use 1 or more")
        if not 0 <= index < count:
            raise DistributedConfigError(f"{id_src}={index} is not in 0..{count - 1}")
        return Settings(coordinator, count, index, timeout_s)
    if count is not None or index is not None:
        raise DistributedConfigError(
            f"{count_src if count is not None else id_src} is set but no coordinator address; "
            f"pass --coordinator_address=HOST:PORT (or set {ENV_COORDINATOR})"
        )
    if mode == "on" or _cluster_detected(environ):
        return Settings(timeout_s=timeout_s)  # JAX detects SLURM / Open MPI / Cloud TPU
    return None


def initialize(settings: Settings | None) -> None:
    """Starts the JAX distributed runtime (a no-op for ``None``: one process)."""
    if settings is None:
        return
    # Stages stop on SIGTERM by our own agreement, scoped to each stage's processes
    # (ddb_jax.train.preemption); JAX's service would install a second SIGTERM handler.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=settings.timeout_s,
    )
