"""The device check's smoke run (``benchmarks/device_check.py --smoke``: every part on tiny
models, on this CPU): it must produce its JSON and markdown with every row and finite
numbers, run the PyTorch reference step op for op, and import neither TensorFlow,
tensorflow-datasets nor CLU, nor any third-party module the GPU image lacks (the kit must run
there with only ml-collections carried as a wheel).

A whole run of the kit (six train steps compiled, two minutes of a core): in make test-bench,
which .ci/run runs after make test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    cmd = [sys.executable, str(ROOT / "benchmarks/device_check.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    return report, (out / "device_check.md").read_text()


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_smoke_parts_have_finite_numbers(smoke_report):
    report, _ = smoke_report
    parts = report["parts"]
    assert report["mode"] == "smoke"
    assert list(parts) == [
        "r101_bf16", "torch_r101", "r101_f32", "mit_bf16", "eval", "r101_bf16_layouts",
        "r101_bf16_remat", "mit_bf16_remat",
    ]  # fmt: skip
    for name, part in parts.items():
        assert "error" not in part and "skipped" not in part, (name, part)
    steps = ("r101_bf16", "r101_f32", "mit_bf16", "r101_bf16_layouts", "r101_bf16_remat",
             "mit_bf16_remat")  # fmt: skip
    for name in steps:
        part = parts[name]
        for key in ("step_s", "flops", "loss", "compile_s", "xla_temp_bytes"):
            assert finite(part[key]) and part[key] > 0 or key == "loss", (name, key, part[key])
        assert finite(part["loss"]) and part["recompiles"] == 0
        assert len(part["step_times_s"]) == 2
    assert parts["r101_bf16"]["dtype"] == "bfloat16" and parts["r101_f32"]["dtype"] == "float32"
    assert parts["r101_bf16_remat"]["remat"] and not parts["r101_bf16"]["remat"]
    assert parts["r101_bf16_layouts"]["state_layouts"] == "compiler"
    assert parts["r101_bf16"]["state_layouts"] == "row_major"
    # The CPU's compiler keeps the state row-major: the same program, the same loss.
    assert parts["r101_bf16_layouts"]["loss"] == parts["r101_bf16"]["loss"]
    assert finite(parts["r101_bf16"]["jax_matmul_peak_bf16"])
    variants = parts["torch_r101"]["variants"]
    assert len(variants) == 3
    assert all(finite(v["step_s"]) and finite(v["loss"]) for v in variants.values())
    rows = parts["eval"]["rows"]
    assert list(rows) == ["r101_bf16", "r101_f32", "mit_bf16"]
    assert all(finite(r["images_per_s"]) and r["images_per_s"] > 0 for r in rows.values())
    assert len(report["targets"]) == 4
    assert all(t["met"] is None for t in report["targets"])  # tiny CPU models: n/a


def test_smoke_sets_the_compile_time_estimate_beside_the_measurement(smoke_report):
    """Every step part carries aot_check's figures of its own program: memory at least the
    arguments and temporaries XLA counts, HBM traffic at least the arguments; on the CPU no
    roofline (no data-sheet peaks), on a known GPU its card's."""
    report, text = smoke_report
    for name in ("r101_bf16", "r101_f32", "mit_bf16", "r101_bf16_layouts", "r101_bf16_remat",
                 "mit_bf16_remat"):  # fmt: skip
        part = report["parts"][name]
        est = part["estimate"]
        assert est["target"] == "local" and est["roofline_s"] is None
        assert est["memory_total_bytes"] >= part["xla_argument_bytes"] + part["xla_temp_bytes"]
        assert est["hbm_traffic_bytes"] >= part["xla_argument_bytes"]  # read once at least
    assert "## Compile-time estimate beside the measurement" in text
    assert "| r101_bf16 | local |" in text


def test_smoke_torch_step_is_the_reference_step(smoke_report):
    """The benchmark's PyTorch step computes what torch_ref's step does (same losses), and
    its on-device augmentation what the host augmentation does."""
    part = smoke_report[0]["parts"]["torch_r101"]
    assert part["max_loss_diff_vs_torch_ref"] <= 1e-6
    assert part["device_vs_host_augmentation_loss_diff"] <= 1e-5


def test_smoke_imports_nothing_the_gpu_image_lacks(smoke_report):
    for name, part in smoke_report[0]["parts"].items():
        imports = part["imports"]
        assert imports["forbidden"] == [], (name, imports["forbidden"])
        assert imports["not_on_device"] == [], (name, imports["not_on_device"])
        assert "ml_collections" in imports["third_party"]


def test_smoke_markdown_has_every_table(smoke_report):
    _, text = smoke_report
    for heading in ("self-training step", "device memory (remat off / on)", "## Evaluation",
                    "## Targets"):  # fmt: skip
        assert heading in text
    for row in (
        "| ours, bfloat16 (lax) |",
        "| ours, float32 (lax) |",
        "| ours, bfloat16, state in the compiler's layouts |",
        "| PyTorch reference, fp32, augmentation on the host (as transcribed) |",
        "| PyTorch reference, bf16 autocast, augmentation on the device |",
    ):
        assert row in text
    assert "failed" not in text and "skipped" not in text
    assert "Imported TensorFlow / tensorflow-datasets / CLU: none" in text
