"""What a run runs on: accelerators found on the machine, and the CPU fallback refused."""

import subprocess
import sys

import pytest

from ddb_jax.runtime import platforms
from tests.support import ROOT, process_env


def test_accelerators_are_found_by_their_device_files_and_variables(tmp_path):
    assert platforms.accelerator_on_machine(str(tmp_path), environ={}) is None
    (tmp_path / "accel0").touch()
    assert platforms.accelerator_on_machine(str(tmp_path), environ={}) == (
        "a TPU", str(tmp_path / "accel0"), "tpu"
    )  # fmt: skip
    (tmp_path / "nvidia0").touch()
    found = platforms.accelerator_on_machine(str(tmp_path), environ={})
    assert found == ("an NVIDIA GPU", str(tmp_path / "nvidia0"), "cuda12")
    empty = tmp_path / "empty"
    empty.mkdir()
    tpu_vm = {"TPU_ACCELERATOR_TYPE": "v4-8"}
    assert platforms.accelerator_on_machine(str(empty), tpu_vm)[2] == "tpu"


def test_a_cpu_run_on_an_accelerator_machine_is_refused_naming_the_extra():
    found = ("an NVIDIA GPU", "/dev/nvidia0", "cuda12")
    with pytest.raises(platforms.AcceleratorNotUsedError, match=r"pip install -e '\.\[cuda12\]'"):
        platforms.check_backend(allow_cpu=False, found=found)
    platforms.check_backend(allow_cpu=True, found=found)  # the override
    platforms.check_backend(allow_cpu=False, found=None)  # a CPU machine
    assert "on cpu" in platforms.describe() and "process 0 of 1" in platforms.describe()


def test_main_stops_before_any_work_on_a_tpu_vm_with_the_cpu_build(tmp_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable, "-m", "ddb_jax.main", "--config=configs/demo.py:r1_cu",
        f"--workdir={workdir}",
    ]  # fmt: skip
    env = {**process_env(), "TPU_ACCELERATOR_TYPE": "v4-8"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "pip install -e '.[tpu]'" in done.stderr and "allow_cpu" in done.stderr
    assert not workdir.exists()
