"""Multi-host settings (flags, environment, clusters) and per-host evaluation slices.

Runs with real processes are tests/test_processes.py.
"""

from __future__ import annotations

import pytest

from ddb_jax import distributed
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
