"""The storage deadline (:mod:`ddb_jax.runtime.deadline`) alone, and a training stage whose
bucket goes away: a real GCS emulator (fake-gcs-server on 127.0.0.1) stopped under a run,
which ends within the deadline in one ``error:`` line, exit 1; the emulator restarted on the
same data and port, the rerun resumes from the last complete checkpoint to the parameters
of an undisturbed run (issue 25). Subtler faults (429, 503, stalls, hangs) come from a
proxy: tests/test_storage_fault_injection.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.storage_support import (
    BUCKET,
    RUN_TIMEOUT_S,
    complete_checkpoints,
    ended_bounded,
    fetch_tree,
    needs_emulator,
    run_stage,
    wait,
    wait_for,
)
from tests.support import ROOT, assert_same_leaves, export_leaves, tail


def bounded_wait(body: str, timeout_s: float = 60, **env) -> tuple[int, list[str], float]:
    """Runs ``body`` after ``from ddb_jax.runtime import deadline`` in a fresh Python:
    (status, stderr lines, seconds), hard-killed at ``timeout_s``."""
    code = "import time\nfrom ddb_jax.runtime import deadline\n" + body
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout_s, env={**os.environ, **env},
    )  # fmt: skip
    return done.returncode, done.stderr.splitlines(), time.monotonic() - began


def test_a_wait_past_the_deadline_ends_the_process_in_one_line():
    status, lines, took = bounded_wait(
        "deadline.record_checkpoint('gs://b/run/checkpoints', 4)\n"
        "deadline.record_checkpoint('gs://b/run/checkpoints', None, lambda: 6)\n"
        "with deadline.storage('gs://b/run', 'writing'):\n"
        "    time.sleep(60)\n"
        "print('not reached')\n",
        DDB_JAX_STORAGE_TIMEOUT_S="1",
    )
    assert status == 1 and took < 30, (status, lines)
    assert lines == [
        "error: storage gs://b/run did not answer within 1 s (no answer while writing); "
        "the last complete checkpoint is step 6; rerun to continue"
    ]


def test_a_wait_in_time_or_on_local_disk_is_not_cut_short():
    status, lines, _ = bounded_wait(
        "with deadline.storage('gs://b/run', 'writing'):\n"
        "    time.sleep(0.2)\n"
        "with deadline.storage('/tmp/local', 'writing'):\n"
        "    time.sleep(2)\n"
        "time.sleep(2)\n",  # the native backstop was cancelled
        DDB_JAX_STORAGE_TIMEOUT_S="1",
    )
    assert (status, lines) == (0, [])


def test_a_stream_whose_next_item_does_not_come_ends_in_one_line():
    """Evaluation and prototype batches: each read is bounded, not the whole stream."""
    status, lines, took = bounded_wait(
        "def reads():\n"
        "    for i in range(3):\n"
        "        time.sleep(0.6)  # three reads in time: 1.8 s in all, over the deadline\n"
        "        yield i\n"
        "    time.sleep(60)  # then the storage stops answering\n"
        "    yield 3\n"
        "for item in deadline.bounded(reads(), 'gs://b/data', 'reading val images'):\n"
        "    print(item, flush=True)\n",
        DDB_JAX_STORAGE_TIMEOUT_S="1",
    )
    assert status == 1 and took < 30, (status, lines)
    assert lines == [
        "error: storage gs://b/data did not answer within 1 s (no answer while reading val "
        "images); rerun to continue"
    ], lines


def test_the_native_backstop_ends_a_process_whose_watchdog_cannot_run():
    status, lines, took = bounded_wait(
        "deadline.GRACE_S = 1\n"
        "deadline._POLL_S = 3600  # the Python watchdog never looks\n"
        "with deadline.storage('gs://b/run', 'writing'):\n"
        "    time.sleep(60)\n",
        DDB_JAX_STORAGE_TIMEOUT_S="1",
    )
    assert status == 1 and took < 30, (status, lines)
    assert not any("Thread" in line or "File" in line for line in lines), lines


def test_storage_client_retries_stay_off_the_console():
    status, lines, _ = bounded_wait(
        "import logging\n"
        "from ddb_jax import paths\n"
        "logging.basicConfig()\n"
        "try:\n"
        "    raise OSError('Cannot connect to host')\n"
        "except OSError as err:\n"
        "    logging.getLogger('gcsfs').exception(f'_call retrying after exception: {err}')\n"
        "assert deadline.last_error() == 'Cannot connect to host', deadline.last_error()\n"
    )
    assert (status, lines) == (0, [])


@pytest.mark.faults
@needs_emulator
def test_lost_bucket_ends_in_one_line_and_the_rerun_resumes_to_the_same_model(emulator, tmp_path):
    url = emulator.url
    # The undisturbed run, the reference.
    reference = run_stage(url, "reference", str(tmp_path / "reference.log"))
    assert wait(reference, str(tmp_path / "reference.log"), RUN_TIMEOUT_S) == 0

    # The storage goes away after the first checkpoint.
    log = str(tmp_path / "lost.log")
    proc = run_stage(url, "run", log)
    wait_for(lambda: complete_checkpoints(url, "run"), proc, log)
    emulator.stop()
    error = ended_bounded(proc, log, time.monotonic())
    assert f"gs://{BUCKET}/run" in error, error

    # The storage comes back (same data, same port): the rerun resumes and ends where the
    # undisturbed run did.
    emulator.start()
    kept = complete_checkpoints(url, "run")
    assert kept, "no complete checkpoint survived"
    said = re.search(r"the last complete checkpoint is step (\d+)", error)
    assert said and int(said.group(1)) in kept, (error, kept)
    log = str(tmp_path / "rerun.log")
    rerun = run_stage(url, "run", log)
    assert wait(rerun, log, RUN_TIMEOUT_S) == 0, tail(log)
    with open(log) as f:
        assert f"resumed gs://{BUCKET}/run at step {kept[-1]}" in f.read(), tail(log)
    fetch_tree(url, "run/export", str(tmp_path / "run" / "export"))
    fetch_tree(url, "reference/export", str(tmp_path / "reference" / "export"))
    assert_same_leaves(export_leaves(tmp_path / "run"), export_leaves(tmp_path / "reference"))
