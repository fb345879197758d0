"""Multi-host: distributed settings, per-host evaluation slices, and a real 2-process run.

The 2-process test starts two ``python -m ddb_jax.main`` processes on localhost (one CPU
device each, gloo collectives) and one process with two CPU devices: the same global batch
over the same two-device mesh. The exported students must be bit-identical: every host
feeds its contiguous slice of the same global batch, BatchNorm statistics and gradients
are reduced over the same mesh, and the gathered evaluation sums the same confusion counts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddb_jax import checkpoints, distributed, prototype_io
from input_pipeline import evaluation, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900  # a hung collective fails the test instead of hanging `make test`


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "12", "--num-val", "5"])
    return root


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
    from configs import demo_r1_cu

    config = demo_r1_cu.get_config()
    config.data.root = str(toy_root)
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


# --- two real processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def toy_stage_command(root, workdir, **config) -> list[str]:
    """``python -m ddb_jax.main`` on the demo's r1_cu stage with a tiny model on 32x32
    crops; ``config`` adds top-level ``--config.KEY=VALUE`` overrides."""
    return [
        sys.executable, "-m", "ddb_jax.main", "--config=configs/demo_r1_cu.py",
        f"--workdir={workdir}", f"--config.data.root={root}",
        "--config.model.base_channels=8", "--config.model.head_channels=16",
        "--config.model.conv_impl=lax", "--config.data.crop_size=(32,32)",
    ] + [f"--config.{key}={value}" for key, value in config.items()]  # fmt: skip


def stage_args(root, workdir) -> list[str]:
    return toy_stage_command(
        root, workdir, batch_size=4, mesh_devices=0, num_steps=2, checkpoint_every=1,
        eval_every=2, log_every=1,
    )  # fmt: skip


def prototype_args(root, workdir, model: str) -> list[str]:
    """The prototypes stage over the toy target with ``model``: 12 images, one pass."""
    return stage_args(root, workdir) + [
        "--config.stage=prototypes", f"--config.checkpoint={model}",
        "--config.prototypes.num_passes=1", "--config.prototypes.batch_size=4",
    ]  # fmt: skip


def run_processes(commands: list[list[str]], devices: int, logs: list[str]) -> None:
    """Starts every command at once; all must exit 0 within TIMEOUT_S (else all are killed)."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    procs = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out))
    deadline = time.monotonic() + TIMEOUT_S
    # Poll all: the first failure ends the others (they would wait for it in a collective).
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if not failed:
                pytest.fail(f"processes did not finish in {TIMEOUT_S}s (hung collective?): {logs}")
            break
        time.sleep(0.5)
    # A process that failed by itself explains more than a peer killed above (-9).
    ordered = sorted(zip(procs, logs, strict=True), key=lambda pl: pl[0].returncode == -9)
    for proc, log in ordered:
        if proc.returncode != 0:
            tail = open(log).read()[-3000:]
            pytest.fail(f"{' '.join(proc.args)} exited {proc.returncode}:\n{tail}")


def test_two_processes_match_one_process_with_two_devices(toy_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_processes([stage_args(toy_root, one)], 2, [str(tmp_path / "one.log")])
    port = free_port()
    commands = [
        stage_args(toy_root, two)
        + [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
        for i in range(2)
    ]
    run_processes(commands, 1, [str(tmp_path / f"two{i}.log") for i in range(2)])

    a, _ = checkpoints.load_model_dir(str(one / "export"))
    b, _ = checkpoints.load_model_dir(str(two / "export"))
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)
    # Evaluation: each host scored its slice; the gathered mIoU is the one-process figure.
    result_a = json.load(open(one / "result.json"))
    result_b = json.load(open(two / "result.json"))
    assert result_a == result_b and np.isfinite(result_a["miou"])
    # Written once: one TensorBoard file, checkpoints of steps 1 and 2 in one directory.
    assert len([f for f in os.listdir(two) if f.startswith("events.out")]) == 1
    assert sorted(os.listdir(two / "checkpoints")) == ["1", "2"]

    # Prototypes of that student: each host feeds its slice of every batch; the running
    # mean over the gathered batch equals the one-process table (written once, by host 0).
    model = str(one / "export")
    run_processes([prototype_args(toy_root, tmp_path / "p1", model)], 2, [str(tmp_path / "p1.log")])
    port = free_port()
    commands = [
        prototype_args(toy_root, tmp_path / "p2", model)
        + [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
        for i in range(2)
    ]
    run_processes(commands, 1, [str(tmp_path / f"p2_{i}.log") for i in range(2)])
    table_1, counts_1 = prototype_io.load_prototypes(str(tmp_path / "p1/prototypes.npz"), 19)
    table_2, counts_2 = prototype_io.load_prototypes(str(tmp_path / "p2/prototypes.npz"), 19)
    assert counts_1.sum() > 0
    np.testing.assert_array_equal(counts_1, counts_2)
    np.testing.assert_allclose(table_1, table_2, rtol=1e-5, atol=1e-6)
