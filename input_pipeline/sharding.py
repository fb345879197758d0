"""Per-host numpy batches -> global jax Arrays sharded over the 'data' mesh axis."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(axis: str = "data") -> Mesh:
    """1-D mesh over every device of every host."""
    return Mesh(np.asarray(jax.devices()), (axis,))


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, axis: str = "data") -> dict:
    """Each host passes its own slice; the result's leading axis is the global batch.

    Non-numeric leaves (e.g. file names) stay host-local numpy arrays.
    """
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "biuf":
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[key] = value
    return out
