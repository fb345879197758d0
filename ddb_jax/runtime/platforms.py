"""What a run runs on, said at start-up, and the silent CPU fallback refused.

``pip install -e .`` installs JAX's CPU build. On a GPU machine or a TPU VM that build
still runs, on the host CPU, hundreds of times slower: a run that finds an accelerator on
the machine but JAX on the CPU stops before any work, naming the extra to install
(``--config.allow_cpu=True`` overrides, e.g. to debug on a GPU machine's CPU).
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Mapping

import jax

from ddb_jax import errors


class AcceleratorNotUsedError(errors.UsageError, RuntimeError):
    """The machine has an accelerator but JAX came up on the CPU."""


def accelerator_on_machine(
    dev: str = "/dev", environ: Mapping[str, str] | None = None
) -> tuple[str, str, str] | None:
    """(what, evidence, pip extra) of an accelerator this machine has, or None.

    NVIDIA: the driver's device file (``/dev/nvidia0``) or ``nvidia-smi``. TPU: the TPU
    VM's device files (``/dev/accel*``) or the variables a Cloud TPU VM sets
    (``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_ID``).
    """
    environ = os.environ if environ is None else environ
    nvidia = os.path.join(dev, "nvidia0")
    if os.path.exists(nvidia):
        return "an NVIDIA GPU", nvidia, "cuda12"
    if dev == "/dev" and shutil.which("nvidia-smi"):
        return "an NVIDIA GPU", "nvidia-smi", "cuda12"
    accel = sorted(glob.glob(os.path.join(dev, "accel*")))
    if accel:
        return "a TPU", accel[0], "tpu"
    for variable in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID"):
        if environ.get(variable):
            return "a TPU", f"${variable}", "tpu"
    return None


def describe() -> str:
    """One line: the backend, device kind and count, this process among all."""
    devices = jax.devices()
    return (
        f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} x "
        f"{devices[0].device_kind} ({jax.local_device_count()} local), process "
        f"{jax.process_index()} of {jax.process_count()}"
    )


def check_backend(allow_cpu: bool, found: tuple[str, str, str] | None = None) -> None:
    """Refuses a CPU run on a machine with an accelerator (unless ``allow_cpu``)."""
    if allow_cpu or jax.default_backend() != "cpu":
        return
    found = accelerator_on_machine() if found is None else found
    if found is None:
        return
    what, evidence, extra = found
    raise AcceleratorNotUsedError(
        f"this machine has {what} ({evidence}) but JAX runs on the CPU: install JAX's build "
        f"for it with pip install -e '.[{extra}]' (see the README's Install section), or pass "
        "--config.allow_cpu=True to run on the CPU anyway"
    )
