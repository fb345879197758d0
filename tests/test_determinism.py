"""Same seed and device count -> bit-identical parameters after N steps; another seed differs.

The whole chain is covered: initial variables from the seed, the data stream (file order,
crops, flips), the per-step keys of bridging masks, augmentation and dropout, and the
jitted step over a two-device mesh (BatchNorm statistics and gradients reduced across it).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from configs import demo_r1_cu
from ddb_jax.train import self_training as st
from ddb_jax.train import setup
from input_pipeline import toy

STEPS = 3


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "8", "--num-val", "2"])
    return root


def config_for(root, seed: int):
    config = demo_r1_cu.get_config()
    config.data.root = str(root)
    config.seed = seed
    config.model.base_channels = 8
    config.model.head_channels = 16
    config.model.conv_impl = "lax"
    config.data.crop_size = (32, 32)
    config.batch_size = 4
    config.mesh_devices = 2
    config.num_steps = 10
    return config


def train(config, compiled: dict) -> list[np.ndarray]:
    """``STEPS`` steps from the seed's initial state; the step is compiled once per test."""
    run = setup.prepare_run(config)
    if "step" not in compiled:
        teacher = setup.build(st.no_dropout(config.model))
        step = functools.partial(
            st.self_training_step,
            student_apply=run.model.apply,
            teacher_apply=teacher.apply,
            tx=run.tx,
            st_cfg=config.st,
        )
        compiled["step"] = jax.jit(
            step,
            in_shardings=(run.replicated, run.batch_sharding),
            out_shardings=(run.replicated, run.replicated),
            donate_argnums=0,
        )
    state, batches = run.state, run.make_batches(0)
    for _ in range(STEPS):
        state, metrics = compiled["step"](state, next(batches))
        assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == STEPS
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]


def test_same_seed_same_devices_gives_bit_identical_params(toy_root):
    compiled: dict = {}
    first = train(config_for(toy_root, 0), compiled)
    second = train(config_for(toy_root, 0), compiled)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    other = train(config_for(toy_root, 1), compiled)
    floats = [(a, b) for a, b in zip(first, other, strict=True) if a.dtype.kind == "f"]
    assert sum(not np.array_equal(a, b) for a, b in floats) > len(floats) // 2
