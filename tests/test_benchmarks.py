"""The benchmark kit: the device check's smoke run, and the CPU conv path it measures.

* ``benchmarks/device_check.py --smoke`` (tiny models, CPU) must produce its JSON and
  markdown with every row and finite numbers, run the PyTorch reference step op for op, and
  import neither TensorFlow, tensorflow-datasets nor CLU, nor any third-party module the
  GPU image lacks (the kit must run there with only ml-collections carried as a wheel).
* ``conv_impl='matmul'`` (custom-VJP convs whose gradients are matmuls, the CPU default of
  the benchmarks) gives the forward values and the gradients of ``lax`` convs, bounded by a
  float64 run: per conv kind (1x1, strided, dilated, ASPP-like) and for a whole DLV2-R18.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ddb_jax import models
from ddb_jax.models.layers import lax_conv, matmul_grad_conv, weight_grad_path

ROOT = Path(__file__).resolve().parents[1]


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


# --- conv_impl='matmul' --------------------------------------------------------------------

# (kernel, stride, dilation, cin, cout): 1x1, strided 1x1 (ResNet downsample), small 3x3
# (XLA's weight gradient), strided and dilated 3x3 ('input_taps'), ASPP-like: dilation
# larger than the map, fewer outputs than inputs ('output_taps').
CONV_KINDS = [(1, 1, 1, 6, 10), (1, 2, 1, 6, 10), (3, 1, 1, 6, 5), (3, 2, 1, 130, 132),
              (3, 1, 2, 132, 130), (3, 1, 12, 520, 40)]  # fmt: skip


def _conv_outputs(conv, x, w, g, stride, dilation):
    y, vjp = jax.vjp(lambda a, b: conv(a, b, stride, dilation), x, w)
    return (y, *vjp(g))


@pytest.mark.parametrize("kind", CONV_KINDS, ids=lambda k: "k{}s{}d{}_{}to{}".format(*k))
def test_matmul_conv_value_and_gradients_match_float64(kind):
    """Forward, input and weight gradients of matmul_grad_conv in float32 are as close to a
    float64 lax run as lax's own float32 result (odd sizes: torch's floor in strides)."""
    k, stride, dilation, cin, cout = kind
    rng = np.random.default_rng(sum(kind))
    x = rng.normal(size=(2, 9, 11, cin))
    w = rng.normal(size=(k, k, cin, cout)) / math.sqrt(k * k * cin)
    with jax.enable_x64(True):
        g = rng.normal(size=lax_conv(jnp.asarray(x), jnp.asarray(w), stride, dilation).shape)
        want = _conv_outputs(lax_conv, jnp.asarray(x), jnp.asarray(w), jnp.asarray(g),
                             stride, dilation)  # fmt: skip
        exact = _conv_outputs(matmul_grad_conv, jnp.asarray(x), jnp.asarray(w), jnp.asarray(g),
                              stride, dilation)  # fmt: skip
    args32 = [jnp.asarray(a, jnp.float32) for a in (x, w, g)]
    ours = jax.jit(functools.partial(_conv_outputs, matmul_grad_conv), static_argnums=(3, 4))(
        *args32, stride, dilation
    )
    lax32 = jax.jit(functools.partial(_conv_outputs, lax_conv), static_argnums=(3, 4))(
        *args32, stride, dilation
    )
    for what, a, e, b, ref in zip(("y", "dx", "dw"), ours, exact, lax32, want, strict=True):
        ref = np.asarray(ref)
        assert a.shape == ref.shape and a.dtype == jnp.float32, what
        # The same maths: float64 agrees to rounding.
        np.testing.assert_allclose(np.asarray(e), ref, rtol=1e-12, atol=1e-12, err_msg=what)
        scale = np.abs(ref).max()
        err, lax_err = np.abs(np.asarray(a) - ref).max(), np.abs(np.asarray(b) - ref).max()
        assert err <= max(4 * lax_err, 1e-6 * scale), (what, err, lax_err, scale)


def test_conv_kinds_cover_every_weight_gradient_path():
    paths = {weight_grad_path(k, s, cin, cout) for k, s, _, cin, cout in CONV_KINDS}
    assert paths == {"matmul", "lax", "input_taps", "output_taps"}


def test_matmul_conv_bfloat16_gradients_keep_dtypes():
    x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
    w = jnp.ones((3, 3, 4, 2), jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: matmul_grad_conv(a, b, 2, 1), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    assert y.shape == (1, 4, 4, 2) and dx.shape == x.shape and dw.shape == w.shape


def _r18_config(conv_impl: str, dtype: str = "float32"):
    cfg = default.get_model_config()
    cfg.backbone, cfg.conv_impl, cfg.dtype = "resnet18_v1c", conv_impl, dtype
    cfg.base_channels, cfg.head_channels, cfg.dropout_ratio = 8, 16, 0.0
    return cfg


def _randomized_r18_variables() -> dict:
    """torch_ref's randomised weights (no zero-initialised BN scale, so every conv of every
    residual branch gets a gradient), converted."""
    from ddb_jax.convert.common import convert_state_dict
    from ddb_jax.convert.resnet import torch_name
    from torch_ref.common import numpy_state_dict
    from torch_ref.resnet_dlv2 import Segmentor, randomize

    torch_model = randomize(Segmentor(18, dropout=0.0, base_channels=8, channels=16), seed=5)
    shapes = models.variable_shapes(models.build_model(_r18_config("lax")))
    return convert_state_dict(numpy_state_dict(torch_model), shapes, torch_name)


def _train_grads(cfg, variables, images):
    model = models.build_model(cfg)

    def loss(params):
        named_outputs, updates = model.apply(
            {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
        )
        logits = named_outputs["logits"]
        return jnp.sum(logits**2), updates["batch_stats"]

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


def test_matmul_model_gradients_match_float64():
    """A whole DLV2-R18 (strided, dilated, ASPP convs) in training mode: the gradients and
    BN statistics of conv_impl='matmul' are as close to float64 as those of 'lax'."""
    images = np.random.default_rng(0).normal(size=(2, 33, 47, 3))
    variables = _randomized_r18_variables()
    with jax.enable_x64(True):
        vars64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), variables)
        want = _train_grads(_r18_config("lax", "float64"), vars64, jnp.asarray(images))
        want = jax.tree_util.tree_map(np.asarray, want)
    images32 = jnp.asarray(images, jnp.float32)
    ours = _train_grads(_r18_config("matmul"), variables, images32)
    lax32 = _train_grads(_r18_config("lax"), variables, images32)
    leaves = jax.tree_util.tree_leaves_with_path(want)
    for (path, ref), a, b in zip(
        leaves, jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(lax32), strict=True
    ):
        scale = np.abs(ref).max()
        assert scale > 0, jax.tree_util.keystr(path)
        err, lax_err = np.abs(np.asarray(a) - ref).max(), np.abs(np.asarray(b) - ref).max()
        assert err <= max(4 * lax_err, 3e-5 * scale), (jax.tree_util.keystr(path), err, lax_err)
