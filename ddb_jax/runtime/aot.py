"""Compile-only checks: a stage's real train step, compiled for a named target from any machine.

``compile_stage(config, "v5e-8")`` builds the step the training loop runs for ``config``
(:func:`ddb_jax.methods.assemble.assemble`, then :func:`ddb_jax.methods.assemble.train_step`
with the loop's 1-D 'data' mesh, its shardings and the donated state), over the compile-only
devices of the target's topology (``jax.experimental.topologies``), lowers it with
``jax.ShapeDtypeStruct`` arguments (the state from ``jax.eval_shape``, so nothing of full size
is allocated; the batch from ``batch_size``, ``data.crop_size`` and ``data.target_crop_size``)
and compiles it with the target's compiler. The report, per device
(:mod:`ddb_jax.runtime.aot_figures`): memory against the device's, FLOPs, bytes accessed
and HBM traffic, the roofline bounds of the step time, and the collectives, transposes and
copies of the compiled program.

TPU targets need ``libtpu`` (the wheel ``jax[tpu]`` pins; the ``aot`` extra installs it);
NVIDIA targets the CUDA plugin and its NVIDIA wheels (the ``aot-gpu`` extra) and a
description of the card (:mod:`ddb_jax.runtime.gpu_targets`). :data:`TARGETS` is the table
of targets; a target names its PJRT ``platform`` and ``topology``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from ddb_jax import errors
from ddb_jax.ops import SIZE_SUFFIX
from ddb_jax.runtime import aot_figures, gpu_targets

GIB = aot_figures.GIB


@dataclasses.dataclass(frozen=True)
class Target:
    """A device set to compile for. Figures are per JAX device of the topology."""

    name: str
    platform: str  # PJRT platform of the compiler: 'tpu' (libtpu) or 'cuda' (the CUDA plugin)
    topology: str  # what jax.experimental.topologies.get_topology_desc takes
    devices: int  # JAX devices the topology gives
    device: str  # what one device is
    memory_bytes: int  # HBM per device
    peak_flops: float  # dense bf16 FLOP/s per device
    memory_bandwidth: float  # HBM bytes/s per device
    hosts: int = 1  # processes of the slice
    gpu: str = ""  # cuda: the card, a key of gpu_targets.GPUS


# NVIDIA targets: name, GPUs of one host, card (a key of gpu_targets.GPUS).
GPU_TARGETS = (
    ("h100-8", 8, "h100"),
    ("h100-1", 1, "h100"),
    ("h200-8", 8, "h200"),
    ("a100-40gb-8", 8, "a100_40gb"),
    ("l4-1", 1, "l4"),
    ("rtx3080-1", 1, "rtx3080"),
)

# Public specs (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): per chip HBM, peak bf16
# FLOP/s and HBM bandwidth. The compile-only v4 topology gives one device per TensorCore
# (two per chip, no megacore), so v4's figures are half a chip's.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("v4-8", "tpu", "v4:2x2x1", 8, "TPU v4 TensorCore (half a chip)",
               16 * GIB, 137.5e12, 614.4e9),
        Target("v5e-8", "tpu", "v5e:2x4", 8, "TPU v5 lite (v5e)", 16 * GIB, 197e12, 819e9),
        Target("v5e-16", "tpu", "v5e:4x4", 16, "TPU v5 lite (v5e), 4 hosts",
               16 * GIB, 197e12, 819e9, hosts=4),
        Target("v5p-8", "tpu", "v5p:2x2x1", 4, "TPU v5p (megacore)", 95 * GIB, 459e12, 2765e9),
        Target("v6e-8", "tpu", "v6e:2x4", 8, "TPU v6 lite (v6e, Trillium)",
               32 * GIB, 918e12, 1640e9),
        *(
            Target(name, "cuda", f"1x1x{n}", n, card.description(),
                   int(gpu_targets.JAX_POOL * card.memory), card.peak_bf16_flops,
                   card.memory_bandwidth, gpu=gpu)
            for name, n, gpu in GPU_TARGETS
            for card in [gpu_targets.GPUS[gpu]]
        ),
    )
}  # fmt: skip


class AotError(errors.UsageError):
    """A target that is not in the table, or whose compiler is not installed."""


def target_names() -> list[str]:
    return sorted(TARGETS)


LOCAL = "local"  # this process's own devices: compiled and, with aot_measure, run


def get_target(name: str) -> Target:
    if name == LOCAL:
        devices = jax.devices()
        spec = local_target(devices[0])
        return dataclasses.replace(
            spec, name=LOCAL, platform=devices[0].platform, topology=LOCAL, devices=len(devices)
        )
    if name not in TARGETS:
        raise AotError(f"unknown target {name!r}; known: {', '.join(target_names())}, or {LOCAL!r}")
    return TARGETS[name]


def local_target(device) -> Target:
    """The target describing ``device`` (a JAX device of this process), for putting the
    compile-time estimate of a program that ran here beside what was measured: a known
    NVIDIA card's one-GPU target (its data-sheet peaks give the roofline); anything else
    the device as it is, its memory from ``memory_stats`` where it reports one, no peaks."""
    kind = getattr(device, "device_kind", "") or ""
    for name, _, gpu in GPU_TARGETS:
        if gpu_targets.GPUS[gpu].name.lower() in kind.lower():
            one = dict(name=f"{name.rsplit('-', 1)[0]}-1", topology="1x1x1", devices=1)
            return dataclasses.replace(TARGETS[name], **one)
    stats = (device.memory_stats() if hasattr(device, "memory_stats") else None) or {}
    return Target("local", device.platform, "", 1, kind or device.platform,
                  int(stats.get("bytes_limit", 0)), 0.0, 0.0)  # fmt: skip


def target_devices(target: Target) -> list:
    """The target's compile-only devices (no hardware needed, only its compiler); the
    ``'local'`` target's: None (the training loop's mesh: ``config.mesh_devices`` of every
    process's devices)."""
    if target.topology == LOCAL:
        return None
    if target.platform == "cuda":
        try:
            devices = gpu_targets.compile_only_devices(target.gpu, target.topology)
        except gpu_targets.NoCudaCompiler as missing:
            raise AotError(f"target {target.name}: {missing}") from None
        return _checked(target, devices)
    if target.platform != "tpu":
        raise AotError(f"target {target.name}: platform {target.platform!r} is not wired")
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(
            f"target {target.name} needs the TPU compiler: pip install 'libtpu==0.0.42.*' "
            "(make venv EXTRAS=test,aot installs it)"
        )
    # libtpu takes a lockfile (/tmp/libtpu_lockfile) per machine unless told that several
    # processes may load it: compile-only clients touch no chip, so two checks (or a check
    # beside a test worker) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(
        topology_name=target.topology, platform=target.platform
    ).devices
    return _checked(target, devices)


