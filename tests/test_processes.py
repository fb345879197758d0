"""Real processes and real signals: preemption, resumption, stages side by side, and
several processes.

The references are r1_cu and r1_ca of the tiny demo pipeline, run in this process one
after the other on four of its eight CPU devices each. One process with eight devices:

- SIGTERM (raised in this process while a stage reads the batch of step 4) makes the stage
  save a checkpoint at the step it is on and stop; the rerun continues from there and ends
  with the parameters of the uninterrupted reference, bit for bit. (The command line's
  exit status 0 after a SIGTERM is checked by the two-process test.)
- The pipeline runs r1_cu and r1_ca at once, each on its own four devices, reading its data
  from and writing its workdir to a bucket (a GCS emulator, tests/support.py); SIGKILL
  during that round loses only the steps since each stage's last periodic checkpoint
  (possibly a save cut off half-way); the rerun finishes both, bit-identical to the
  references: data order and PRNG keys are functions of the step, and a stage computes
  the same on any four devices.

Two processes (one CPU device each, gloo collectives, the same two-device mesh as one
process with two devices) that share no disk: each has its own local scratch, data and
workdir are in the bucket. The pipeline's r1_cu and r1_proto_cu stages; a SIGTERM to one
process stops both at one step, saved together; the rerun finishes and its student,
evaluation and prototype table equal those of one process with both devices on the local
disk. These three tests check what six used to.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import jax
import numpy as np
import pytest

from ddb_jax import paths, prototype_io
from ddb_jax.train import checkpointing, loop, setup
from ddb_jax.train import workdir as workdir_lib
from tests import support
from tests.support import assert_same_leaves, export_leaves

NUM_STEPS = 40  # a tiny 4-device step takes ~0.1 s: the signal lands before the end
SIGNAL_AT = 4  # the step during which the one-process test sends SIGTERM
STEPS_2P = 16  # two processes run a step in ~0.5 s here (gloo all-reduces)
STEP_LINE = re.compile(r"\] \[(\d+)\] .*loss=")
# The stages of the one-process tests: batch 4 over four devices, a checkpoint every 8 steps.
EVERY = 8
STAGE_KEYS = dict(batch_size=4, num_steps=NUM_STEPS, checkpoint_every=EVERY, eval_every=0,
                  log_every=1, image_summary_every=0)  # fmt: skip


def concurrent_round(root, workdir) -> list[str]:
    """The pipeline's r1_cu and r1_ca, at once on four devices each."""
    return support.stage_command(
        root, workdir, "pipeline", stages="r1_cu,r1_ca", baselines="()", mesh_devices=0,
        **STAGE_KEYS,
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
def references(toy_root, tmp_path_factory):
    """{stage: exported leaves} of r1_cu and r1_ca run one after the other, in this process,
    each on the four devices the concurrent round gives it (the same configs the tests'
    subprocesses run; on the same devices their compiled steps are the subprocesses' too:
    the compilation cache's key holds the devices)."""
    out = {}
    for name, devices in (("r1_cu", jax.devices()[:4]), ("r1_ca", jax.devices()[4:8])):
        workdir = str(tmp_path_factory.mktemp("references") / name)
        config = support.tiny_stage(toy_root, name, mesh_devices=4, **STAGE_KEYS)
        loop.train_and_evaluate(config, workdir, devices=devices)
        out[name] = export_leaves(workdir)
    return out


def test_sigterm_saves_the_current_step_and_resumes_identically(
    toy_root, tmp_path, references, monkeypatch
):
    # One process: a real SIGTERM to this process (pytest runs tests in its main thread,
    # where the stage installs its handler) while the batch of step SIGNAL_AT is read.
    assert threading.current_thread() is threading.main_thread()
    config = support.tiny_stage(toy_root, "r1_cu", mesh_devices=4,
                                **{**STAGE_KEYS, "checkpoint_every": 1000})  # fmt: skip
    workdir, starts = str(tmp_path / "run"), []
    batch_stream = setup.batch_stream

    def stream(signal_at: int | None):
        def make(cfg, mesh):
            batches = batch_stream(cfg, mesh)

            def from_step(start: int):
                starts.append(start)
                for step, batch in enumerate(batches(start), start + 1):
                    if step == signal_at:
                        signal.raise_signal(signal.SIGTERM)
                    yield batch

            return from_step

        return make

    monkeypatch.setattr(setup, "batch_stream", stream(SIGNAL_AT))
    _, result = loop.train_and_evaluate(config, workdir)
    assert result is None  # stopped on request
    assert latest_checkpoint(workdir) == SIGNAL_AT  # no periodic save: the step it was on
    assert not os.path.exists(os.path.join(workdir, workdir_lib.EXPORT_DIR))

    monkeypatch.setattr(setup, "batch_stream", stream(None))
    loop.train_and_evaluate(config, workdir)
    assert starts == [0, SIGNAL_AT]  # continued, not restarted
    assert_same_leaves(export_leaves(workdir), references["r1_cu"])


def test_sigkill_during_a_concurrent_round_in_a_bucket_resumes_identically(
    bucket_toy_root, gcs, tmp_path, references
):
    workdir, log = f"{gcs.bucket}/concurrent", str(tmp_path / "first.log")
    proc = support.start(concurrent_round(bucket_toy_root, workdir), log, devices=8)
    # Logged step 2 * EVERY + 1: the save of step 2 * EVERY has started, so (a save waits for
    # the one before it) the save of step EVERY is complete.
    last = wait_for_step(proc, log, 2 * EVERY + 1)
    proc.send_signal(signal.SIGKILL)
    assert support.finish(proc, log) == -signal.SIGKILL
    text = support.tail(log, 10**7)
    assert "r1_cu: running (self_training) on devices [0, 1, 2, 3]" in text
    assert "r1_ca: running (self_training) on devices [4, 5, 6, 7]" in text
    # Each stage: a periodic checkpoint (every EVERY steps; the newest save may have been cut
    # off), never one of a step that was not trained; neither finished.
    latest = {}
    for name in ("r1_cu", "r1_ca"):
        latest[name] = latest_checkpoint(f"{workdir}/{name}")
        assert latest[name] is None or latest[name] % EVERY == 0, latest
        assert (latest[name] or 0) <= logged_steps(log)[-1] and last <= NUM_STEPS
        assert not paths.exists(paths.join(workdir, name, workdir_lib.EXPORT_DIR))
    assert any(latest.values())

    log2 = str(tmp_path / "second.log")
    support.run_to_end(concurrent_round(bucket_toy_root, workdir), log2, devices=8)
    assert min(logged_steps(log2)) == min(s or 0 for s in latest.values()) + 1
    for name in ("r1_cu", "r1_ca"):
        assert_same_leaves(export_leaves(f"{workdir}/{name}"), references[name])


def test_two_processes_stop_together_and_equal_one_process_with_two_devices(
    toy_root, bucket_toy_root, gcs, tmp_path
):
    one, two = str(tmp_path / "one"), f"{gcs.bucket}/two"
    support.run_to_end(two_device_pipeline(toy_root, one), str(tmp_path / "one.log"), devices=2)
    # Each process's own local scratch (temporary files, caches): no shared disk.
    scratch = [tmp_path / f"scratch{i}" for i in range(2)]
    for folder in scratch:
        folder.mkdir()

    def both(tag: str):
        port = support.free_port()
        logs = [str(tmp_path / f"{tag}{i}.log") for i in range(2)]
        procs = [
            support.start(
                two_device_pipeline(bucket_toy_root, two) + support.distributed_flags(port, 2, i),
                log,
                env={"TMPDIR": str(scratch[i]), "HOME": str(scratch[i])},
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
    assert latest_checkpoint(f"{two}/r1_cu") == stopped
    assert not paths.exists(f"{two}/r1_proto_cu/prototypes.npz")

    procs, logs = both("second")
    for proc, log in zip(procs, logs, strict=True):
        assert support.finish(proc, log) == 0, support.tail(log)
    assert logged_steps(logs[0])[0] == stopped + 1

    # Every host fed its slice of the same global batches over the same mesh: the students
    # are bit-identical; each host evaluated its slice and the gathered mIoU is the same.
    assert_same_leaves(export_leaves(f"{two}/r1_cu"), export_leaves(f"{one}/r1_cu"))
    result_one = paths.read_json(f"{one}/r1_cu/result.json")
    result_two = paths.read_json(f"{two}/r1_cu/result.json")
    assert result_one == result_two and np.isfinite(result_one["miou"])
    # Written by process 0 only: one TensorBoard file per launch (two), the checkpoints of
    # the stop and of the end.
    events = [f for f in paths.listdir(f"{two}/r1_cu") if f.startswith("events.out")]
    assert len(events) == 2
    checkpoints = sorted(paths.listdir(f"{two}/r1_cu/checkpoints"), key=int)
    assert checkpoints == [str(stopped), str(STEPS_2P)]
    # Prototypes: each host fed its slice of every batch; the running mean over the gathered
    # batch equals the one-process table (written once, by host 0).
    table_1, counts_1 = prototype_io.load_prototypes(f"{one}/r1_proto_cu/prototypes.npz", 19)
    table_2, counts_2 = prototype_io.load_prototypes(f"{two}/r1_proto_cu/prototypes.npz", 19)
    assert counts_1.sum() > 0
    np.testing.assert_array_equal(counts_1, counts_2)
    np.testing.assert_allclose(table_1, table_2, rtol=1e-5, atol=1e-6)
