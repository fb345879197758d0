"""Multi-host settings (flags, environment, clusters) and per-host evaluation slices.

Runs with real processes are tests/test_processes.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from ddb_jax.runtime import distributed
from input_pipeline import evaluation
from tests.support import tiny_stage

# --- settings ---------------------------------------------------------------------------


def test_single_process_needs_nothing():
    assert distributed.resolve("auto", environ={}) is None
    assert distributed.resolve("off", "localhost:1234", 2, 0, environ={}) is None


def test_flags_win_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve(environ=env) == distributed.Settings("h:1", 4, 3)
    got = distributed.resolve("auto", "c:9", 2, 1, timeout_s=60, environ=env)
    assert got == distributed.Settings("c:9", 2, 1, 60)


def test_clusters_are_left_to_jax_detection():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "8"}
    assert distributed.resolve(environ=slurm) == distributed.Settings()
    assert distributed.resolve(environ={**slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.resolve("on", environ={}) == distributed.Settings()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("auto", "h:1", None, 0), {}, "needs --num_processes"),
        (("auto", "h", 2, 0), {}, "has no port"),
        (("auto", "h:1", 2, 2), {}, "--process_id=2 is not in 0..1"),
        (("auto", None, None, None), {"JAX_PROCESS_ID": "1"}, "JAX_PROCESS_ID is set but no"),
        (("auto", "h:1", None, None), {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "two"),
        (("maybe", None, None, None), {}, "--distributed='maybe'"),
    ],
)
def test_bad_settings_name_their_source(args, env, needle):
    with pytest.raises(distributed.DistributedConfigError, match=needle.replace("(", r"\(")):
        distributed.resolve(*args, environ=env)


def test_eval_slices_cover_every_file_once(toy_root):
    config = tiny_stage(toy_root)
    names = lambda p, n: [  # noqa: E731
        b["name"][0].decode()
        for b in evaluation.make_eval_dataset(
            config.data, "toy_target", "val", p, n
        ).as_numpy_iterator()
    ]
    whole = names(0, 1)
    slices = [names(p, 2) for p in range(2)]
    assert len(whole) == 5 and [len(s) for s in slices] == [3, 2]
    assert sorted(slices[0] + slices[1]) == sorted(whole)
    with pytest.raises(ValueError, match="process_index=2"):
        evaluation.make_eval_dataset(config.data, "toy_target", "val", 2, 2)


def test_one_process_stage_hosts_are_this_process():
    """A stage on devices 2-5 of this process: one process, its whole slice, sums that are
    the identity, and no barrier to wait at."""
    import jax
    from jax.sharding import Mesh

    from ddb_jax.runtime import hosts

    stage = hosts.Hosts.of(Mesh(np.asarray(jax.devices()[2:6]), ("data",)))
    assert stage.processes == (0,) and (stage.index, stage.count, stage.primary) == (0, 1, 0)
    assert stage.is_primary and stage.is_whole_job
    assert not hosts.is_group(stage) and not hosts.is_group(None)
    assert [d.id for d in stage.local_devices] == [2, 3, 4, 5]
    np.testing.assert_array_equal(stage.gather(np.arange(3)), [[0, 1, 2]])
    assert stage.any(True) and not stage.any(False)
    stage.barrier("nothing to wait for")
    hosts.barrier("nothing to wait for")
    assert not hosts.stop_announced()