def _checked(target: Target, devices: list) -> list:
    if len(devices) != target.devices:
        raise AotError(
            f"target {target.name}: topology {target.topology} gave {len(devices)} devices, "
            f"the table says {target.devices}"
        )
    return devices


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of ``tree``."""
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree_util.tree_leaves(tree)
    )


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a training stage steps on (input_pipeline.train's element): one
    target image per target stream (``data.per_target_streams``: one per target, MTAF's);
    images uint8 with their int32 '<key>_size' where ``data.image_transfer`` sends them so
    (:func:`input_pipeline.train.uint8_image_keys`; DAF's and ProDA's loaders: float32),
    the label uint8 then too (else int32)."""
    from input_pipeline import daf, proda
    from input_pipeline.train import images_as_uint8, target_stream_keys, uint8_image_keys

    b = config.batch_size
    source = tuple(config.data.crop_size)
    target = tuple(config.data.get("target_crop_size") or source)
    own_loader = config.get("stage") in (*daf.KINDS, *proda.KINDS)
    uint8 = () if own_loader else uint8_image_keys(config.data)
    shapes = {}

    def image(key: str, size: tuple[int, int]) -> None:
        dtype = jnp.uint8 if key in uint8 else jnp.float32
        shapes[key] = jax.ShapeDtypeStruct((b, *size, 3), dtype)
        if key in uint8:
            shapes[key + SIZE_SUFFIX] = jax.ShapeDtypeStruct((b, 2), jnp.int32)

    image("source_image", source)
    label = jnp.int32 if own_loader or not images_as_uint8(config.data) else jnp.uint8
    shapes["source_label"] = jax.ShapeDtypeStruct((b, *source), label)
    for key in target_stream_keys(config.data):
        image(key, target)
    if config.data.get("source_depth", False):  # DADA's inverse depth of the source crop
        shapes["source_depth"] = jax.ShapeDtypeStruct((b, *source), jnp.float32)
    if any(config.data.get("target_pseudo_margins", None) or ()):  # HRDA's valid mask
        shapes["target_valid"] = jax.ShapeDtypeStruct((b, *target), jnp.float32)
    return shapes


@dataclasses.dataclass
class StageProgram:
    """The stage's jitted step and its abstract arguments (shardings attached)."""

    step: Any
    state: Any  # ShapeDtypeStructs of the train state, replicated
    batch: dict[str, jax.ShapeDtypeStruct]  # global batch, split over 'data'
    frozen: Any  # ShapeDtypeStructs of what the method reads but never trains, or None
    mesh: jax.sharding.Mesh


