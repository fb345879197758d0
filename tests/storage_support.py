"""What the storage fault tests share: a bucket of the toy domains on a GCS emulator of the
test's own (restartable), objects put and fetched through the emulator's JSON API (so this
process's gcsfs is never pointed at it), tiny stages run against it with the storage
deadline set short, and hard timeouts on every wait, so a regression fails, never hangs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.support import emulator_env, stage_command, start, tail

DEADLINE_S = 6  # DDB_JAX_STORAGE_TIMEOUT_S of the runs that must end
MARGIN_S = 30  # the deadline's grace, the watchdog's poll and the exit itself, on a busy CPU
RUN_TIMEOUT_S = 300  # a whole tiny stage, hard
STARTUP_S = 30  # a tool's imports before its first request, on a busy CPU
BUCKET = "faults"
STAGE = {
    "num_steps": 12, "checkpoint_every": 2, "log_every": 2, "eval_every": 0,
    "image_summary_every": 0, "batch_size": 2,
}  # fmt: skip

LINUX_AMD64 = (platform.system(), platform.machine()) == ("Linux", "x86_64")
needs_emulator = pytest.mark.skipif(
    not LINUX_AMD64, reason="fake-gcs-server ships a linux-amd64 binary only"
)


def api(url: str, path: str, data: bytes | None = None, method: str = "GET") -> bytes:
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def put_tree(url: str, local: str, prefix: str, skip_dirs: tuple[str, ...] = ()) -> None:
    """Uploads ``local`` under ``prefix``, leaving out folders named in ``skip_dirs``."""
    for base, dirs, files in os.walk(local):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        for name in files:
            path = os.path.join(base, name)
            key = urllib.parse.quote(f"{prefix}/{os.path.relpath(path, local)}", safe="")
            with open(path, "rb") as f:
                api(url, f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={key}",
                    f.read(), "POST")  # fmt: skip


def names(url: str, prefix: str) -> list[str]:
    found, token = [], ""
    while True:
        query = f"prefix={urllib.parse.quote(prefix, safe='')}" + (
            f"&pageToken={token}" if token else "")  # fmt: skip
        listing = json.loads(api(url, f"/storage/v1/b/{BUCKET}/o?{query}"))
        found += [item["name"] for item in listing.get("items", [])]
        token = listing.get("nextPageToken")
        if not token:
            return found


def fetch_tree(url: str, prefix: str, local: str) -> str:
    for name in names(url, prefix + "/"):
        target = os.path.join(local, os.path.relpath(name, prefix))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        key = urllib.parse.quote(name, safe="")
        with open(target, "wb") as f:
            f.write(api(url, f"/storage/v1/b/{BUCKET}/o/{key}?alt=media"))
    return local


def complete_checkpoints(url: str, workdir: str) -> list[int]:
    """The steps whose checkpoint orbax committed (on GCS: its commit_success.txt)."""
    prefix = f"{workdir}/checkpoints/"
    steps = [n[len(prefix) :].split("/") for n in names(url, prefix)]
    return sorted(int(p[0]) for p in steps if p[0].isdigit() and p[1:] == ["commit_success.txt"])


def storage_env(url: str, deadline_s: float = DEADLINE_S) -> dict[str, str]:
    return {**emulator_env(url), "DDB_JAX_STORAGE_TIMEOUT_S": str(deadline_s)}


def run_stage(
    url: str, workdir: str, log: str, deadline_s: float = DEADLINE_S, stage: str = "r1_cu",
    **overrides,
):  # fmt: skip
    """Starts a tiny stage on the bucket's toy data, its storage at ``url``."""
    command = stage_command(f"gs://{BUCKET}/data", f"gs://{BUCKET}/{workdir}", stage,
                            **{**STAGE, **overrides})  # fmt: skip
    return start(command, log, env=storage_env(url, deadline_s))


def wait(proc: subprocess.Popen, log: str, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"no exit within {timeout_s:.0f}s (a hang):\n{tail(log)}")


def wait_for(
    condition, proc: subprocess.Popen, log: str, timeout_s: float = RUN_TIMEOUT_S, seen=()
):
    """Polls ``condition()`` while ``proc`` runs; fails if it exits or time runs out (with
    the log's tail and the last of the requests ``seen``)."""
    limit = time.monotonic() + timeout_s
    while not condition():
        explain = tail(log) + "\nlast requests:\n" + "\n".join(list(seen)[-40:])
        assert proc.poll() is None, explain
        assert time.monotonic() < limit, explain
        time.sleep(0.1)


def one_error_line(log: str) -> str:
    """The run's one ``error:`` line; no traceback on its console."""
    with open(log) as f:
        lines = f.read().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, (errors, tail(log))
    assert not any(line.startswith("Traceback") for line in lines), tail(log)
    return errors[0]


def ended_bounded(
    proc, log: str, since: float, deadline_s: float = DEADLINE_S, limit_from_start: bool = False
) -> str:
    """Asserts ``proc`` exits 1 within the deadline and margin of ``since``, in one line;
    returns the line. ``limit_from_start``: the process's start-up (imports, ~10 s on a
    busy CPU) is added to the limit (the fault was armed before it started)."""
    if limit_from_start:
        deadline_s += STARTUP_S
    status = wait(proc, log, deadline_s + MARGIN_S)
    took = time.monotonic() - since
    print(f"fault -> exit {status} in {took:.1f}s")
    assert status == 1, tail(log)
    assert took < deadline_s + MARGIN_S
    return one_error_line(log)
