"""The compile-only check on this machine's own devices (``--target=local --measure=N``):
the same report as for a named target, with the compiled step run and timed beside it."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from ddb_jax.runtime import aot, aot_measure
from tests.test_aot import ROOT, tiny_config
from tests.test_determinism import stage_config


@pytest.fixture(scope="module")
def measured(toy_root):
    """The step tests/test_determinism.py trains (the loop's mesh: two devices of eight),
    from the session's compilation cache when that test has compiled it."""
    config = stage_config(toy_root)
    return config, aot_measure.measure(config, steps=2)


def test_local_step_is_compiled_run_and_timed(measured):
    config, report = measured
    assert report["target"]["name"] == aot.LOCAL and report["target"]["platform"] == "cpu"
    assert report["mesh_devices"] == 2 and report["batch_per_device"] == 2
    m = report["measured"]
    assert m["steps"] == 2 and m["step_s"] > 0
    # The CPU reports no peak memory and has no data-sheet peaks: no ratios.
    assert m["peak_bytes"] is None and m["step_over_roofline"] is None
    assert report["memory"]["fits"] is None and report["roofline"] is None
    rows = dict(aot_measure.markdown_rows(report))
    assert "median of 2" in rows["measured step"]


def test_hbm_traffic_is_xlas_bytes_where_memory_is_one_space(measured):
    """The CPU's HLO has no on-chip memory space: counting every op's operands and result
    gives XLA's own bytes accessed, which validates the count the TPU figures use."""
    _, report = measured
    assert report["traffic"]["total"] == pytest.approx(report["cost"]["bytes"], rel=0.01)


def test_random_batch_has_the_steps_shapes():
    shapes = aot.batch_shapes(tiny_config())
    batch = aot_measure.random_batch(shapes, num_classes=19)
    for key, leaf in shapes.items():
        assert batch[key].shape == leaf.shape and batch[key].dtype == leaf.dtype, key
    np.testing.assert_array_equal(batch["source_image_size"], np.full((8, 2), 32))
    assert batch["source_label"].max() < 19 and batch["source_label"].dtype == jnp.uint8


def test_measure_needs_the_local_target():
    run = subprocess.run(
        [sys.executable, "tools/aot_check.py", "--config=configs/demo.py:r1_cu",
         "--target=v5e-8", "--measure=2"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == (
        "error: --measure=2: expected 0, or a positive count with --target=local "
        "--program=train and no --search_batch"
    )
