"""Real processes and real signals: preemption, resumption and several processes.

One process: SIGTERM makes the stage save a checkpoint at the step it is on and exit 0;
the rerun finishes with the parameters of an uninterrupted run, bit for bit. SIGKILL loses
only the steps since the last periodic checkpoint (possibly a save cut off half-way), and
the rerun again ends bit-identical: data order and PRNG keys are functions of the step.

Two processes (one CPU device each, gloo collectives, the same two-device mesh as one
process with two devices): the pipeline's r1_cu and r1_proto_cu stages; a SIGTERM to one
process stops both at one step, saved together; the rerun finishes and its student,
evaluation and prototype table equal those of one process with both devices. This one
test checks what two used to: multi-process training and evaluation equal one process,
and a preemption notice that reaches one host only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import numpy as np
import pytest

from ddb_jax import prototype_io
from ddb_jax.train import checkpointing
from ddb_jax.train import workdir as workdir_lib
from tests import support
from tests.support import assert_same_leaves, export_leaves

NUM_STEPS = 100  # tiny steps take milliseconds: the signal must land before the run ends
STEPS_2P = 24  # two processes run a step in ~0.5 s here (gloo all-reduces)
STEP_LINE = re.compile(r"\] \[(\d+)\] .*loss=")


def stage(root, workdir, checkpoint_every: int) -> list[str]:
    return support.stage_command(
        root, workdir, "r1_cu", batch_size=2, mesh_devices=1, num_steps=NUM_STEPS,
        checkpoint_every=checkpoint_every, eval_every=0, log_every=1, image_summary_every=0,
    )  # fmt: skip


def two_device_pipeline(root, workdir) -> list[str]:
    """r1_cu then r1_proto_cu of the demo pipeline over a two-device mesh."""
    return support.stage_command(
        root, workdir, "pipeline", stages="r1_cu,r1_proto_cu", baselines="()", batch_size=4,
        mesh_devices=0, num_steps=STEPS_2P, checkpoint_every=1000, eval_every=STEPS_2P,
        log_every=1, image_summary_every=0,
        **{"prototypes.num_passes": 1, "prototypes.batch_size": 4},
    )  # fmt: skip


def logged_steps(log: str) -> list[int]:
    with open(log) as f:
        return [int(m.group(1)) for m in STEP_LINE.finditer(f.read())]


def stopped_step(log: str) -> int:
    with open(log) as f:
        return int(re.search(r"stopped at step (\d+) on request", f.read()).group(1))


def wait_for_step(proc, log: str, step: int) -> int:
    """Polls the log until ``step`` has been logged; returns the last step logged."""
    deadline = time.monotonic() + support.TIMEOUT_S
    while time.monotonic() < deadline:
        steps = logged_steps(log)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before step {step}:\n{support.tail(log)}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"step {step} not reached in {support.TIMEOUT_S}s")


def latest_checkpoint(workdir) -> int | None:
    return checkpointing.Checkpoints(str(workdir), 3).manager.latest_step()


@pytest.fixture(scope="module")
def straight(toy_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    support.run_to_end(stage(toy_root, workdir, 4), f"{workdir}.log")
    return export_leaves(workdir)


def test_sigterm_saves_the_current_step_and_resumes_identically(toy_root, tmp_path, straight):
    workdir, log = tmp_path / "run", str(tmp_path / "first.log")
    proc = support.start(stage(toy_root, workdir, 1000), log)  # no periodic checkpoint
    wait_for_step(proc, log, 3)
    proc.send_signal(signal.SIGTERM)
    assert support.finish(proc, log) == 0, support.tail(log)
    stopped = stopped_step(log)
    assert 3 <= stopped < NUM_STEPS
    assert latest_checkpoint(workdir) == stopped
    assert not os.path.exists(workdir / workdir_lib.EXPORT_DIR)

    log2 = str(tmp_path / "second.log")
    support.run_to_end(stage(toy_root, workdir, 1000), log2)
    assert logged_steps(log2)[0] == stopped + 1  # continued, not restarted
    assert_same_leaves(export_leaves(workdir), straight)


def test_sigkill_loses_only_steps_since_the_last_checkpoint(toy_root, tmp_path, straight):
    workdir, log = tmp_path / "run", str(tmp_path / "first.log")
    proc = support.start(stage(toy_root, workdir, 4), log)
    last = wait_for_step(proc, log, 9)
    proc.send_signal(signal.SIGKILL)
    assert support.finish(proc, log) == -signal.SIGKILL
    # A periodic checkpoint (every 4 steps; the newest save may have been cut off), never
    # one of a step that was not trained, and the run did not finish.
    latest = latest_checkpoint(workdir)
    assert latest is not None and latest % 4 == 0 and 4 <= latest < NUM_STEPS
    assert last <= logged_steps(log)[-1] and latest <= logged_steps(log)[-1]
    assert not os.path.exists(workdir / workdir_lib.EXPORT_DIR)

    log2 = str(tmp_path / "second.log")
    support.run_to_end(stage(toy_root, workdir, 4), log2)
    assert logged_steps(log2)[0] == latest + 1
    assert_same_leaves(export_leaves(workdir), straight)


def test_two_processes_stop_together_and_equal_one_process_with_two_devices(toy_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    support.run_to_end(two_device_pipeline(toy_root, one), str(tmp_path / "one.log"), devices=2)

    def both(tag: str):
        port = support.free_port()
        logs = [str(tmp_path / f"{tag}{i}.log") for i in range(2)]
        procs = [
            support.start(
                two_device_pipeline(toy_root, two) + support.distributed_flags(port, 2, i), log
            )
            for i, log in enumerate(logs)
        ]
        return procs, logs

    # A preemption notice that reaches one host only: both stop at one step and save it.
    procs, logs = both("first")
    wait_for_step(procs[1], logs[1], 3)
    procs[1].send_signal(signal.SIGTERM)
    for proc, log in zip(procs, logs, strict=True):
        assert support.finish(proc, log) == 0, support.tail(log)
    stopped = {stopped_step(log) for log in logs}
    assert len(stopped) == 1, stopped
    (stopped,) = stopped
    assert 3 <= stopped < STEPS_2P
    assert latest_checkpoint(two / "r1_cu") == stopped
    assert not os.path.exists(two / "r1_proto_cu")

    procs, logs = both("second")
    for proc, log in zip(procs, logs, strict=True):
        assert support.finish(proc, log) == 0, support.tail(log)
    assert logged_steps(logs[0])[0] == stopped + 1

    # Every host fed its slice of the same global batches over the same mesh: the students
    # are bit-identical; each host evaluated its slice and the gathered mIoU is the same.
    assert_same_leaves(export_leaves(two / "r1_cu"), export_leaves(one / "r1_cu"))
    with open(one / "r1_cu" / "result.json") as a, open(two / "r1_cu" / "result.json") as b:
        result_one, result_two = json.load(a), json.load(b)
    assert result_one == result_two and np.isfinite(result_one["miou"])
    # Written by process 0 only: one TensorBoard file per launch (two), the checkpoints of
    # the stop and of the end.
    events = [f for f in os.listdir(two / "r1_cu") if f.startswith("events.out")]
    assert len(events) == 2
    assert sorted(os.listdir(two / "r1_cu" / "checkpoints"), key=int) == [
        str(stopped),
        str(STEPS_2P),
    ]
    # Prototypes: each host fed its slice of every batch; the running mean over the gathered
    # batch equals the one-process table (written once, by host 0).
    table_1, counts_1 = prototype_io.load_prototypes(str(one / "r1_proto_cu/prototypes.npz"), 19)
    table_2, counts_2 = prototype_io.load_prototypes(str(two / "r1_proto_cu/prototypes.npz"), 19)
    assert counts_1.sum() > 0
    np.testing.assert_array_equal(counts_1, counts_2)
    np.testing.assert_allclose(table_1, table_2, rtol=1e-5, atol=1e-6)
