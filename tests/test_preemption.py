"""Preemption with real processes and signals.

SIGTERM: the stage saves a checkpoint at the step it is on and exits 0; a rerun finishes
with the params of an uninterrupted run, bit for bit. SIGKILL: only the steps since the
last periodic checkpoint are lost (possibly a save cut off half-way), and the rerun again
ends bit-identical: data order and PRNG keys are functions of the step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from ddb_jax import checkpoints
from ddb_jax.train import loop
from input_pipeline import toy
from tests.test_multihost import free_port, toy_stage_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 100  # tiny steps can take ~10 ms: the signal must land before the run ends
STEPS_2P = 24  # two processes agree on the stop flag every step over gloo (~0.7 s a step here)
TIMEOUT_S = 600
STEP_LINE = re.compile(r"\] \[(\d+)\] .*loss=")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "8", "--num-val", "2"])
    return root


def command(
    root, workdir, checkpoint_every: int, steps: int = NUM_STEPS, mesh_devices: int = 1
) -> list[str]:
    return toy_stage_command(
        root, workdir, batch_size=2, mesh_devices=mesh_devices, num_steps=steps,
        checkpoint_every=checkpoint_every, eval_every=0, log_every=1,
    )  # fmt: skip


ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    TF_CPP_MIN_LOG_LEVEL="2",
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One compile for the module's five runs: the same program, the same executable."""
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    del ENV["JAX_COMPILATION_CACHE_DIR"]


def start(cmd: list[str], log: str, devices: int = 1) -> subprocess.Popen:
    env = dict(ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out)


def finish(proc: subprocess.Popen, log: str) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{log}: no exit within {TIMEOUT_S}s")


def logged_steps(log: str) -> list[int]:
    with open(log) as f:
        return [int(m.group(1)) for m in STEP_LINE.finditer(f.read())]


def stopped_step(log: str) -> int:
    return int(re.search(r"stopped at step (\d+) on request", open(log).read()).group(1))


def wait_for_step(proc: subprocess.Popen, log: str, step: int) -> int:
    """Polls the log until ``step`` has been logged; returns the last step logged."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        steps = logged_steps(log)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before step {step}:\n{open(log).read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"step {step} not reached in {TIMEOUT_S}s")


def run_to_end(cmd: list[str], log: str, devices: int = 1) -> None:
    proc = start(cmd, log, devices)
    assert finish(proc, log) == 0, open(log).read()[-3000:]


def export_leaves(workdir) -> list[np.ndarray]:
    variables, _ = checkpoints.load_model_dir(os.path.join(workdir, loop.EXPORT_DIR))
    return jax.tree_util.tree_leaves(variables)


@pytest.fixture(scope="module")
def straight(toy_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    run_to_end(command(toy_root, workdir, 4), f"{workdir}.log")
    return export_leaves(workdir)


def assert_same(leaves, reference) -> None:
    assert len(leaves) == len(reference) > 0
    for a, b in zip(leaves, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_current_step_and_resumes_identically(toy_root, tmp_path, straight):
    workdir, log = tmp_path / "run", str(tmp_path / "first.log")
    proc = start(command(toy_root, workdir, 1000), log)  # no periodic checkpoint before the end
    wait_for_step(proc, log, 3)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == 0, open(log).read()[-3000:]
    stopped = stopped_step(log)
    assert 3 <= stopped < NUM_STEPS
    assert loop.make_checkpoint_manager(str(workdir), 3).latest_step() == stopped
    assert not os.path.exists(workdir / loop.EXPORT_DIR)

    log2 = str(tmp_path / "second.log")
    run_to_end(command(toy_root, workdir, 1000), log2)
    assert logged_steps(log2)[0] == stopped + 1  # continued, not restarted
    assert_same(export_leaves(workdir), straight)


def test_sigkill_loses_only_steps_since_the_last_checkpoint(toy_root, tmp_path, straight):
    workdir, log = tmp_path / "run", str(tmp_path / "first.log")
    proc = start(command(toy_root, workdir, 4), log)
    last = wait_for_step(proc, log, 9)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc, log) == -signal.SIGKILL
    # A periodic checkpoint (every 4 steps; the newest save may have been cut off), never
    # one of a step that was not trained, and the run did not finish.
    latest = loop.make_checkpoint_manager(str(workdir), 3).latest_step()
    assert latest is not None and latest % 4 == 0 and 4 <= latest < NUM_STEPS
    assert last <= logged_steps(log)[-1] and latest <= logged_steps(log)[-1]
    assert not os.path.exists(workdir / loop.EXPORT_DIR)

    log2 = str(tmp_path / "second.log")
    run_to_end(command(toy_root, workdir, 4), log2)
    assert logged_steps(log2)[0] == latest + 1
    assert_same(export_leaves(workdir), straight)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(toy_root, tmp_path):
    """A preemption notice may reach one host only: both hosts stop at the same step,
    save it together, and the rerun ends as one process with both devices would."""
    reference = tmp_path / "one"
    run_to_end(command(toy_root, reference, 1000, STEPS_2P, 0), f"{reference}.log", devices=2)

    workdir = tmp_path / "two"

    def both(tag: str) -> tuple[list[subprocess.Popen], list[str]]:
        port = free_port()
        logs = [str(tmp_path / f"{tag}{i}.log") for i in range(2)]
        procs = [
            start(
                command(toy_root, workdir, 1000, STEPS_2P, 0)
                + [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
                + [f"--process_id={i}"],
                log,
            )
            for i, log in enumerate(logs)
        ]
        return procs, logs

    procs, logs = both("first")
    wait_for_step(procs[1], logs[1], 3)
    procs[1].send_signal(signal.SIGTERM)
    for proc, log in zip(procs, logs, strict=True):
        assert finish(proc, log) == 0, open(log).read()[-3000:]
    stopped = {stopped_step(log) for log in logs}
    assert len(stopped) == 1, stopped
    (stopped,) = stopped
    assert 3 <= stopped < STEPS_2P
    assert loop.make_checkpoint_manager(str(workdir), 3).latest_step() == stopped

    procs, logs = both("second")
    for proc, log in zip(procs, logs, strict=True):
        assert finish(proc, log) == 0, open(log).read()[-3000:]
    assert logged_steps(logs[0])[0] == stopped + 1
    assert_same(export_leaves(workdir), export_leaves(reference))
