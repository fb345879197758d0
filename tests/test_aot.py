"""The compile-only check (ddb_jax.runtime.aot): a tiny self-training stage's real train step,
compiled for a TPU v5e-8 slice on this CPU, and what its memory and program must be.

The arguments of the step, per device, are the replicated train state (parameters, BN
statistics, AdamW state, the EMA teacher, step and key) and this device's slice of the
batch; the state is donated, so the outputs are the state in the same buffers plus the
metrics; the gradients and BN statistics are all-reduced over the 'data' axis.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from ddb_jax.runtime import aot, aot_figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu (the TPU compiler, in the test extra) is not installed",
)


TRAINING_FORWARDS = 3  # r1_cu: the student on the source and on the mixed images, the teacher
TRAINING_BACKWARDS = 2  # the student's two forwards


def tiny_config():
    """configs/demo.py's r1_cu (ResNet-18 DLV2 self-training), narrower and on 32x32 crops,
    with the one-pass BatchNorm statistics (one all-reduce per layer and forward)."""
    from configs import demo

    config = demo.get_config("r1_cu")
    config.model.base_channels = 8
    config.model.head_channels = 8
    config.model.conv_impl = "lax"  # the accelerators' convolution
    config.data.crop_size = (32, 32)
    config.batch_size = 8  # one pair per device of v5e-8
    config.mesh_devices = 0
    config.image_summary_every = 0
    config.model.bn_statistics = "one_pass"
    return config


@pytest.fixture(scope="module")
def compiled():
    config = tiny_config()
    program, _, report = aot.compile_program(config, "v5e-8")
    return config, program, report


@needs_libtpu
def test_arguments_are_the_state_and_a_batch_slice(compiled):
    config, program, report = compiled
    state, batch = program.state, program.batch
    assert program.frozen is None  # r1_cu reads no frozen inputs
    # The state holds the student, its AdamW moments and the EMA teacher, whole on every device.
    params = aot.tree_bytes(state.params)
    assert aot.tree_bytes(state.ema_params) == params
    assert aot.tree_bytes(state.ema_batch_stats) == aot.tree_bytes(state.batch_stats)
    assert aot.tree_bytes(state.opt_state) >= 2 * params  # mu and nu
    state_bytes = (
        2 * params + 2 * aot.tree_bytes(state.batch_stats) + aot.tree_bytes(state.opt_state)
        + aot.tree_bytes((state.step, state.key, state.others))
    )  # fmt: skip
    predicted = report["predicted"]
    assert predicted["state_bytes"] == state_bytes
    # One image pair (uint8, each with its int32 (height, width)) and one uint8 label map
    # per device: the batch split over 8 devices.
    h, w = config.data.crop_size
    assert predicted["batch_bytes_per_device"] == (3 * h * w + 2 * 4) * 2 + h * w
    assert aot.tree_bytes(batch) // 8 == predicted["batch_bytes_per_device"]
    # The compiler's argument bytes are exactly those arrays, in its tiled layouts.
    memory, layouts = report["memory"], predicted["in_layouts"]
    assert memory["arguments"] == layouts["state"] + layouts["batch"]
    assert layouts["frozen"] == 0
    assert layouts["state"] >= state_bytes
    assert layouts["batch"] >= predicted["batch_bytes_per_device"]


@needs_libtpu
def test_outputs_are_the_donated_state_and_metrics(compiled):
    _, _, report = compiled
    memory, layouts = report["memory"], report["predicted"]["in_layouts"]
    assert memory["aliased"] == layouts["state"]  # the new state in the donated buffers
    metrics = memory["outputs"] - memory["aliased"]
    assert 0 < metrics <= 64 * 512  # a few scalars, one tile each
    assert memory["total"] >= memory["arguments"] + memory["temporaries"]
    assert memory["fits"] and memory["device"] == 16 * aot.GIB


@needs_libtpu
def test_gradients_and_bn_statistics_are_all_reduced(compiled):
    _, program, report = compiled
    hlo = report["hlo"]
    # Every gradient crosses the 'data' axis once (more with the BN statistics).
    assert hlo["collective_bytes"] >= aot.tree_bytes(program.state.params)
    # One-pass statistics: one all-reduce per BatchNorm layer and training forward or backward
    # at most (the backward's two sums together), the gradients' and the metrics' included.
    # Two-pass statistics need two dependent ones per layer and forward: 169 here.
    layers = len(jax.tree_util.tree_leaves(program.state.batch_stats)) // 2
    passes = TRAINING_FORWARDS + TRAINING_BACKWARDS
    assert 0 < hlo["collectives"]["all-reduce"]["count"] <= layers * passes < 169
    assert report["cost"]["flops"] > 0 and report["cost"]["bytes"] > 0
    assert report["roofline"]["bound_s"] > 0
    assert "| total / device |" in aot_figures.markdown(report)


@needs_libtpu
def test_hbm_traffic_of_the_step(compiled):
    """The step's HBM traffic from its HLO: within XLA's bytes accessed (which also counts
    on-chip operands), at least the state read once and written once (donated, updated in
    place), with forward and backward work in it and every byte attributed once."""
    _, program, report = compiled
    traffic, cost = report["traffic"], report["cost"]
    assert 2 * aot.tree_bytes(program.state) <= traffic["total"] <= cost["bytes"]
    assert sum(traffic["by_pass_and_part"].values()) == traffic["total"]
    assert sum(v["bytes"] for v in traffic["by_kind"].values()) == traffic["total"]
    passes = {key.split(" / ")[0] for key in traffic["by_pass_and_part"]}
    assert {"forward", "backward", "train state"} <= passes
    roofline = report["roofline"]
    assert roofline["hbm_s"] == traffic["total"] / aot.get_target("v5e-8").memory_bandwidth
    assert "| HBM traffic / device (HLO) |" in aot_figures.markdown(report)


EVAL_IMAGE, EVAL_LABEL = (32, 64), (64, 128)


@needs_libtpu
def test_evaluation_is_the_model_and_one_image_on_one_device():
    """The evaluate stage's program (sliding 32x32 windows, stride 16, over a 32x64 image;
    the prediction resized to a 64x128 label): its arguments are exactly the segmentor's
    variables and the image and label in the compiler's layouts, its output the confusion
    matrix, and one device needs no collective."""
    from ddb_jax.runtime import aot_programs

    config = tiny_config()
    config.eval.mode, config.eval.crop_size, config.eval.stride = "slide", (32, 32), (16, 16)
    report = aot_programs.compile_evaluation(config, "v5e-8", EVAL_IMAGE, EVAL_LABEL)
    predicted, memory = report["predicted"], report["memory"]
    assert predicted["input_bytes"] == (32 * 64 * 3 + 64 * 128) * 4
    layouts = predicted["in_layouts"]
    assert memory["arguments"] == layouts["variables"] + layouts["image"] + layouts["label"]
    assert layouts["variables"] >= predicted["variables_bytes"] > 0
    classes = config.model.num_classes
    assert classes * classes * 4 <= memory["outputs"] <= 4 * 128 * 32  # int32, one tile or two
    assert memory["aliased"] == 0 and memory["fits"]
    assert report["hlo"]["collective_count"] == 0
    assert report["cost"]["flops"] > 0
    table = aot_programs.markdown(report)
    assert "slide [32, 32] windows, stride [16, 16]" in table and "| total / device |" in table


@needs_libtpu
def test_prototype_pass_is_the_model_the_table_and_a_batch_slice():
    """The prototype stage's update of one global batch (8 crops of 32x32 over v5e-8): its
    arguments are the segmentor's variables, the (classes x channels) table and the counts,
    replicated, and one crop per device; its outputs the new table and counts."""
    from ddb_jax.runtime import aot_programs

    config = tiny_config()
    config.prototypes.batch_size = 8
    report = aot_programs.compile_prototypes(config, "v5e-8")
    predicted, memory = report["predicted"], report["memory"]
    classes, channels = config.model.num_classes, config.model.head_channels
    assert predicted["table_bytes"] == (classes * channels + classes) * 4
    h, w = config.data.crop_size
    assert report["batch_per_device"] == 1
    assert predicted["batch_bytes_per_device"] == h * w * 3 * 4 + 1 + 4  # image, valid, index
    layouts = predicted["in_layouts"]
    assert memory["arguments"] == sum(layouts.values())
    assert layouts["table"] >= classes * channels * 4 and layouts["counts"] >= classes * 4
    assert layouts["counts"] + layouts["table"] <= memory["outputs"] <= 2 * memory["arguments"]
    assert "| prototype pass |" in aot_programs.prototypes_markdown(report)


@needs_libtpu
def test_ckd_stage_compiles_without_its_teacher_files(tmp_path):
    """CKD's step with both teachers and their prototype tables, compiled from the config
    alone (no exported model or prototype file exists): its arguments are the state, the
    batch slice and the two frozen teachers with their (classes x channels) tables."""
    from configs import demo

    config = demo.get_config("r1_ckd")
    for key in ("model", "data", "batch_size", "mesh_devices", "image_summary_every"):
        config[key] = tiny_config()[key]
    for key in ("teacher_cu", "teacher_ca", "prototypes_cu", "prototypes_ca"):
        config.ckd[key] = str(tmp_path / "missing" / key)
    program, _, report = aot.compile_program(config, "v5e-8")
    student = aot.tree_bytes((program.state.params, program.state.batch_stats))
    table = config.model.num_classes * config.model.head_channels * 4
    assert aot.tree_bytes(program.frozen) == 2 * (student + table)
    layouts = report["predicted"]["in_layouts"]
    assert report["memory"]["arguments"] == layouts["state"] + layouts["batch"] + layouts["frozen"]
    assert layouts["frozen"] >= report["predicted"]["frozen_bytes"] == 2 * (student + table)
    assert report["memory"]["fits"] and report["hlo"]["collective_count"] > 0


def test_hlo_counts():
    text = """
  %all-reduce-start.1 = (f32[16]{0}, f32[3,3]{1,0}) all-reduce-start(f32[16]{0} %a, %b)
  %all-reduce-done.1 = (f32[16]{0}, f32[3,3]{1,0}) all-reduce-done(%all-reduce-start.1)
  %ar = bf16[8]{0} all-reduce(bf16[8]{0} %c), replica_groups={}
  %t = f32[3,16]{1,0} transpose(f32[16,3]{1,0} %d), dimensions={1,0}
  %c.1 = f32[16]{0} copy(f32[16]{0} %a)