def with_sharding(tree, sharding):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )


def stage_program(
    config: ml_collections.ConfigDict, devices, compiler_state_layouts: bool = False
) -> StageProgram:
    """The training loop's step for ``config`` over ``devices``, without allocating the state
    (``compiler_state_layouts``: the state in the layouts the compiler picks, as
    ``config.state_layouts='compiler'`` trains)."""
    from ddb_jax import methods, models
    from ddb_jax.methods import assemble
    from ddb_jax.train import setup

    # CKD's teachers, an ImageNet backbone: shapes from the config, no file read.
    frozen = methods.frozen_shapes(config)
    mesh = setup.make_mesh(config, devices=devices)
    model = models.build_model(config.model)
    variables = models.variable_shapes(model, tuple(config.data.crop_size))
    _, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
    built: dict[str, Any] = {}

    def initial_state(variables, key):
        built["stage"] = assemble.assemble(config, variables, key)
        return built["stage"].state

    state = jax.eval_shape(initial_state, variables, state_key)
    stage = dataclasses.replace(built["stage"], state=None)  # model, method, optimisers
    step = assemble.train_step(stage, mesh, config.image_summary_every > 0, compiler_state_layouts)
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))
    return StageProgram(
        step=step,
        state=with_sharding(state, replicated),
        batch=with_sharding(batch_shapes(config), data),
        frozen=None if frozen is None else with_sharding(frozen, replicated),
        mesh=mesh,
    )


def compile_stage(
    config: ml_collections.ConfigDict,
    target: str,
    compiler_options: dict | None = None,
    compiler_state_layouts: bool = False,
    keep_hlo: bool = False,
) -> dict[str, Any]:
    """Compiles ``config``'s train step for ``target`` (a :data:`TARGETS` name, or
    ``'local'``: this process's devices); the report (a JSON-able dict; memory and cost per
    device). ``compiler_options``: XLA options of this compile
    (``lowered.compile(compiler_options=...)``); ``compiler_state_layouts``: the train state
    in the layouts the compiler picks (:func:`stage_program`); ``keep_hlo``: the compiled
    program's HLO text too, under ``'hlo_text'``."""
    _, compiled, report = compile_program(config, target, compiler_options, compiler_state_layouts)
    if keep_hlo:
        report["hlo_text"] = compiled.as_text()
    return report


def compile_program(
    config: ml_collections.ConfigDict,
    target: str,
    compiler_options: dict | None = None,
    compiler_state_layouts: bool = False,
) -> tuple[StageProgram, Any, dict[str, Any]]:
    """:func:`compile_stage`'s program, compiled executable and report."""
    spec = get_target(target)
    devices = target_devices(spec)
    start = time.perf_counter()
    compiler_state_layouts |= config.get("state_layouts", "row_major") == "compiler"
    program = stage_program(config, devices, compiler_state_layouts)
    lowered = program.step.lower(program.state, program.batch, program.frozen)
    lowered_s = time.perf_counter() - start
    compiled, options = gpu_targets.compile_lowered(lowered, spec.platform, compiler_options)
    compile_s = time.perf_counter() - start - lowered_s
    n = len(program.mesh.devices.flat)
    report = {
        "target": dataclasses.asdict(spec),
        "stage": config.stage,
        "model": {k: config.model.get(k) for k in ("backbone", "head", "dtype", "remat")},
        "batch_size": config.batch_size,
        "batch_per_device": config.batch_size // n,
        "crop_size": list(config.data.crop_size),
        "target_crop_size": list(config.data.get("target_crop_size") or config.data.crop_size),
        "mesh_devices": n,
        "predicted": {  # what the arguments hold, per device, from the abstract tree
            "state_bytes": tree_bytes(program.state),
            "batch_bytes_per_device": tree_bytes(program.batch) // n,
            "frozen_bytes": tree_bytes(program.frozen),
            # the same in the compiler's layouts (TPU tiles pad the minor dimensions)
            "in_layouts": aot_figures.arguments_in_layouts(
                {"state": program.state, "batch": program.batch, "frozen": program.frozen},
                compiled,
            ),
        },
        **aot_figures.program_figures(compiled, spec),
        "lower_s": round(lowered_s, 2),
        "compile_s": round(compile_s, 2),
        "compiler_options": options,
        "state_layouts": "compiler's" if compiler_state_layouts else "row-major",
        "jax": jax.__version__,
    }
    return program, compiled, report
