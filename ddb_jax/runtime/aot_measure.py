"""The compile-only estimate set beside a measured step, on the machine it is for.

On a TPU VM or a GPU host, ``tools/aot_check.py --target=local --measure=N`` compiles the
stage's train step for this process's own devices exactly as for a named target
(:func:`ddb_jax.runtime.aot.compile_program`), then runs the compiled program ``N`` times
on a freshly initialised state and a random batch of the step's shapes, and reports the
median step time and the device's peak memory beside the estimate: the roofline bound
from HBM traffic and FLOPs, and the memory per device. The ratios calibrate the estimates
made for machines not at hand. Nothing is read: no dataset, no ImageNet weights, no
teacher (frozen inputs are zeros of their shapes), so the check needs no files.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddb_jax.methods.device_input import LABEL_SUFFIX
from ddb_jax.ops import SIZE_SUFFIX
from ddb_jax.runtime import aot


def random_batch(batch: dict[str, jax.ShapeDtypeStruct], num_classes: int, seed: int = 0):
    """Host arrays of the step's batch shapes: uint8 images, their full sizes, labels of
    ``num_classes`` classes, float images and masks of ones."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, leaf in batch.items():
        if key.endswith(SIZE_SUFFIX):
            image = batch[key.removesuffix(SIZE_SUFFIX)].shape
            out[key] = np.tile(np.asarray(image[1:3], leaf.dtype), (leaf.shape[0], 1))
        elif key.endswith(LABEL_SUFFIX):
            out[key] = rng.integers(0, num_classes, leaf.shape).astype(leaf.dtype)
        elif leaf.dtype == jnp.uint8:
            out[key] = rng.integers(0, 256, leaf.shape).astype(np.uint8)
        elif key.endswith("_image"):
            out[key] = rng.normal(size=leaf.shape).astype(leaf.dtype)
        else:  # depth, valid masks
            out[key] = np.ones(leaf.shape, leaf.dtype)
    return out


def measure(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
    """:func:`aot.compile_program`'s report for the local devices, with ``'measured'``: the
    median of ``steps`` timed steps (after one untimed), the device's peak memory where it
    reports one, and their ratios to the estimates."""
    from ddb_jax import models
    from ddb_jax.methods import assemble
    from ddb_jax.train import state_layouts

    program, compiled, report = aot.compile_program(config, aot.LOCAL)
    model = models.build_model(config.model)
    crop = tuple(config.data.crop_size)

    def initial_state(seed):  # one program: the variables' init and the stage's state
        init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
        variables = models.init_variables(model, init_key, crop)
        return assemble.assemble(config, variables, state_key).state

    shardings = jax.tree_util.tree_map(lambda s: s.sharding, program.state)
    state = jax.jit(initial_state, static_argnums=0, out_shardings=shardings)(config.seed)
    if report["state_layouts"] == "compiler's":  # compiled with them: move the state in
        state = state_layouts.place(state, compiled)
    batch = random_batch(program.batch, config.model.num_classes, config.seed)
    batch = {k: jax.device_put(v, program.batch[k].sharding) for k, v in batch.items()}
    frozen = None
    if program.frozen is not None:
        frozen = jax.tree_util.tree_map(
            lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), program.frozen
        )
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        state, *_ = compiled(state, batch, frozen)
        jax.block_until_ready(state)
        if i:  # the first call may still load the program
            times.append(time.perf_counter() - start)
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    step_s = statistics.median(times)
    roofline = report["roofline"]
    bound = roofline["hbm_bound_s"] if roofline else None
    report["measured"] = {
        "steps": steps,
        "step_s": step_s,
        "peak_bytes": peak,
        "step_over_roofline": step_s / bound if bound else None,
        "peak_over_estimate": peak / report["memory"]["total"] if peak else None,
    }
    return report


def markdown_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The measurement's rows for the report's table."""
    m = report["measured"]
    ratio = m["step_over_roofline"]
    peak = m["peak_bytes"]
    return [
        ("measured step", f"{m['step_s'] * 1e3:.1f} ms (median of {m['steps']})"
            + (f", {ratio:.2f}x the HBM roofline bound" if ratio else ", no roofline here")),
        ("measured peak memory", "n/a (the device reports none)" if peak is None else
            f"{peak / aot.GIB:.2f} GiB, {m['peak_over_estimate']:.2f}x the estimate"),
    ]  # fmt: skip
