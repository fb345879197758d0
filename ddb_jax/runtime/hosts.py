"""The processes a stage runs on, and what they do together.

A stage runs on the devices of its mesh: all of one process's, or those of several
processes of a multi-host job. The pipeline may give a stage the devices of *some* of the
job's processes while other stages run on the rest at the same time, so everything a stage
does across processes (feeding its slice of each batch, summing confusion matrices, agreeing
to stop, writing files once, checkpoint barriers) is scoped to the processes of its mesh
(:class:`Hosts`), never to the job's: a collective over all of the job's devices would wait
for processes busy with another stage.

What the whole job shares goes through JAX's coordination service (a barrier between the
pipeline's waves, the notice that a process was asked to stop), not through device
collectives, so a process that finished its stage early waits there without a timeout of
the collectives' library.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# A wave of the pipeline may wait for a stage of another group for as long as that stage
# trains: the coordination service's limit is set to what no training run reaches.
WAVE_BARRIER_TIMEOUT_MS = 30 * 24 * 3600 * 1000
STOP_KEY_DIR = "ddb_jax/stop/"


@dataclasses.dataclass(frozen=True)
class Hosts:
    """The processes whose devices form ``mesh``, in process order; the first is the
    *primary*, which alone writes a stage's files."""

    mesh: Mesh
    processes: tuple[int, ...]

    @classmethod
    def of(cls, mesh: Mesh) -> Hosts:
        return cls(mesh, tuple(sorted({d.process_index for d in mesh.devices.flat})))

    @classmethod
    def everyone(cls) -> Hosts:
        """Every process of the job, over all devices."""
        return cls.of(Mesh(np.asarray(jax.devices()), ("data",)))

    @property
    def count(self) -> int:
        return len(self.processes)

    @property
    def index(self) -> int:
        """This process's place among them (which slice of a batch it feeds)."""
        me = jax.process_index()
        if me not in self.processes:
            raise ValueError(f"process {me} has no device in this stage's mesh {self.processes}")
        return self.processes.index(me)

    @property
    def primary(self) -> int:
        return self.processes[0]

    @property
    def is_primary(self) -> bool:
        return jax.process_index() == self.primary

    @property
    def is_whole_job(self) -> bool:
        return self.count == jax.process_count()

    @property
    def local_devices(self) -> list:
        me = jax.process_index()
        return [d for d in self.mesh.devices.flat if d.process_index == me]

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Each process's ``values``, stacked in process order: (count, *shape), the same on
        every process of the stage (a collective over the mesh only, exact for integers:
        each entry is one process's value plus zeros)."""
        values = np.asarray(values)
        if self.count == 1:
            return values[None]
        rows = np.zeros((len(self.local_devices), self.count, *values.shape), values.dtype)
        rows[0, self.index] = values  # one copy per process, whatever its number of devices
        spread = jax.make_array_from_process_local_data(
            NamedSharding(self.mesh, PartitionSpec("data")), rows
        )
        total = _sum_over_devices(self.mesh)(spread)
        return np.asarray(total.addressable_data(0))

    def barrier(self, name: str) -> None:
        """These processes past ``name`` (a no-op for one); each use of a name is its own
        barrier (the processes of a stage pass the same names in the same order)."""
        if self.count > 1:
            processes = list(self.processes)
            _client().wait_at_barrier(_numbered(name), WAVE_BARRIER_TIMEOUT_MS, processes)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any of these processes (each gets the same answer)."""
        return bool(self.gather(np.int32(flag)).max() > 0)


def is_group(stage_hosts: Hosts | None) -> bool:
    """Whether a stage runs on some, not all, of the job's processes (beside other stages):
    then its checkpoints and model directories are written by those processes alone."""
    return stage_hosts is not None and not stage_hosts.is_whole_job


@functools.lru_cache(maxsize=16)
def _sum_over_devices(mesh: Mesh):
    return jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, PartitionSpec()))


def _client():
    from jax._src import distributed  # the coordination client is not public in jax 0.10

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("several processes but no jax.distributed client")
    return client


_USES: collections.Counter = collections.Counter()
_USES_LOCK = threading.Lock()


def _numbered(name: str) -> str:
    with _USES_LOCK:
        _USES[name] += 1
        return f"ddb_jax/{name}#{_USES[name]}"


def barrier(name: str) -> None:
    """Every process of the job past ``name``; a no-op for one process."""
    if jax.process_count() > 1:
        _client().wait_at_barrier(_numbered(name), WAVE_BARRIER_TIMEOUT_MS)


def announce_stop() -> None:
    """Tells every process of the job that this one was asked to stop (SIGTERM)."""
    if jax.process_count() > 1:
        _client().key_value_set(f"{STOP_KEY_DIR}{jax.process_index()}", "1", allow_overwrite=True)


def stop_announced() -> bool:
    """Whether any process of the job has announced a stop."""
    if jax.process_count() == 1:
        return False
    return bool(_client().key_value_dir_get(STOP_KEY_DIR))
