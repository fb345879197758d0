"""Faults a real bucket gives, injected by a proxy (tests/fault_proxy.py) between the runs and
a GCS emulator: throttling (429) and unavailability (503) answered now and then, responses
that stall for seconds, and storage that stops answering at a chosen moment (the export of a
model, the prototype stage's reads, the writes of predictions). A fault that recovers within
the retry budget leaves the run's result bit-identical to an undisturbed run; one that does
not ends the process within the storage deadline in one ``error:`` line, exit 1, with the
last complete checkpoint intact, and the rerun finishes as the undisturbed run did (issue 25).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from tests.fault_proxy import FaultProxy
from tests.storage_support import (
    BUCKET,
    DEADLINE_S,
    MARGIN_S,
    RUN_TIMEOUT_S,
    STAGE,
    api,
    complete_checkpoints,
    ended_bounded,
    fetch_tree,
    names,
    needs_emulator,
    one_error_line,
    run_stage,
    storage_env,
    wait,
    wait_for,
)
from tests.support import (
    assert_same_leaves,
    distributed_flags,
    export_leaves,
    free_port,
    stage_command,
    start,
    tail,
)

RIDE_OUT_S = 60  # the deadline of runs whose faults recover: never reached by a blip


@pytest.fixture
def proxy(emulator):
    proxy = FaultProxy(emulator.url).start()
    yield proxy
    proxy.stop()


def exported(url: str, workdir: str, local) -> list:
    fetch_tree(url, f"{workdir}/export", str(local / workdir / "export"))
    return export_leaves(local / workdir)


@pytest.mark.faults
@needs_emulator
def test_throttling_unavailability_and_stalls_that_recover_leave_the_run_unchanged(
    emulator, proxy, tmp_path
):
    reference_log = str(tmp_path / "reference.log")
    reference = run_stage(emulator.url, "reference", reference_log)
    assert wait(reference, reference_log, RUN_TIMEOUT_S) == 0, tail(reference_log)

    rules = [
        proxy.inject("503", every=5, count=8),
        proxy.inject("429", every=7, count=6),
        proxy.inject("stall:2", every=11, count=4),
    ]
    log = str(tmp_path / "blips.log")
    proc = run_stage(proxy.url, "blips", log, deadline_s=RIDE_OUT_S)
    assert wait(proc, log, RUN_TIMEOUT_S) == 0, tail(log)
    assert [rule.applied for rule in rules] == [8, 6, 4], "the faults did not all happen"
    with open(log) as f:
        assert "Traceback" not in f.read(), tail(log)  # retries stay off the console
    assert_same_leaves(
        exported(emulator.url, "blips", tmp_path), exported(emulator.url, "reference", tmp_path)
    )


def fault_then_rerun(proxy, workdir: str, log_dir, fault: str, run=run_stage, **where) -> str:
    """A run through the proxy with ``fault`` (proxy.inject's ``where``), which must end
    within the deadline in one line, exit 1; then the fault is cleared and the same run
    finishes (exit 0). Returns the error line."""
    rule = proxy.inject(fault, **where)
    log = str(log_dir / f"{workdir}-{fault}.log")
    proc = run(proxy.url, workdir, log)
    wait_for(lambda: rule.applied, proc, log, seen=proxy.seen)
    error = ended_bounded(proc, log, time.monotonic())
    proxy.clear()
    log = str(log_dir / f"{workdir}-rerun.log")
    rerun = run(proxy.url, workdir, log)
    assert wait(rerun, log, RUN_TIMEOUT_S) == 0, tail(log)
    return error


@pytest.mark.faults
@needs_emulator
def test_storage_lost_while_exporting_best_or_export_ends_in_one_line_then_the_rerun_exports(
    emulator, proxy, tmp_path
):
    """best/ (hangs: accepted, never answered) and export/ (503 on every request from its
    first on, which outlasts the retries): each run ends in one line; the rerun's model is
    the undisturbed run's."""
    settings = {"eval_every": 6}

    def run(url, workdir, log):
        return run_stage(url, workdir, log, **settings)

    reference_log = str(tmp_path / "reference.log")
    assert wait(run(emulator.url, "reference", reference_log), reference_log, RUN_TIMEOUT_S) == 0
    want = exported(emulator.url, "reference", tmp_path)

    error = fault_then_rerun(
        proxy, "lost_best", tmp_path, "hang", run, trigger=("POST", "lost_best/best/")
    )
    assert f"gs://{BUCKET}/lost_best" in error and "did not answer" in error, error
    assert_same_leaves(exported(emulator.url, "lost_best", tmp_path), want)

    error = fault_then_rerun(
        proxy, "lost_export", tmp_path, "503", run, trigger=("POST", "lost_export/export/")
    )
    assert f"gs://{BUCKET}/lost_export" in error, error
    assert_same_leaves(exported(emulator.url, "lost_export", tmp_path), want)


@pytest.mark.faults
@needs_emulator
def test_storage_lost_during_the_prototype_stage_ends_in_one_line_then_the_rerun_matches(
    emulator, proxy, tmp_path
):
    log = str(tmp_path / "model.log")
    assert wait(run_stage(emulator.url, "model", log, num_steps=2), log, RUN_TIMEOUT_S) == 0

    def prototypes(url, workdir, log):
        return run_stage(url, workdir, log, stage="r1_proto_cu",
                         checkpoint=f"gs://{BUCKET}/model/export")  # fmt: skip

    log = str(tmp_path / "reference.log")
    assert wait(prototypes(emulator.url, "reference", log), log, RUN_TIMEOUT_S) == 0
    # The stage's image reads (object downloads under data/) stop being answered after ten.
    error = fault_then_rerun(
        proxy, "proto", tmp_path, "hang", prototypes, match=("alt=media", "data/"),
        after=10,
    )  # fmt: skip
    assert "did not answer" in error and "checkpoint" not in error, error
    table = {}
    for workdir in ("reference", "proto"):
        fetch_tree(emulator.url, workdir, str(tmp_path / "fetched" / workdir))
        with np.load(tmp_path / "fetched" / workdir / "prototypes.npz") as stored:
            table[workdir] = {k: stored[k] for k in stored.files}
    assert table["proto"].keys() == table["reference"].keys()
    for key, value in table["reference"].items():
        np.testing.assert_array_equal(table["proto"][key], value)


@pytest.mark.faults
@needs_emulator
def test_storage_lost_while_predict_writes_ends_in_one_line_then_the_rerun_writes_all(
    emulator, proxy, tmp_path
):
    log = str(tmp_path / "model.log")
    assert wait(run_stage(emulator.url, "model", log, num_steps=2), log, RUN_TIMEOUT_S) == 0
    images = f"gs://{BUCKET}/data/toy/cityscapes/leftImg8bit/val"

    def predict(url, out, log):
        command = [sys.executable, "tools/predict.py", f"gs://{BUCKET}/model/export", images,
                   "--out", f"gs://{BUCKET}/{out}", "--no-progress"]  # fmt: skip
        return start(command, log, env=storage_env(url))

    error = fault_then_rerun(
        proxy, "preds", tmp_path, "hang", predict, match="preds/", trigger=("POST", "preds/color/"),
    )  # fmt: skip
    assert f"gs://{BUCKET}/preds" in error and "did not answer" in error, error
    written = [n for n in names(emulator.url, "preds/color/") if n.endswith(".png")]
    assert len(written) == 5, written


def two_process_job(urls: list[str], workdir: str, logs: list[str]) -> list:
    """A tiny stage on two processes of one CPU device each (gloo); process i's storage at
    ``urls[i]``."""
    port = free_port()
    procs = []
    for index, (url, log) in enumerate(zip(urls, logs, strict=True)):
        command = stage_command(
            f"gs://{BUCKET}/data", f"gs://{BUCKET}/{workdir}", "r1_cu", **STAGE, mesh_devices=0
        ) + distributed_flags(port, 2, index)  # fmt: skip
        procs.append(start(command, log, env=storage_env(url)))
    return procs


@pytest.mark.faults
@needs_emulator
def test_one_host_of_two_losing_its_storage_ends_the_job_in_bounded_time(emulator, proxy, tmp_path):
    """The second process of a two-process job reaches the bucket through the proxy; once a
    checkpoint is complete, its reads of the training images stop being answered while the
    first process goes on to the next step's gradient all-reduce. The second ends in one
    line within the deadline; the first, its peer gone, ends too, within the deadline's
    margin of it; the rerun resumes both to the model of an undisturbed run (one process,
    two devices: the same program)."""
    log = str(tmp_path / "reference.log")
    reference = run_stage(emulator.url, "reference", log, mesh_devices=0)
    reference = start(reference.args, log, devices=2, env=storage_env(emulator.url))
    assert wait(reference, log, RUN_TIMEOUT_S) == 0, tail(log)

    logs = [str(tmp_path / f"process{i}.log") for i in range(2)]
    procs = two_process_job([emulator.url, proxy.url], "job", logs)
    wait_for(lambda: complete_checkpoints(emulator.url, "job"), procs[1], logs[1])
    rule = proxy.inject("hang", match=("alt=media", "data/"))
    wait_for(lambda: rule.applied, procs[1], logs[1], seen=proxy.seen)
    since = time.monotonic()
    error = ended_bounded(procs[1], logs[1], since)
    assert f"gs://{BUCKET}/data" in error and "did not answer" in error, error
    status = wait(procs[0], logs[0], DEADLINE_S + MARGIN_S)
    print(f"the other process: exit {status} {time.monotonic() - since:.1f}s after the fault")
    assert status == 1, tail(logs[0])
    assert time.monotonic() - since < DEADLINE_S + MARGIN_S
    peer_error = one_error_line(logs[0])
    assert peer_error.startswith("error: another process of this job is gone ("), peer_error
    assert "the last complete checkpoint is step" in peer_error, peer_error

    proxy.clear()
    kept = complete_checkpoints(emulator.url, "job")
    logs = [str(tmp_path / f"rerun{i}.log") for i in range(2)]
    for proc, log in zip(
        two_process_job([emulator.url, proxy.url], "job", logs), logs, strict=True
    ):
        assert wait(proc, log, RUN_TIMEOUT_S) == 0, tail(log)
    with open(logs[0]) as f:
        assert f"resumed gs://{BUCKET}/job at step {kept[-1]}" in f.read(), tail(logs[0])
    assert_same_leaves(
        exported(emulator.url, "job", tmp_path), exported(emulator.url, "reference", tmp_path)
    )


@pytest.mark.faults
@needs_emulator
def test_the_converters_reading_a_bucket_that_stops_answering_end_in_one_line(
    emulator, proxy, tmp_path
):
    """tools/convert_checkpoint.py and tools/calc_prototypes.py --from-pth: the download of
    their input hangs; each ends within the deadline in one line naming the file."""
    api(emulator.url, f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name=in%2Fa.pth",
        b"\0" * 64, "POST")  # fmt: skip
    proxy.inject("hang", match="alt=media")
    source = f"gs://{BUCKET}/in/a.pth"
    for tool in (
        ["tools/convert_checkpoint.py", source, f"gs://{BUCKET}/out/model"],
        ["tools/calc_prototypes.py", "--from-pth", source, "--out", f"gs://{BUCKET}/out/p.npz"],
    ):
        log = str(tmp_path / f"{tool[0].split('/')[1]}.log")
        proc = start([sys.executable, *tool], log, env=storage_env(proxy.url))
        error = ended_bounded(proc, log, time.monotonic(), limit_from_start=True)
        assert error.startswith(f"error: storage {source} did not answer"), error
