"""Same seed and device count -> bit-identical train state after N steps; another seed differs.

The whole chain is covered: initial variables from the seed, the data stream (file order,
crops, flips), the per-step keys of bridging masks, augmentation and dropout, and the
jitted step over a two-device mesh (BatchNorm statistics and gradients reduced across it),
run through the stage's own loop.
"""

from __future__ import annotations

import jax
import numpy as np

from ddb_jax.train import loop
from tests.support import tiny_stage

STEPS = 3


def stage_config(root, seed: int = 0, layouts: str = "row_major"):
    """The tiny r1_cu stage these runs train (also the step tests/test_aot_measure.py runs:
    the same program, compiled once for the session)."""
    return tiny_stage(
        root, "r1_cu", seed=seed, batch_size=4, mesh_devices=2, num_steps=STEPS,
        eval_every=0, image_summary_every=0, checkpoint_every=STEPS, state_layouts=layouts,
    )  # fmt: skip


def train(root, workdir, seed: int, layouts: str = "row_major") -> list[np.ndarray]:
    """Every leaf of the state (student, EMA teacher, optimiser, step, key) after STEPS."""
    state, _ = loop.train_and_evaluate(stage_config(root, seed, layouts), str(workdir))
    assert int(state.step) == STEPS
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]


def test_same_seed_same_devices_gives_bit_identical_state(toy_root, tmp_path):
    first = train(toy_root, tmp_path / "a", 0)
    second = train(toy_root, tmp_path / "b", 0)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    # The state in the compiler's layouts (compiled from the first batch's shapes, the state
    # moved into its formats): on the CPU the compiler keeps row-major, so the same state.
    placed = train(toy_root, tmp_path / "d", 0, layouts="compiler")
    for a, b in zip(first, placed, strict=True):
        np.testing.assert_array_equal(a, b)
    other = train(toy_root, tmp_path / "c", 1)
    floats = [(a, b) for a, b in zip(first, other, strict=True) if a.dtype.kind == "f"]
    assert sum(not np.array_equal(a, b) for a, b in floats) > len(floats) // 2
