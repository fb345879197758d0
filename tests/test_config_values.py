"""Every config value is checked before anything is written (ddb_jax/config_checks.py): each
numeric and enumerated key of configs/default.py with a value outside its range ends
``python -m ddb_jax.main`` in one line, exit status 2, the workdir not created; a corrected
rerun then just starts. And the scratch directories of a bucket workdir's events are
removed on every exit the process lives through, and at the next start after a kill.

The walk runs the command line in this process (absl's parsing and ``run_main``, as
tests/test_errors.py does): a Python process per key would take minutes. Two cases run
``python -m ddb_jax.main`` for real, end to end. Last, two messages that used to mislead
(issue 25): a missing ``init_from``, a checkpoint write failed for a lost connection.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from configs import default, demo
from ddb_jax import config_checks, paths
from ddb_jax.train import checkpointing, summaries
from ddb_jax.train import workdir as workdir_lib
from tests.support import ROOT, finish, process_env, run_cli, stage_command, start, tail


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the repository


def flag_value(value) -> str:
    return str(value).replace(" ", "") if isinstance(value, tuple | list) else str(value)


def assert_refused(status: int, err: str, shown_key: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"error: config.{shown_key}="), err
    assert "must be" in lines[0], err


# --- the table --------------------------------------------------------------------------


def test_every_numeric_and_enumerated_key_has_a_rule():
    """Numbers, tuples of numbers and strings of configs/default.py (with the methods'
    sections) each have a rule, or are named as checked where they are used; every rule
    names a key that exists; the defaults pass."""
    keys = dict(config_checks.leaves(default.get_config()))
    for key, value in keys.items():
        if isinstance(value, bool):
            continue
        assert key in config_checks.RULES or key in config_checks.CHECKED_ELSEWHERE, key
    pipeline_only = set(demo.get_config()) - set(demo.get_config("r1_cu"))
    assert not set(config_checks.RULES) - set(keys) - pipeline_only
    for key, rule in config_checks.RULES.items():
        if key in keys:
            config_checks.check_value(key, keys[key])  # the default is allowed
        assert not rule.test(rule.invalid), key


def test_every_shipped_config_passes():
    import importlib

    names = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".py"))
    for name in names:
        module = importlib.import_module(f"configs.{name}")
        if hasattr(module, "get_config"):
            config_checks.check_config(module.get_config())
    for stage in ("r1_cu", "r1_ca", "r1_proto_cu", "r1_ckd", "source_only", "oracle"):
        config_checks.check_config(demo.get_config(stage))


# --- the walk ---------------------------------------------------------------------------

STAGE_KEYS = set(dict(config_checks.leaves(demo.get_config("r1_cu"))))
WALKED = [k for k in config_checks.RULES if k not in config_checks.MAPPINGS]


@pytest.mark.parametrize("key", WALKED)
def test_an_invalid_value_is_one_line_exit_2_and_writes_nothing(key, capsys, tmp_path):
    config = "configs/demo.py:r1_cu" if key in STAGE_KEYS else "configs/demo.py"
    value = flag_value(config_checks.RULES[key].invalid)
    run = tmp_path / "run"
    status, err = run_cli(capsys, f"--config={config}", f"--config.{key}={value}",
                          f"--workdir={run}")  # fmt: skip
    assert_refused(status, err, key)
    assert not run.exists()


def test_a_per_stage_override_is_checked_and_named(capsys, tmp_path):
    run = tmp_path / "run"
    override = "--config.pipeline.r1_cu.batch_size=0"
    status, err = run_cli(capsys, "--config=configs/demo.py", override, f"--workdir={run}")
    assert_refused(status, err, "pipeline.r1_cu.batch_size")
    assert "config.pipeline.r1_cu.batch_size=0: must be a positive integer" in err
    assert not run.exists()


def test_a_mapping_value_is_checked():
    config = demo.get_config("r1_cu")
    config.data.resize_scales = {"toy_source": (0, 4)}
    with pytest.raises(config_checks.ConfigValueError, match=r"config.data.resize_scales="):
        config_checks.check_config(config)


def test_an_existing_workdir_is_left_untouched(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    status, err = run_cli(capsys, "--config=configs/demo.py:r1_cu", "--config.num_steps=-5",
                          f"--workdir={run}")  # fmt: skip
    assert_refused(status, err, "num_steps")
    assert sorted(os.listdir(run)) == ["notes.txt"]


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_a_workdir_that_is_not_a_directory_is_refused(where, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    run = tmp_path / "file" if where == "file" else tmp_path / "file" / "run"
    status, err = run_cli(capsys, "--config=configs/demo.py:r1_cu", f"--workdir={run}")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: --workdir={run} is") and "not a directory" in err


def test_the_workdir_probe_leaves_nothing(tmp_path):
    config_checks.check_workdir(str(tmp_path / "a" / "b" / "run"))
    assert os.listdir(tmp_path) == []
    (tmp_path / "run").mkdir()
    config_checks.check_workdir(str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run") == []


# --- end to end -------------------------------------------------------------------------


def test_failed_starts_leave_nothing_and_the_corrected_run_starts(toy_root, tmp_path, capsys):
    """The issue's cases as a user runs them (real processes): refused in one line without
    a traceback, nothing written; then the corrected command (the tiny demo stage, 1 step;
    in this process, to spare a second start-up) runs in the same workdir."""
    run = str(tmp_path / "run")
    keys = dict(num_steps=1, batch_size=2, eval_every=0, image_summary_every=0,
                checkpoint_every=1)  # fmt: skip
    bad = [dict(keys, batch_size=-4), dict(keys, num_steps=-5)]
    logs = [str(tmp_path / f"bad{i}.log") for i in range(len(bad))]
    procs = [start(stage_command(toy_root, run, "source_only", **k), log)
             for k, log in zip(bad, logs, strict=True)]  # fmt: skip
    for proc, log, needle in zip(procs, logs, ["batch_size=-4", "num_steps=-5"], strict=True):
        assert finish(proc, log) == 2, tail(log)
        assert tail(log).strip().splitlines()[-1].startswith(f"error: config.{needle}: must be")
        assert "Traceback" not in tail(log)
    assert not os.path.exists(run)
    command = stage_command(toy_root, run, "source_only", **keys)
    status, err = run_cli(capsys, *command[3:])  # the flags after "python -m ddb_jax.main"
    assert status == 0, err
    result = paths.read_json(os.path.join(run, workdir_lib.RESULT_JSON))
    assert result["step"] == 1


# --- scratch directories ----------------------------------------------------------------


def _scratch(root, name: str, age_s: float, note: bool = False) -> str:
    directory = os.path.join(root, name)
    os.makedirs(directory)
    with open(os.path.join(directory, "events.out.tfevents.1"), "w") as f:
        f.write("x")
    if note:
        with open(os.path.join(directory, summaries.KEPT_NOTE), "w") as f:
            f.write("kept")
    then = time.time() - age_s
    for path in [directory, *(os.path.join(directory, n) for n in os.listdir(directory))]:
        os.utime(path, (then, then))
    return directory


def test_stale_scratch_is_removed_at_start_and_our_own_at_close(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(gone.stdout)
    hour, day = summaries.QUIET_S + 60, summaries.NO_PID_S + 60
    stale = [_scratch(tmp_path, f"ddb_jax_events_{dead}_a", hour),
             _scratch(tmp_path, "ddb_jax_events_old", day)]  # fmt: skip
    kept = [
        _scratch(tmp_path, f"ddb_jax_events_{os.getpid()}_b", hour),  # a live process
        _scratch(tmp_path, f"ddb_jax_events_{dead}_c", 60),  # changed a minute ago
        _scratch(tmp_path, f"ddb_jax_events_{dead}_d", day, note=True),  # a failed copy
        _scratch(tmp_path, "ddb_jax_events_recent", hour),
    ]
    copied = {}
    monkeypatch.setattr(paths, "write_bytes", lambda path, data: copied.update({path: data}))
    events = summaries.Summaries("gs://bucket/run")
    assert all(not os.path.exists(d) for d in stale)
    assert all(os.path.exists(d) for d in kept)
    assert os.path.dirname(events.local_dir) == str(tmp_path)
    events.writer.write_scalars(1, {"loss": 1.0})
    events.close()
    assert not os.path.exists(events.local_dir) and copied  # copied, then removed

    def unreachable(path, data):
        raise OSError("connection refused")

    monkeypatch.setattr(paths, "write_bytes", unreachable)
    failed = summaries.Summaries("gs://bucket/run")
    local = failed.local_dir
    failed.close()  # the events stay for the user, for a week
    assert os.path.exists(os.path.join(local, summaries.KEPT_NOTE))
    assert not summaries.is_stale(local, now=time.time() + summaries.NO_PID_S * 2)
    assert summaries.is_stale(local, now=time.time() + summaries.ANY_S + 60)


def test_scratch_of_a_run_that_fails_before_closing_is_removed_at_exit(tmp_path):
    """A stage that raises before its loop (the events never closed) still leaves nothing."""
    script = (
        "from ddb_jax.train import summaries\n"
        "events = summaries.Summaries('gs://bucket/run')\n"
        "print(events.local_dir, flush=True)\n"
        "raise SystemExit('error: the stage failed')\n"
    )
    env = dict(process_env(), TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr
    local = done.stdout.strip().splitlines()[-1]
    assert local.startswith(str(tmp_path)) and not os.path.exists(local)


# --- messages that tell the truth (issue 25, item 4) ------------------------------------


def test_a_missing_init_from_says_it_does_not_exist(capsys, tmp_path, toy_root):
    missing = tmp_path / "nothing"
    command = stage_command(toy_root, tmp_path / "run", init_from=missing)
    status, err = run_cli(capsys, *command[3:])
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: config.init_from={missing} does not exist"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("full", [False, True])
def test_a_failed_checkpoint_write_names_the_step_on_record(full, tmp_path, monkeypatch):
    """A lost connection: the storage cannot even be listed, the manager's record says
    step 2 is complete; freeing space is advised for a full disk only."""
    ckpt = checkpointing.Checkpoints(str(tmp_path), 3)
    ckpt.save(2, {"w": jnp.arange(4.0)})
    ckpt.wait()
    cause = OSError(errno.ENOSPC, "No space left on device")
    if not full:
        cause = ConnectionError("Cannot connect to host 127.0.0.1:4443")

    def unreachable():
        raise ConnectionError("listing failed")

    monkeypatch.setattr(ckpt.manager, "reload", unreachable)
    message = str(ckpt._error(4, cause))
    ckpt.close()
    assert "step 4" in message and "latest: step 2" in message, message
    assert ("free space" in message) == full, message
