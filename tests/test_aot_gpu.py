"""Compile-only NVIDIA targets (ddb_jax.runtime.gpu_targets): a tiny self-training stage's real
train step compiled for eight H100s by XLA:GPU's compiler on this CPU, where the CUDA plugin
is installed (make venv EXTRAS=test,aot-gpu); elsewhere, the one-line error that says how to
install it. On a GPU the arguments are the arrays themselves (no tiled padding): exactly the
replicated state plus this device's slice of the batch."""

from __future__ import annotations

import pytest

from ddb_jax.runtime import aot, gpu_targets
from tests.test_aot import tiny_config

HAS_CUDA_PLUGIN = gpu_targets.has_cuda_compiler()
needs_cuda_plugin = pytest.mark.skipif(
    not HAS_CUDA_PLUGIN, reason="the CUDA plugin (make venv EXTRAS=test,aot-gpu) is not installed"
)


def test_every_gpu_target_describes_its_card():
    cuda = [t for t in aot.TARGETS.values() if t.platform == "cuda"]
    assert {t.gpu for t in cuda} == set(gpu_targets.GPUS)
    for target in cuda:
        gpu = gpu_targets.GPUS[target.gpu]
        assert target.memory_bytes == int(0.75 * gpu.memory)  # JAX's default pool
        assert target.memory_bandwidth == gpu.memory_bandwidth
        assert target.peak_flops == gpu.peak_bf16_flops
        assert gpu.name in target.device
        assert target.topology == f"1x1x{target.devices}"
        text = gpu_targets.target_config(gpu)
        major, minor = gpu.compute_capability
        assert f"cuda_compute_capability {{ major: {major} minor: {minor} }}" in text
        assert f"core_count: {gpu.sms}\n" in text and f"device_memory_size: {gpu.memory}\n" in text
        assert text.count("{") == text.count("}") == 3


def test_the_device_checks_target_is_the_card_it_runs_on():
    """benchmarks/device_check.py sets its measurements beside the estimate for the card it
    runs on: a known card's one-GPU target (H200 and A100 have only eight-GPU targets),
    anything else the device itself with no peaks (no roofline)."""
    import types

    import jax

    def device(kind):
        return types.SimpleNamespace(device_kind=kind, platform="gpu", memory_stats=lambda: {})

    h100 = aot.local_target(device("NVIDIA H100 80GB HBM3"))
    assert h100 == aot.TARGETS["h100-1"]
    h200 = aot.local_target(device("NVIDIA H200"))
    assert (h200.name, h200.devices, h200.gpu) == ("h200-1", 1, "h200")
    assert h200.memory_bytes == aot.TARGETS["h200-8"].memory_bytes
    assert aot.local_target(device("NVIDIA A100-SXM4-40GB")).name == "a100-40gb-1"
    here = aot.local_target(jax.devices("cpu")[0])
    assert (here.name, here.devices, here.peak_flops, here.memory_bandwidth) == ("local", 1, 0, 0)


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="the CUDA plugin is installed")
def test_without_the_plugin_a_gpu_target_is_one_line_naming_the_extra():
    with pytest.raises(aot.AotError, match=r"target h100-8: .*EXTRAS=test,aot-gpu"):
        aot.target_devices(aot.get_target("h100-8"))


@pytest.fixture(scope="module")
def h100_reports():
    """The tiny two-pass step for eight H100s with the state row-major (as the loop keeps
    it) and in the layouts the compiler picks."""
    config = tiny_config()
    config.model.bn_statistics = "two_pass"
    return config, {
        auto: aot.compile_stage(config, "h100-8", compiler_state_layouts=auto)
        for auto in (False, True)
    }


