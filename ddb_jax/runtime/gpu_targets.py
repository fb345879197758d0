"""NVIDIA GPUs as compile-only targets: what XLA:GPU's compiler needs to know of a card.

Without a GPU, the CUDA plugin compiles for a device described by a ``GpuTargetConfig``
(text proto): its compute capability, streaming multiprocessors, shared memory, registers,
clocks, memory and bandwidth, and the cuDNN version the program will meet. The figures
below are the cards' public specifications (NVIDIA's data sheets and CUDA's device
queries); the compiler uses them for its tiling, fusion and kernel choices, not for
timing; the peak FLOP/s beside them (NVIDIA's data sheets) give the roofline. The
targets, cards times a count, are in :data:`ddb_jax.runtime.aot.TARGETS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The cuDNN the plugin's wheels bring (jax-cuda12-plugin 0.10.2 asks for cuDNN 9.8+).
CUDNN_VERSION = (9, 8, 0)


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One card as its CUDA device query reports it."""

    name: str  # the device name a driver reports
    compute_capability: tuple[int, int]
    sms: int  # streaming multiprocessors
    fp32_lanes_per_sm: int
    threads_per_sm: int
    shared_memory_per_sm: int  # bytes
    shared_memory_per_block_optin: int  # bytes, the most one block may ask for
    l2_cache: int  # bytes
    clock_ghz: float  # boost clock
    memory: int  # bytes the device reports
    memory_bandwidth: float  # bytes/s
    peak_bf16_flops: float  # dense tensor FLOP/s, float32 accumulation (GeForce: half rate)

    def description(self) -> str:
        major, minor = self.compute_capability
        return (
            f"{self.name}, compute capability {major}.{minor}, {self.memory / 2**30:.1f} GiB "
            f"(a JAX process takes {JAX_POOL:.0%})"
        )


# The share of a GPU's memory a JAX process allocates by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION): the memory a step must fit.
JAX_POOL = 0.75


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 2048, 233472, 232448,
                    50 * 2**20, 1.98, 84942979072, 3.35e12, 989e12),
    "h200": GpuSpec("NVIDIA H200", (9, 0), 132, 128, 2048, 233472, 232448,
                    50 * 2**20, 1.98, 151397597184, 4.8e12, 989e12),
    "a100_40gb": GpuSpec("NVIDIA A100-SXM4-40GB", (8, 0), 108, 64, 2048, 167936, 166912,
                         40 * 2**20, 1.41, 42331013120, 1.555e12, 312e12),
    "l4": GpuSpec("NVIDIA L4", (8, 9), 58, 128, 1536, 102400, 101376,
                  48 * 2**20, 2.04, 24152899584, 300e9, 121e12),
    "rtx3080": GpuSpec("NVIDIA GeForce RTX 3080", (8, 6), 68, 128, 1536, 102400, 101376,
                       5 * 2**20, 1.71, 10496245760, 760e9, 59.5e12),
}  # fmt: skip


def target_config(gpu: GpuSpec) -> str:
    """``gpu`` as the ``GpuTargetConfig`` text proto that
    ``jax.experimental.topologies.get_topology_desc(platform='cuda', target_config=...)``
    takes."""
    major, minor = gpu.compute_capability
    cudnn_major, cudnn_minor, cudnn_patch = CUDNN_VERSION
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 49152,
        "shared_memory_per_core": gpu.shared_memory_per_sm,
        "threads_per_core_limit": gpu.threads_per_sm,
        "core_count": gpu.sms,
        "fpus_per_core": gpu.fp32_lanes_per_sm,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(gpu.memory_bandwidth),
        "l2_cache_size": gpu.l2_cache,
        "clock_rate_ghz": gpu.clock_ghz,
        "device_memory_size": gpu.memory,
        "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    lines = ["gpu_device_info {"]
    lines += [f"  {key}: {value}" for key, value in info.items()]
    lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "}"]
    lines += [
        'platform_name: "CUDA"',
        f"dnn_version_info {{ major: {cudnn_major} minor: {cudnn_minor} patch: {cudnn_patch} }}",
        f'device_description_str: "{gpu.name}"',
    ]
    return "\n".join(lines) + "\n"


class NoCudaCompiler(RuntimeError):
    """The CUDA plugin (XLA:GPU's compiler) is not installed."""


def has_cuda_compiler() -> bool:
    """Whether the CUDA plugin (``jax_plugins.xla_cuda12``) is installed."""
    import importlib.util

    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def compile_only_devices(gpu: str, topology: str) -> list:
    """The compile-only devices of ``topology`` ('1x1xN': N GPUs of one host) of ``GPUS[gpu]``
    cards: no GPU or driver needed, only the CUDA plugin and its NVIDIA wheels."""
    import os

    if not has_cuda_compiler():
        raise NoCudaCompiler(
            "needs XLA:GPU's compiler: make venv EXTRAS=test,aot-gpu (the CUDA plugin and its "
            "NVIDIA wheels, about 5 GB)"
        )
    # The plugin checks the installed CUDA libraries against a driver; there is none here.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(
        platform="cuda", target_config=target_config(GPUS[gpu]), topology=topology
    ).devices


# XLA:GPU without a device cannot autotune, and its default Triton GEMM tiling fails on some
# standalone dots (e.g. jax.image.resize's, f32[38912,512] for 64 -> 512 of 19 classes x 4
# images, any precision and dtype): "Couldn't find output tile sizes". A GPU autotunes and
# may pick another kernel; here the compile is redone with cuBLAS for those dots.
TILING_FAILURE = "Couldn't find output tile sizes"
CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}


def compile_lowered(lowered: Any, platform: str, options: dict | None) -> tuple[Any, dict]:
    """``lowered.compile(options)``; for a cuda target whose Triton GEMM tiling fails, the
    compile again with cuBLAS GEMMs. The compiled program and the options it used."""
    options = dict(options or {})
    try:
        return lowered.compile(compiler_options=options or None), options
    except Exception as error:
        if platform != "cuda" or TILING_FAILURE not in str(error):
            raise
    retry = {**options, **CUBLAS_GEMMS}
    return lowered.compile(compiler_options=retry), retry
