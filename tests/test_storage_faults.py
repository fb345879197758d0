"""Storage lost mid-run, against a real GCS emulator (fake-gcs-server on 127.0.0.1): the run
ends within the storage deadline in one ``error:`` line, exit 1, and the rerun, once the
storage is back, resumes from the last complete checkpoint to the same parameters as an
undisturbed run (issue 25; :mod:`ddb_jax.runtime.deadline`).

Each test has its own emulator (the session's, tests/conftest.py, is shared by other
modules and must not be stopped), restarted on the same data directory and port. Objects
are put and fetched through the emulator's JSON API, so this process's gcsfs is never
pointed at it. Every subprocess has a hard timeout: a regression fails, never hangs.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.support import (
    ROOT,
    GcsEmulator,
    assert_same_leaves,
    emulator_env,
    export_leaves,
    stage_command,
    start,
    tail,
)

DEADLINE_S = 6  # DDB_JAX_STORAGE_TIMEOUT_S of the runs
MARGIN_S = 30  # the deadline's grace, the watchdog's poll and the exit itself, on a busy CPU
RUN_TIMEOUT_S = 300  # a whole tiny stage, hard
BUCKET = "faults"
STAGE = {
    "num_steps": 12, "checkpoint_every": 2, "log_every": 2, "eval_every": 0,
    "image_summary_every": 0, "batch_size": 2,
}  # fmt: skip

LINUX_AMD64 = (platform.system(), platform.machine()) == ("Linux", "x86_64")
needs_emulator = pytest.mark.skipif(
    not LINUX_AMD64, reason="fake-gcs-server ships a linux-amd64 binary only"
)


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


def api(emulator: GcsEmulator, path: str, data: bytes | None = None, method: str = "GET"):
    request = urllib.request.Request(emulator.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def put_tree(emulator: GcsEmulator, local: str, prefix: str) -> None:
    for base, _, files in os.walk(local):
        for name in files:
            path = os.path.join(base, name)
            key = urllib.parse.quote(f"{prefix}/{os.path.relpath(path, local)}", safe="")
            with open(path, "rb") as f:
                api(emulator, f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={key}",
                    f.read(), "POST")  # fmt: skip


def names(emulator: GcsEmulator, prefix: str) -> list[str]:
    found, token = [], ""
    while True:
        query = f"prefix={urllib.parse.quote(prefix, safe='')}" + (
            f"&pageToken={token}" if token else "")  # fmt: skip
        listing = json.loads(api(emulator, f"/storage/v1/b/{BUCKET}/o?{query}"))
        found += [item["name"] for item in listing.get("items", [])]
        token = listing.get("nextPageToken")
        if not token:
            return found


def fetch_tree(emulator: GcsEmulator, prefix: str, local: str) -> str:
    for name in names(emulator, prefix + "/"):
        target = os.path.join(local, os.path.relpath(name, prefix))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        key = urllib.parse.quote(name, safe="")
        with open(target, "wb") as f:
            f.write(api(emulator, f"/storage/v1/b/{BUCKET}/o/{key}?alt=media"))
    return local


@pytest.fixture
def emulator(tmp_path, toy_root):
    emulator = GcsEmulator(tmp_path / "gcs")
    emulator.start()
    emulator.create_bucket(BUCKET)
    put_tree(emulator, str(toy_root), "data")
    yield emulator
    emulator.stop()


def run_stage(emulator, workdir: str, log: str, **overrides) -> subprocess.Popen:
    command = stage_command(f"gs://{BUCKET}/data", f"gs://{BUCKET}/{workdir}", **STAGE,
                            **overrides)  # fmt: skip
    env = {**emulator_env(emulator.url), "DDB_JAX_STORAGE_TIMEOUT_S": str(DEADLINE_S)}
    return start(command, log, env=env)


def wait(proc: subprocess.Popen, log: str, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"no exit within {timeout_s:.0f}s (a hang):\n{tail(log)}")


def complete_checkpoints(emulator, workdir: str) -> list[int]:
    """The steps whose checkpoint orbax committed (on GCS: its commit_success.txt)."""
    prefix = f"{workdir}/checkpoints/"
    steps = [n[len(prefix) :].split("/") for n in names(emulator, prefix)]
    return sorted(int(p[0]) for p in steps if p[0].isdigit() and p[1:] == ["commit_success.txt"])


@pytest.mark.faults
@needs_emulator
def test_lost_bucket_ends_in_one_line_and_the_rerun_resumes_to_the_same_model(emulator, tmp_path):
    # The undisturbed run, the reference.
    reference = run_stage(emulator, "reference", str(tmp_path / "reference.log"))
    assert wait(reference, str(tmp_path / "reference.log"), RUN_TIMEOUT_S) == 0

    # The storage goes away after the first checkpoint.
    log = str(tmp_path / "lost.log")
    proc = run_stage(emulator, "run", log)
    limit = time.monotonic() + RUN_TIMEOUT_S
    while not complete_checkpoints(emulator, "run"):
        assert proc.poll() is None, tail(log)
        assert time.monotonic() < limit, tail(log)
        time.sleep(0.1)
    emulator.stop()
    stopped = time.monotonic()
    status = wait(proc, log, DEADLINE_S + MARGIN_S)
    took = time.monotonic() - stopped
    print(f"storage stopped -> exit {status} in {took:.1f}s")
    with open(log) as f:
        lines = f.read().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert status == 1, tail(log)
    assert len(errors) == 1, errors
    assert f"gs://{BUCKET}/run" in errors[0], errors[0]
    assert not any(line.startswith("Traceback") for line in lines), tail(log)
    assert took < DEADLINE_S + MARGIN_S

    # The storage comes back (same data, same port): the rerun resumes and ends where the
    # undisturbed run did.
    emulator.start()
    kept = complete_checkpoints(emulator, "run")
    assert kept, "no complete checkpoint survived"
    said = re.search(r"the last complete checkpoint is step (\d+)", errors[0])
    assert said and int(said.group(1)) in kept, (errors[0], kept)
    log = str(tmp_path / "rerun.log")
    rerun = run_stage(emulator, "run", log)
    assert wait(rerun, log, RUN_TIMEOUT_S) == 0, tail(log)
    with open(log) as f:
        assert f"resumed gs://{BUCKET}/run at step {kept[-1]}" in f.read(), tail(log)
    fetch_tree(emulator, "run/export", str(tmp_path / "run" / "export"))
    fetch_tree(emulator, "reference/export", str(tmp_path / "reference" / "export"))
    assert_same_leaves(export_leaves(tmp_path / "run"), export_leaves(tmp_path / "reference"))