"""
    counts = aot_figures.hlo_counts(text)
    assert counts["collectives"] == {"all-reduce": {"count": 2, "bytes": 16 * 4 + 9 * 4 + 8 * 2}}
    assert (counts["transposes"], counts["copies"]) == (1, 1)


def test_unknown_target_is_one_line():
    with pytest.raises(aot.AotError, match="unknown target 'v9-8'; known: .*v5e-8"):
        aot.get_target("v9-8")
    run = subprocess.run(
        [sys.executable, "tools/aot_check.py", "--config=configs/demo.py:r1_cu", "--target=v9"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: unknown target 'v9'")
    run = subprocess.run(
        [sys.executable, "tools/aot_check.py", "--config=configs/demo.py:r1_cu",
         "--program=eval", "--eval_image=512x1024"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: --eval_image='512x1024': expected H,W (two positive ints)"
    )


def test_missing_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(aot.AotError, match="needs the TPU compiler: pip install 'libtpu"):
        aot.target_devices(aot.get_target("v5e-8"))


def test_padded_bytes():
    sds = jax.ShapeDtypeStruct((3, 3, 16, 16), "float32")

    class Layout:
        major_to_minor = (0, 1, 2, 3)
        tiling = ((8, 128),)

    assert aot_figures.padded_bytes(sds, Layout) == 3 * 3 * 16 * 128 * 4
    assert aot_figures.padded_bytes(sds, None) == 3 * 3 * 16 * 16 * 4


def test_batch_shapes_follow_the_target_streams():
    """One 'target_image_<name>' per target with ``data.per_target_streams`` (MTAF's
    loaders: what input_pipeline.train yields), else one 'target_image'; no compile."""
    from configs import mtaf_demo
    from input_pipeline.train import target_stream_keys

    config = mtaf_demo.get_config("mdis")
    config.data.target_crop_size = (64, 96)
    shapes = aot.batch_shapes(config)
    b, (h, w) = config.batch_size, config.data.crop_size
    streams = [f"target_image_{name}" for name in config.data.target]
    assert len(streams) == 2 and tuple(streams) == target_stream_keys(config.data)
    sizes = [f"{key}_size" for key in streams]
    assert list(shapes) == [
        "source_image",
        "source_image_size",
        "source_label",
        *(k for pair in zip(streams, sizes, strict=True) for k in pair),
    ]
    assert shapes["source_label"].shape == (b, h, w)
    for key in streams:  # uint8 pixels, normalised on the device
        assert (shapes[key].shape, shapes[key].dtype) == ((b, 64, 96, 3), jax.numpy.uint8)
        assert (shapes[f"{key}_size"].shape, shapes[f"{key}_size"].dtype) == ((b, 2), "int32")
    config.data.per_target_streams = False
    config.data.source_depth = True
    config.data.image_transfer = "float32"  # images normalised on the host, no sizes
    shapes = aot.batch_shapes(config)
    assert list(shapes) == ["source_image", "source_label", "target_image", "source_depth"]
    assert shapes["source_depth"].shape == (b, h, w)
    assert shapes["source_image"].dtype == shapes["target_image"].dtype == jax.numpy.float32


HLO_MODULE = """
%fused_conv (p0: bf16[4,8], p1: bf16[8,8]) -> bf16[4,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %convolution.1 = bf16[4,8]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf
}

