"""Every mistake a user can make through ``python -m ddb_jax.main`` ends in one line
``error: ...`` naming the key, file or value: exit status 2 for a setting, 1 for a file or
a failed run, and no traceback unless ``--traceback``. One case per error class.

The command line runs in this process (absl's flag parsing and ``run_main``, exactly as
``python -m ddb_jax.main`` calls them); tests/test_hostile_inputs.py (a misspelt config
key) and tests/test_platforms.py run cases as real subprocesses. Runtime failures that
need a training run to happen (a NaN loss, a full disk) are raised by
tests/test_train_loop.py; here their report is checked directly.
"""

from __future__ import annotations

import json
import os

import pytest

from ddb_jax import checkpoints, errors, paths
from ddb_jax.train import checkpointing, loop, workdir
from tests.support import ROOT, TINY, run_cli, tiny_stage


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the repository


def tiny(config: str, *extra: str) -> list[str]:
    """``--config=config`` (first: ml_collections wants it before its overrides), the tiny
    model's keys, then ``extra``."""
    keys = [f"--config.{k}={str(v).replace(' ', '')}" for k, v in TINY.items()]
    return [f"--config={config}", *keys, *extra]


def assert_one_line(status: int, err: str, expected_status: int, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == expected_status, err
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


USAGE_CASES = {
    "misspelt config key": (["--config=configs/demo.py:r1_cu", "--config.batchsize=2"],
                            ["'batchsize' does not exist", "'batch_size'"]),
    "value of the wrong type": (["--config=configs/demo.py:r1_cu", "--config.batch_size=two"],
                                ["--config.batch_size=two"]),
    "config file that does not exist": (["--config=configs/nope.py"], ["configs/nope.py"]),
    "stage the graph does not have": (["--config=configs/demo.py:r9_cu"], ["'r9_cu'"]),
    "FlagError": (["--config=configs/demo.py:r1_cu", "positional"], ["positional"]),
    "UnknownStageError": (["--config=configs/demo.py:r1_cu", "--config.stage=train"],
                          ["config.stage='train'"]),
    "ModelConfigError": (["--config=configs/demo.py:r1_cu", "--config.model.backbone=resnet7_v1c"],
                         ["config.model.backbone='resnet7_v1c'"]),
    "MethodConfigError": (["--config=configs/demo.py:r1_cu", "--config.st.mask=cutt"],
                          ["config.st.mask='cutt'"]),
    "DistillationConfigError": (
        ["--config=configs/demo.py:r1_ckd", "--config.ckd.teacher_dtype=float16"],
        ["config.ckd.teacher_dtype='float16'"]),
    "DistributedConfigError": (["--config=configs/demo.py:r1_cu", "--coordinator_address=h",
                                "--num_processes=2", "--process_id=0"], ["has no port"]),
    "PipelineError": (["--config=configs/demo.py", "--config.st.mask=class"],
                      ["config.st.mask='class' is set per stage"]),
    "EvaluateConfigError": (["--config=configs/eval_cityscapes.py"], ["--config.checkpoint"]),
    "PrototypeStageError": (["--config=configs/demo.py:r1_proto_cu", "--config.checkpoint="],
                            ["--config.checkpoint=MODEL_DIR"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_a_setting_is_one_line_and_exit_status_2(case, capsys, tmp_path):
    args, needles = USAGE_CASES[case]
    status, err = run_cli(capsys, *args, f"--workdir={tmp_path / 'run'}")
    assert_one_line(status, err, 2, *needles)
    assert not (tmp_path / "run" / "config.json").exists()  # nothing recorded


def test_mesh_error(capsys, tmp_path, toy_root):
    args = tiny("configs/demo.py:r1_cu", f"--config.data.root={toy_root}",
                "--config.batch_size=3", "--config.mesh_devices=2")  # fmt: skip
    status, err = run_cli(capsys, *args, f"--workdir={tmp_path / 'run'}")
    assert_one_line(status, err, 2, "config.batch_size=3 is not divisible by the 2 devices")


def test_accelerator_not_used_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v4-8")
    status, err = run_cli(capsys, "--config=configs/demo.py:r1_cu", f"--workdir={tmp_path}")
    assert_one_line(status, err, 2, "pip install -e '.[tpu]'", "--config.allow_cpu=True")


def test_workdir_mismatch_error_names_the_keys(capsys, tmp_path, toy_root):
    run = tmp_path / "run"
    run.mkdir()
    earlier = workdir.config_as_json(tiny_stage(toy_root, "r1_cu"))
    earlier["seed"] = 5  # an earlier run with another seed
    (run / "config.json").write_text(json.dumps(earlier))
    args = tiny("configs/demo.py:r1_cu", f"--config.data.root={toy_root}")
    status, err = run_cli(capsys, *args, f"--workdir={run}")
    assert_one_line(status, err, 2, f"{run} holds a run of another config", "seed: 5 -> 0")


def test_a_run_of_an_earlier_version_resumes_unless_a_new_key_changes():
    """A stored config without a key the code gained since (workdir.ADDED_KEYS) reads as
    holding the value that reproduces it; another value is still a difference."""
    current = {"seed": 0, "model": {"bn_statistics": "two_pass", "dtype": "float32"}}
    earlier = {"seed": 0, "model": {"dtype": "float32"}}
    assert workdir.config_differences(earlier, current) == []
    current["model"]["bn_statistics"] = "one_pass"
    assert workdir.config_differences(earlier, current) == [
        "model.bn_statistics: 'two_pass' -> 'one_pass'"
    ]
    assert workdir.config_differences({"seed": 0}, {"seed": 0}) == []  # no model section


def test_dataset_error_names_the_directory(capsys, tmp_path):
    args = ["--config=configs/demo.py:r1_cu", "--config.data.root=/no/such/data"]
    status, err = run_cli(capsys, *args, f"--workdir={tmp_path / 'run'}")
    assert_one_line(status, err, 1, "/no/such/data/toy/gta does not exist", "data/README.md")
    assert not (tmp_path / "run").exists()


def test_checkpoint_error_names_the_directory(capsys, tmp_path, toy_root):
    args = ["--config=configs/eval_cityscapes.py", f"--config.data.root={toy_root}",
            f"--config.checkpoint={tmp_path / 'nothing'}"]  # fmt: skip
    status, err = run_cli(capsys, *args, f"--workdir={tmp_path / 'run'}")
    assert_one_line(status, err, 1, f"{tmp_path / 'nothing'} is not a model directory")


def test_prototype_error_names_the_file_and_its_stage(capsys, tmp_path, toy_root):
    # A CKD stage whose teachers exist but whose prototype table does not.
    for path in ("cu", "ca"):
        os.makedirs(tmp_path / f"r1_{path}" / "export")
        (tmp_path / f"r1_{path}" / "export" / checkpoints.MODEL_JSON).write_text("{}")
    args = tiny("configs/demo.py:r1_ckd", f"--config.data.root={toy_root}",
                f"--config.ckd.teacher_cu={tmp_path / 'r1_cu' / 'export'}",
                f"--config.ckd.teacher_ca={tmp_path / 'r1_ca' / 'export'}",
                f"--config.ckd.prototypes_cu={tmp_path / 'missing.npz'}")  # fmt: skip
    status, err = run_cli(capsys, *args, f"--workdir={tmp_path / 'run'}")
    assert_one_line(status, err, 1, "missing.npz", "stage 'prototypes'")


def test_path_error_names_the_bucket(capsys, tmp_path, gcs):
    args = ["--config=configs/demo.py:r1_cu", "--workdir=gs://no-such-bucket/run"]
    status, err = run_cli(capsys, *args)
    assert_one_line(status, err, 1, "--workdir gs://no-such-bucket/run", "does not exist")


@pytest.mark.parametrize(
    "err",
    [
        loop.NonFiniteLossError("loss is nan at step 3"),
        checkpointing.CheckpointWriteError("writing the checkpoint of step 4 to /r failed"),
        workdir.WorkdirMismatchError("r holds a run of another config\n  seed: 1 -> 2"),
        paths.PathError("writing gs://b/x failed"),
    ],
)
def test_runtime_failures_report_one_line(err, capsys):
    status = errors.report(err)
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and printed.startswith("error: ")
    assert status == (2 if isinstance(err, errors.UsageError) else 1)


def test_a_bug_keeps_its_traceback_and_traceback_shows_it_for_known_errors():
    with pytest.raises(ZeroDivisionError):
        errors.report(ZeroDivisionError("a bug"))
    with pytest.raises(loop.NonFiniteLossError):
        errors.report(loop.NonFiniteLossError("nan"), traceback=True)