@needs_cuda_plugin
def test_tiny_step_for_eight_h100s(h100_reports):
    config, reports = h100_reports
    report = reports[False]
    memory, predicted = report["memory"], report["predicted"]
    assert report["mesh_devices"] == 8 and report["batch_per_device"] == 1
    assert memory["arguments"] == predicted["state_bytes"] + predicted["batch_bytes_per_device"]
    assert memory["aliased"] == predicted["state_bytes"]  # the donated state
    assert memory["fits"] and memory["device"] == int(0.75 * 84942979072)
    assert report["cost"] is None and report["roofline"] is None  # XLA:GPU gives no cost
    assert report["hlo"]["collectives"]["all-reduce"]["count"] > 0
    # One uint8 image pair with its int32 sizes and one int32 label map per device.
    h, w = config.data.crop_size
    assert predicted["batch_bytes_per_device"] == (3 * h * w + 2 * 4) * 2 + h * w


class FakeLowered:
    """A lowered program whose compile fails as XLA:GPU's Triton tiling does, unless told
    to use cuBLAS for its GEMMs."""

    def __init__(self, message: str):
        self.message, self.calls = message, []

    def compile(self, compiler_options=None):
        self.calls.append(compiler_options)
        if (compiler_options or {}).get("xla_gpu_enable_triton_gemm", True) is not False:
            raise RuntimeError(self.message)
        return "compiled"


def test_a_gpu_tiling_failure_is_compiled_again_with_cublas_gemms():
    failure = f"INTERNAL: {gpu_targets.TILING_FAILURE} that satisfy hlo: %dot.4 = f32[38912,512]"
    lowered = FakeLowered(failure)
    compiled, options = gpu_targets.compile_lowered(lowered, "cuda", {"xla_dump_to": "x"})
    assert compiled == "compiled"
    assert options == {"xla_dump_to": "x", "xla_gpu_enable_triton_gemm": False}
    assert lowered.calls == [{"xla_dump_to": "x"}, options]
    # Elsewhere, and for other errors, the compiler's error stands.
    with pytest.raises(RuntimeError, match="tile sizes"):
        gpu_targets.compile_lowered(FakeLowered(failure), "tpu", None)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        gpu_targets.compile_lowered(FakeLowered("RESOURCE_EXHAUSTED: hbm"), "cuda", None)


@needs_cuda_plugin
def test_the_resize_that_did_not_compile_for_an_h100_compiles_with_cublas_gemms():
    """Issue 24's failure: the bilinear resize of 4 x 64 x 64 x 19 logits to 512x512 (the
    pseudo-labels' upsampling), a standalone f32[38912,512] dot, has no Triton tiling on the
    compile-only path; with cuBLAS GEMMs it compiles."""
    import jax
    import jax.numpy as jnp

    from ddb_jax import ops

    device = aot.target_devices(aot.get_target("h100-1"))[0]
    logits = jax.ShapeDtypeStruct(
        (4, 64, 64, 19), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device)
    )
    lowered = jax.jit(lambda x: ops.resize_bilinear(x, (512, 512))).lower(logits)
    with pytest.raises(Exception, match=gpu_targets.TILING_FAILURE):
        lowered.compile()
    _, options = gpu_targets.compile_lowered(lowered, "cuda", None)
    assert options == gpu_targets.CUBLAS_GEMMS


@needs_cuda_plugin
def test_the_float32_step_at_batch_4_compiles_for_one_h100():
    config = tiny_config()
    config.model.bn_statistics = "two_pass"
    config.batch_size = 4
    report = aot.compile_stage(config, "h100-1")
    assert report["model"]["dtype"] == "float32" and report["batch_per_device"] == 4
    assert report["memory"]["fits"]


@needs_cuda_plugin
def test_compiler_state_layouts_spare_the_kernel_transposes(h100_reports):
    """Row-major HWIO conv kernels are transposed to cuDNN's filter layout every step (the
    parameters, their gradients, EMA and AdamW moments); in the compiler's own layouts most
    of those transposes and copies go, with the same memory to within a few percent."""
    _, reports = h100_reports
    row_major, compilers = reports[False], reports[True]
    assert compilers["state_layouts"] == "compiler's" and row_major["state_layouts"] == "row-major"
    assert compilers["hlo"]["transposes"] < row_major["hlo"]["transposes"] / 2
    assert compilers["hlo"]["copies"] <= row_major["hlo"]["copies"]
    assert compilers["memory"]["total"] <= 1.05 * row_major["memory"]["total"]
