"""Real processes and real signals: preemption, resumption, stages side by side, and
several processes.

The references are r1_cu and r1_ca of the tiny demo pipeline, run in this process one
after the other on four of its eight CPU devices each. One process with eight devices:

- SIGTERM (raised in this process while a stage reads the batch of step 4) makes the stage
  save a checkpoint at the step it is on and stop; the rerun continues from there and ends
  with the parameters of the uninterrupted reference, bit for bit. (The command line's
  exit status 0 after a SIGTERM is checked by the four-process test.)
- The pipeline runs r1_cu and r1_ca at once, each on its own four devices, reading its data
  from and writing its workdir to a bucket (a GCS emulator, tests/support.py); SIGKILL
  during that round loses only the steps since each stage's last periodic checkpoint
  (possibly a save cut off half-way); the rerun finishes both, bit-identical to the
  references: data order and PRNG keys are functions of the step, and a stage computes
  the same on any four devices.

Four processes (one CPU device each, gloo collectives) that share no disk: each has its own
local scratch, data and workdir are in the bucket. The pipeline runs round 1's paths at once
on two processes each (r1_cu on processes 0-1, r1_ca on 2-3: a mesh of two devices, as in
one process with two devices), then their prototypes the same way. A SIGTERM to one process
stops every process, those of a stage at one step, saved together; the rerun finishes, and
each stage's student, evaluation and prototype table equal those of one process with two
devices running the stages one after another on the local disk. These three tests check
what six used to.
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

from ddb_jax import paths
from ddb_jax.offline import prototype_io
from ddb_jax.train import checkpointing, loop, setup
from ddb_jax.train import workdir as workdir_lib
from tests import support
from tests.support import assert_same_leaves, export_leaves

# make test-processes (about 4 minutes of both cores), which .ci/run runs after make test:
# rounds of the pipeline in real processes, kept out of make test's 10-minute budget.
pytestmark = pytest.mark.processes

NUM_STEPS = 40  # a tiny 4-device step takes ~0.1 s: the signal lands before the end
SIGNAL_AT = 4  # the step during which the one-process test sends SIGTERM
STEPS_4P = 10  # two processes run a step in ~0.5 s here (gloo all-reduces)
GROUPS = {"r1_cu": (0, 1), "r1_ca": (2, 3)}  # the processes of each path's stage
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


# Round 1's paths and their prototypes; with four processes of one device each, a path on
# two processes (GROUPS), the two paths at once, then the prototypes likewise.
GROUPED_ROUND = dict(
    stages="r1_cu,r1_ca,r1_proto_cu,r1_proto_ca", baselines=(), batch_size=4,
    num_steps=STEPS_4P, checkpoint_every=1000, eval_every=STEPS_4P, log_every=1,
    image_summary_every=0, **{"prototypes.num_passes": 1, "prototypes.batch_size": 4},
)  # fmt: skip


def grouped_round(root, workdir) -> list[str]:
    return support.stage_command(root, workdir, "pipeline", mesh_devices=0, **GROUPED_ROUND)


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


def test_four_processes_run_a_round_in_two_groups_stop_together_and_equal_one_process(
    toy_root, bucket_toy_root, gcs, tmp_path
):
    # The reference: one process with two devices, the stages one after another.
    one, four = str(tmp_path / "one"), f"{gcs.bucket}/four"
    one_after_another = grouped_round(toy_root, one) + ["--config.concurrent_stages=False"]
    support.run_to_end(one_after_another, str(tmp_path / "one.log"), devices=2)
    # Each process's own local scratch (temporary files, caches): no shared disk.
    scratch = [tmp_path / f"scratch{i}" for i in range(4)]
    for folder in scratch:
        folder.mkdir()

    def launch(tag: str):
        port = support.free_port()
        logs = [str(tmp_path / f"{tag}{i}.log") for i in range(4)]
        procs = [
            support.start(
                grouped_round(bucket_toy_root, four) + support.distributed_flags(port, 4, i),
                log,
                env={"TMPDIR": str(scratch[i]), "HOME": str(scratch[i])},
            )
            for i, log in enumerate(logs)
        ]
        return procs, logs

    # A preemption notice that reaches one host only (process 1, of r1_cu's group): every
    # process stops, those of a group at one step, each group's stage saved at that step.
    procs, logs = launch("first")
    wait_for_step(procs[2], logs[2], 3)
    wait_for_step(procs[1], logs[1], 3)
    procs[1].send_signal(signal.SIGTERM)
    for proc, log in zip(procs, logs, strict=True):
        assert support.finish(proc, log) == 0, support.tail(log)
    stopped = {}
    for name, group in GROUPS.items():
        text = support.tail(logs[group[0]], 10**7)
        running = re.search(rf"{name}: running \(self_training\) on .* of processes (.*)", text)
        assert running and running.group(1) == str(list(group)), text[-3000:]
        (stopped[name],) = {stopped_step(logs[i]) for i in group}
        assert 3 <= stopped[name] < STEPS_4P
        assert latest_checkpoint(f"{four}/{name}") == stopped[name]
    assert not paths.exists(f"{four}/r1_proto_cu/prototypes.npz")

    procs, logs = launch("second")
    for proc, log in zip(procs, logs, strict=True):
        assert support.finish(proc, log) == 0, support.tail(log)
    for name, group in GROUPS.items():
        assert logged_steps(logs[group[0]])[0] == stopped[name] + 1
        # Each group fed its slices of the same global batches over a mesh of two devices:
        # the students are bit-identical to one process's; each host evaluated its slice
        # and the mIoU summed over the group is the same.
        assert_same_leaves(export_leaves(f"{four}/{name}"), export_leaves(f"{one}/{name}"))
        result_one = paths.read_json(f"{one}/{name}/result.json")
        result_four = paths.read_json(f"{four}/{name}/result.json")
        assert result_one == result_four and np.isfinite(result_one["miou"])
        # Written by the group's first process only: one TensorBoard file per launch (two),
        # the checkpoints of the stop and of the end.
        events = [f for f in paths.listdir(f"{four}/{name}") if f.startswith("events.out")]
        assert len(events) == 2
        checkpoints = sorted(paths.listdir(f"{four}/{name}/checkpoints"), key=int)
        assert checkpoints == [str(stopped[name]), str(STEPS_4P)]
    # Prototypes, the next wave, also in two groups: each host fed its slice of every batch;
    # the running mean over the gathered batch equals the one-process table.
    for path in ("cu", "ca"):
        table_1, counts_1 = prototype_io.load_prototypes(
            f"{one}/r1_proto_{path}/prototypes.npz", 19
        )
        table_4, counts_4 = prototype_io.load_prototypes(
            f"{four}/r1_proto_{path}/prototypes.npz", 19
        )
        assert counts_1.sum() > 0
        np.testing.assert_array_equal(counts_1, counts_4)
        np.testing.assert_allclose(table_1, table_4, rtol=1e-5, atol=1e-6)