%fused_add (p0: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %add.1 = f32[4,8]{1,0} add(%p0, %p0)
}

ENTRY %main (param: bf16[4,8], param.1: f32[3,8,8]) -> f32[4,8] {
  %param = bf16[4,8]{1,0:T(8,128)} parameter(0), metadata={op_name="batch['x']"}
  %param.1 = f32[3,8,8]{2,1,0} parameter(1), metadata={op_name="state.params['conv1']"}
  %slice-start.1 = ((f32[3,8,8]{2,1,0}), f32[1,8,8]{2,1,0:S(1)}, s32[]{:S(2)}) \
slice-start(%param.1), slice={[0:1], [0:8], [0:8]}
  %slice-done.1 = f32[1,8,8]{2,1,0:S(1)} slice-done(%slice-start.1)
  %copy-start.1 = (bf16[4,8]{1,0:S(1)}, bf16[4,8]{1,0}, u32[]{:S(2)}) copy-start(%param)
  %copy-done.1 = bf16[4,8]{1,0:S(1)} copy-done(%copy-start.1)
  %bitcast.1 = bf16[8,8]{1,0:S(1)} bitcast(%slice-done.1)
  %fusion.1 = bf16[4,8]{1,0} fusion(%copy-done.1, %bitcast.1), kind=kOutput, \
calls=%fused_conv, metadata={op_name="FORWARD/conv1/conv_general_dilated"}
  %fusion.2 = f32[4,8]{1,0} fusion(%fusion.1), kind=kLoop, calls=%fused_add, \
metadata={op_name="BACKWARD/bn1/add"}
  %all-reduce.1 = f32[4,8]{1,0} all-reduce(%fusion.2), replica_groups={}, to_apply=%fused_add
  ROOT %copy.1 = f32[4,8]{1,0} copy(%all-reduce.1)
}
"""


def test_hbm_traffic_counts_main_memory_only():
    """By hand: the async slice reads 256 bytes of HBM into on-chip memory (writes none), the
    async copy reads the 64-byte input; the convolution fusion reads two on-chip operands and
    writes 64 bytes of HBM; the backward's fusion reads those 64 and writes 128; the
    all-reduce and the copy read and write 128 each."""
    from ddb_jax.runtime import hlo_traffic

    layer = "backbone/layer1_0"
    module = (  # (HLO_MODULE's backslash-newlines already join its long lines)
        HLO_MODULE.replace("FORWARD", f"jit(step)/jvp(EncoderDecoder)/{layer}").replace(
            "BACKWARD", f"jit(step)/transpose(jvp(EncoderDecoder))/{layer}"
        )
    )
    out = hlo_traffic.traffic(module)
    assert out["total"] == 256 + 64 + 64 + (64 + 128) + 2 * (128 + 128)
    assert out["by_kind"]["convolution"] == {"bytes": 64, "ops": 1}
    assert out["by_kind"]["elementwise"] == {"bytes": 192, "ops": 1}
    assert out["by_kind"]["copy"] == {"bytes": 64 + 256, "ops": 2}  # copy-start and copy
    assert out["by_kind"]["collective"] == {"bytes": 256, "ops": 1}
    assert out["by_kind"]["other"] == {"bytes": 256, "ops": 1}  # the slice
    by_pass = out["by_pass_and_part"]
    assert by_pass["train state / other"] == 256 and by_pass["batch / other"] == 64
    assert by_pass["forward / conv"] == 64
    # The all-reduce and the copy have no name of their own: they take the fusion's.
    assert by_pass["backward / norm"] == 192 + 256 + 256
    assert sum(by_pass.values()) == out["total"]
    assert out["top"][0]["name"] == "slice-start.1"
    assert hlo_traffic.shape_bytes("(bf16[4,8]{1,0:S(1)}, f32[2])", hbm_only=False) == 72
