"""The device check: one command, one GPU, under 8 minutes with compilation, JSON + markdown.

Measures, on synthetic batches (no TensorFlow, tensorflow-datasets or CLU is imported):

* DLV2-R101 self-training step, 512x512, batch 4: ours in float32 and bfloat16 (lax convs,
  ``make_train_step`` as the stages jit it) and the PyTorch reference step on the same
  device and inputs (torch_ref's transcription: fp32 with its host-side strong augmentation
  as transcribed; fp32 and bf16-autocast with the augmentation on the device, as DACS does):
  ms/step, images/s (source+target pairs), TFLOP/s (XLA's FLOP count of our compiled step)
  and % of the bf16 matmul peak measured in the same run (8192^2 ``jnp.dot``);
* MiT-B5 + DAFormer self-training step, 512x512, batch 2, bfloat16;
* executed device peak memory (``peak_bytes_in_use``, one fresh process per configuration)
  with remat off and on, for both models;
* evaluation images/s at 1024x512 (whole-image inference, mIoU confusion on the device,
  labels at 2048x1024 as Cityscapes'), DLV2-R101 float32/bfloat16 and MiT-B5 bfloat16;
* beside each step, the compile-time estimate of that very program as
  ``tools/aot_check.py`` reports it (memory per device, HBM traffic from the HLO, the
  roofline bound from the card's data-sheet peaks), and measured / estimated: the first
  GPU run calibrates the compile-only check.

Each part runs in its own process, in priority order, within ``--budget`` seconds in all
(parts that no longer fit are reported as skipped); the results go to
``<out>/device_check.json`` and ``<out>/device_check.md``.

    bash benchmarks/device_check.sh                   # on the GPU machine (wheels: see there)
    .venv/bin/python benchmarks/device_check.py --smoke --out /tmp/dc   # CPU, tiny, < 60 s

``--smoke`` runs every part on tiny models (ResNet-18 at width 8, MiT-B0 with one block
per stage, 64x64 crops, batch 2, 2 timed steps) on the CPU, in one process except the
PyTorch part, and checks that the benchmark's PyTorch step is the reference step (same
losses). tests/test_device_check.py runs it (make test-bench).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
GB = 1e9
GIB = 2.0**30

# Targets of the GPU run (the project's issue).
TARGET_SPEEDUP = 2.5  # ours (bf16) / the PyTorch reference step, same GPU
TARGET_R101_BF16_MS = 40.0  # on an H100/H200-class GPU
TARGET_MITB5_PEAK_BYTES = 10 * GB  # batch 2, bfloat16

FULL = dict(
    r101=dict(backbone="resnet101_v1c", head="dlv2", base_channels=64, head_channels=256),
    mit=dict(backbone="mit_b5", head="daformer", base_channels=64, head_channels=256),
    size=512, r101_batch=4, mit_batch=2, eval_hw=(512, 1024), label_hw=(1024, 2048),
    steps=10, warmup=2, eval_steps=10, peak_size=8192, torch_steps=10,
)  # fmt: skip
SMOKE = dict(
    r101=dict(backbone="resnet18_v1c", head="dlv2", base_channels=8, head_channels=16),
    mit=dict(backbone="mit_b0", head="daformer", base_channels=64, head_channels=32),
    size=64, r101_batch=2, mit_batch=2, eval_hw=(32, 64), label_hw=(64, 128),
    steps=2, warmup=1, eval_steps=2, peak_size=256, torch_steps=2,
)  # fmt: skip

# name -> (kind, options); run in this order (priority). 'r101' rows are DLV2-R101 in the
# full check and the tiny ResNet-18 in the smoke run; 'mit' rows MiT-B5 / MiT-B0.
PARTS = {
    "r101_bf16": ("jax_step", dict(model="r101", dtype="bfloat16", remat=False, peaks=True)),
    "torch_r101": ("torch_step", dict(model="r101")),
    "r101_f32": ("jax_step", dict(model="r101", dtype="float32", remat=False)),
    "mit_bf16": ("jax_step", dict(model="mit", dtype="bfloat16", remat=False)),
    "eval": ("eval", dict()),
    "r101_bf16_layouts": (
        "jax_step",
        dict(model="r101", dtype="bfloat16", remat=False, layouts="compiler"),
    ),
    "r101_bf16_remat": ("jax_step", dict(model="r101", dtype="bfloat16", remat=True)),
    "mit_bf16_remat": ("jax_step", dict(model="mit", dtype="bfloat16", remat=True)),
}
STEP_PARTS = [name for name, (kind, _) in PARTS.items() if kind == "jax_step"]
# Rough GPU seconds a part needs (start-up, compile, steps); a part is skipped when less
# than this is left of the budget.
MIN_SECONDS = dict(jax_step=60, torch_step=30, eval=45)


def sizes(smoke: bool) -> dict:
    return SMOKE if smoke else FULL


def shrink_mit_b0() -> None:
    """Smoke only: MiT-B0 with one block per stage (in this process), so its step compiles
    in a third of the time; the code path is the same."""
    import dataclasses

    from ddb_jax.models import mit

    mit.MIT_SPECS["b0"] = dataclasses.replace(mit.MIT_SPECS["b0"], depths=(1, 1, 1, 1))


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections",
                 "numpy", "torch"):  # fmt: skip
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _block(x):
    import jax

    return jax.block_until_ready(x)


def run_jax_step(name: str, opts: dict, smoke: bool) -> dict:
    import bench_common as bc
    import jax

    s = sizes(smoke)
    spec = s[opts["model"]]
    batch = s["r101_batch"] if opts["model"] == "r101" else s["mit_batch"]
    config = bc.st_config(
        spec["backbone"], s["size"], batch, opts["dtype"], "lax", opts["remat"], spec["head"],
        spec["base_channels"], spec["head_channels"],
    )  # fmt: skip
    config.state_layouts = opts.get("layouts", "row_major")
    batch_np = bc.make_batch(batch, s["size"])
    student = bc.torch_models(config)[0] if opts["model"] == "r101" else None
    counter = bc.CompileCounter()
    step = bc.JaxStep(config, batch_np, student, counter)
    step.warm_up(s["warmup"])
    for _ in range(s["steps"]):
        step()
    result = {
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        "model": spec["backbone"] + "+" + spec["head"],
        "dtype": opts["dtype"],
        "remat": opts["remat"],
        "state_layouts": config.state_layouts,
        "batch": batch,
        "size": s["size"],
        "conv_impl": "lax",
        **step.summary(),
        **step.memory_analysis(),
    }
    assert result["recompiles"] == 0, result["recompiles"]
    stats = jax.devices()[0].memory_stats() or {}
    result["device_peak_bytes"] = stats.get("peak_bytes_in_use")  # None on CPU
    result["estimate"] = compile_time_estimate(step.compiled)
    if opts.get("peaks"):  # after the peak memory reading: the matmuls allocate too
        result["jax_matmul_peak_bf16"] = bc.matmul_peak("bfloat16", s["peak_size"])
        result["jax_matmul_peak_f32"] = bc.matmul_peak("float32", s["peak_size"])
    return result


def compile_time_estimate(compiled) -> dict:
    """What tools/aot_check.py reports for this very program (ddb_jax.runtime.aot's figures
    with this device's target: a known card's data-sheet peaks), to set beside the
    measurement: memory per device, HBM traffic and the roofline bound."""
    import jax

    from ddb_jax.runtime import aot, aot_figures

    target = aot.local_target(jax.devices()[0])
    figures = aot_figures.program_figures(compiled, target)
    roofline = figures["roofline"]
    return {
        "target": target.name,
        "memory_total_bytes": figures["memory"]["total"],
        "hbm_traffic_bytes": figures["traffic"]["total"],
        "roofline_s": roofline["hbm_bound_s"] if roofline else None,
        "xla_roofline_s": roofline["bound_s"] if roofline else None,
    }


def run_torch_step(name: str, opts: dict, smoke: bool) -> dict:
    import bench_common as bc
    import numpy as np
    import torch

    s = sizes(smoke)
    spec = s["r101"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        torch.set_num_threads(1)  # tiny ops: threads only add barrier waits
    # mmseg/DAFormer runs set cudnn_benchmark = True.
    torch.backends.cudnn.benchmark = True
    config = bc.st_config(
        spec["backbone"], s["size"], s["r101_batch"], "float32", "lax", False, spec["head"],
        spec["base_channels"], spec["head_channels"],
    )  # fmt: skip
    batch_np = bc.make_batch(s["r101_batch"], s["size"])
    variants = {
        "fp32, augmentation on the host (as transcribed)": dict(amp=None, on_device=False),
        "fp32, augmentation on the device": dict(amp=None, on_device=True),
        "bf16 autocast, augmentation on the device": dict(amp="bfloat16", on_device=True),
    }
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch_device": device,
        "cudnn_benchmark": True,
        "allow_tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "variants": {},
    }
    if smoke:  # the benchmark's step is the reference step, op for op
        from torch_ref.optim import make_optimizer
        from torch_ref.self_training import torch_reference_step

        ref = bc.TorchStep(config, batch_np, device)
        ref_student, ref_teacher = bc.torch_models(config)
        ref_opt = make_optimizer(ref_student, config.optim)
        diffs = []
        for it in range(2):
            torch.manual_seed(it)  # the same dropout draws on both sides
            want = torch_reference_step(
                ref_student, ref_teacher, ref_opt, it, batch_np, ref.masks, ref.augs, config,
                keep_grads=False,
            )[:2]  # fmt: skip
            torch.manual_seed(it)
            ref(record=False)
            diffs.append(max(abs(a - b) for a, b in zip(want, ref.losses, strict=True)))
        result["max_loss_diff_vs_torch_ref"] = max(diffs)
        dev = bc.TorchStep(config, batch_np, device, augment_on_device=True)
        ref = bc.TorchStep(config, batch_np, device)
        for step in (dev, ref):
            torch.manual_seed(0)
            step(record=False)
        result["device_vs_host_augmentation_loss_diff"] = max(
            abs(a - b) for a, b in zip(dev.losses, ref.losses, strict=True)
        )
    for label, v in variants.items():
        step = bc.TorchStep(config, batch_np, device, v["amp"], v["on_device"])
        for _ in range(s["warmup"]):
            step(record=False)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(s["torch_steps"]):
            step()
        row = step.summary()
        if device == "cuda":
            row["device_peak_bytes"] = torch.cuda.max_memory_allocated()
        assert np.isfinite(row["loss"]), row
        result["variants"][label] = row
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
    result["torch_matmul_peak_bf16"] = bc.torch_matmul_peak(s["peak_size"], device, "bfloat16")
    result["torch_matmul_peak_f32"] = bc.torch_matmul_peak(s["peak_size"], device, "float32")
    return result


def run_eval(name: str, opts: dict, smoke: bool) -> dict:
    import statistics

    import bench_common as bc
    import jax
    import numpy as np

    from ddb_jax.evaluation import evaluate

    s = sizes(smoke)
    rows = {}
    for key, model_key, dtype in (
        ("r101_bf16", "r101", "bfloat16"),
        ("r101_f32", "r101", "float32"),
        ("mit_bf16", "mit", "bfloat16"),
    ):
        spec = s[model_key]
        config = bc.st_config(
            spec["backbone"], s["size"], 1, dtype, "lax", False, spec["head"],
            spec["base_channels"], spec["head_channels"],
        )  # fmt: skip
        model, variables = bc.initial_variables(config)
        rng = np.random.default_rng(0)
        batch = config.eval.batch_size
        images = jax.device_put(rng.normal(size=(batch, *s["eval_hw"], 3)).astype(np.float32))
        labels = jax.device_put(rng.integers(0, 19, (batch, *s["label_hw"])).astype(np.int32))
        static = dict(
            apply_fn=model.apply, mode=config.eval.mode, crop=tuple(config.eval.crop_size),
            stride=tuple(config.eval.stride), flip=config.eval.flip,
            num_classes=config.model.num_classes,
        )  # fmt: skip
        start = time.perf_counter()
        _block(evaluate.batch_confusion(variables, images, labels, **static))
        compile_s = time.perf_counter() - start
        for _ in range(s["warmup"]):
            _block(evaluate.batch_confusion(variables, images, labels, **static))
        times = []
        for _ in range(s["eval_steps"]):
            start = time.perf_counter()
            _block(evaluate.batch_confusion(variables, images, labels, **static))
            times.append(time.perf_counter() - start)
        ms = statistics.median(times)
        rows[key] = {
            "model": spec["backbone"] + "+" + spec["head"],
            "dtype": dtype,
            "image_hw": list(s["eval_hw"]),
            "label_hw": list(s["label_hw"]),
            "batch": batch,
            "mode": config.eval.mode,
            "flip": config.eval.flip,
            "step_s": ms,
            "images_per_s": batch / ms,
            "first_call_s": compile_s,
        }
    return {"rows": rows}


RUNNERS = {"jax_step": run_jax_step, "torch_step": run_torch_step, "eval": run_eval}


def run_part(name: str, smoke: bool) -> dict:
    """One part in this process; never raises (errors are reported in the result)."""
    import bench_common as bc

    kind, opts = PARTS[name]
    start = time.perf_counter()
    try:
        if smoke:
            shrink_mit_b0()
        result = RUNNERS[kind](name, opts, smoke)
    except Exception as e:  # reported, and the other parts still run
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result["kind"] = kind
    result["wall_s"] = time.perf_counter() - start
    result["imports"] = bc.imported_modules()
    return result


def run_isolated(name: str, args, timeout: float) -> dict:
    """One part in a fresh process (its own device peak memory); parses its last line."""
    cmd = [sys.executable, __file__, "--child", name] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": tail,
                "wall_s": time.perf_counter() - start}  # fmt: skip
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exited {proc.returncode}", "stderr_tail": proc.stderr[-3000:],
                "wall_s": time.perf_counter() - start}  # fmt: skip
    return json.loads(lines[-1])


def check_targets(parts: dict, smoke: bool) -> list[dict]:
    """The issue's targets, each with the measured value (None if not measured)."""
    ours = parts.get("r101_bf16", {})
    theirs = parts.get("torch_r101", {}).get("variants", {})
    fp32 = [v["step_s"] for k, v in theirs.items() if k.startswith("fp32")]
    bf16 = [v["step_s"] for k, v in theirs.items() if k.startswith("bf16")]
    mit = parts.get("mit_bf16", {})
    ours_s = ours.get("step_s")
    rows = [
        dict(
            what="DLV2-R101 step speed-up: ours bf16 / PyTorch reference fp32 (faster variant)",
            value=min(fp32) / ours_s if ours_s and fp32 else None,
            target=f">= {TARGET_SPEEDUP}",
            met=(min(fp32) / ours_s >= TARGET_SPEEDUP) if ours_s and fp32 else None,
        ),
        dict(
            what="(for reference) ours bf16 / PyTorch bf16 autocast",
            value=min(bf16) / ours_s if ours_s and bf16 else None,
            target="",
            met=None,
        ),
        dict(
            what="DLV2-R101 bf16 step, ms (H100/H200-class GPU)",
            value=1e3 * ours_s if ours_s else None,
            target=f"<= {TARGET_R101_BF16_MS:.0f}",
            met=(1e3 * ours_s <= TARGET_R101_BF16_MS) if ours_s else None,
        ),
        dict(
            what="MiT-B5 step batch 2 bf16, device peak GB",
            value=mit.get("device_peak_bytes") / GB if mit.get("device_peak_bytes") else None,
            target=f"<= {TARGET_MITB5_PEAK_BYTES / GB:.0f}",
            met=(mit["device_peak_bytes"] <= TARGET_MITB5_PEAK_BYTES)
            if mit.get("device_peak_bytes")
            else None,
        ),
    ]
    if smoke:  # tiny models on a CPU: the targets do not apply
        for r in rows:
            r["met"] = None
    return rows


def _f(value, fmt: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return format(value * scale, fmt)


def markdown(report: dict) -> str:
    parts, sm = report["parts"], report["mode"] == "smoke"
    peak = report["bf16_matmul_peak"]
    r101 = "DLV2-R18 (width 8, smoke)" if sm else "DLV2-R101"
    mit = "MiT-B0 (1 block/stage) + DAFormer (smoke)" if sm else "MiT-B5 + DAFormer"
    s = sizes(sm)
    out = [
        f"# Device check ({report['mode']})",
        "",
        f"{report['started']}, {report['device']}; {report['versions']}; load average "
        f"{report['load_before']} before, {report['load_after']} after; "
        f"{report['elapsed_s']:.0f} s in all. bf16 matmul peak ({s['peak_size']}^2): "
        f"{_f(peak, '.1f', 1e-12)} TFLOP/s (jax){report['peak_note']}.",
        "",
        f"## {r101} self-training step, {s['size']}x{s['size']}, batch {s['r101_batch']}",
        "",
        "| implementation | ms/step | images/s | TFLOP/s | % of bf16 matmul peak | step TFLOP "
        "| device peak GiB | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    flops = None
    for key, label in (
        ("r101_bf16", "ours, bfloat16 (lax)"),
        ("r101_f32", "ours, float32 (lax)"),
        ("r101_bf16_layouts", "ours, bfloat16, state in the compiler's layouts"),
    ):
        r = parts.get(key, {})
        if "step_s" not in r:
            out.append(f"| {label} | {_why(r)} | | | | | | |")
            continue
        flops = flops or r["flops"]
        rate = r["flops"] / r["step_s"]
        out.append(
            f"| {label} | {_f(r['step_s'], '.1f', 1e3)} | {_f(r['batch'] / r['step_s'], '.2f')} "
            f"| {_f(rate, '.2f', 1e-12)} | {_f(rate / peak if peak else None, '.1f', 100)} "
            f"| {_f(r['flops'], '.3f', 1e-12)} | {_f(r['device_peak_bytes'], '.2f', 1 / GIB)} "
            f"| {_f(r['compile_s'], '.0f')} |"
        )
    torch_part = parts.get("torch_r101", {})
    if "variants" not in torch_part:
        out.append(f"| PyTorch reference | {_why(torch_part)} | | | | | | |")
    for label, v in torch_part.get("variants", {}).items():
        rate = flops / v["step_s"] if flops else None
        out.append(
            f"| PyTorch reference, {label} | {_f(v['step_s'], '.1f', 1e3)} "
            f"| {_f(s['r101_batch'] / v['step_s'], '.2f')} | {_f(rate, '.2f', 1e-12)} "
            f"| {_f(rate / peak if rate and peak else None, '.1f', 100)} | "
            f"| {_f(v.get('device_peak_bytes'), '.2f', 1 / GIB)} | |"
        )
    out += [
        "",
        "TFLOP/s: XLA's FLOP count of our compiled step (the same work for the PyTorch rows) "
        "over the median step time.",
        "",
        f"## {mit} self-training step, {s['size']}x{s['size']}, batch {s['mit_batch']}, "
        "and device memory (remat off / on)",
        "",
        "| model | dtype | remat | ms/step | images/s | TFLOP/s | % of bf16 matmul peak "
        "| executed device peak GiB | XLA args+temp GiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("mit_bf16", "mit_bf16_remat", "r101_bf16", "r101_bf16_remat"):
        r = parts.get(key, {})
        model = mit if key.startswith("mit") else r101
        remat = "on" if key.endswith("remat") else "off"
        if "step_s" not in r:
            out.append(f"| {model} | bfloat16 | {remat} | {_why(r)} | | | | | | |")
            continue
        rate = r["flops"] / r["step_s"]
        out.append(
            f"| {model} | {r['dtype']} | {remat} | {_f(r['step_s'], '.1f', 1e3)} "
            f"| {_f(r['batch'] / r['step_s'], '.2f')} | {_f(rate, '.2f', 1e-12)} "
            f"| {_f(rate / peak if peak else None, '.1f', 100)} "
            f"| {_f(r['device_peak_bytes'], '.2f', 1 / GIB) or 'n/a (CPU)'} "
            f"| {_f(r['xla_argument_bytes'] + r['xla_temp_bytes'], '.2f', 1 / GIB)} "
            f"| {_f(r['compile_s'], '.0f')} |"
        )
    out += [
        "",
        "## Compile-time estimate beside the measurement (`tools/aot_check.py`'s figures of "
        "the same program)",
        "",
        "| step | target | estimated GiB | device peak GiB | measured / estimated "
        "| HBM traffic GiB | roofline ms | measured ms | measured / roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in STEP_PARTS:
        r = parts.get(key, {})
        est = r.get("estimate")
        if not est:
            out.append(f"| {key} | {_why(r)} | | | | | | | |")
            continue
        peak_b, roof = r.get("device_peak_bytes"), est["roofline_s"]
        out.append(
            f"| {key} | {est['target']} | {_f(est['memory_total_bytes'], '.2f', 1 / GIB)} "
            f"| {_f(peak_b, '.2f', 1 / GIB) or 'n/a (CPU)'} "
            f"| {_f(peak_b / est['memory_total_bytes'] if peak_b else None, '.2f')} "
            f"| {_f(est['hbm_traffic_bytes'], '.2f', 1 / GIB)} "
            f"| {_f(roof, '.1f', 1e3) or 'n/a'} | {_f(r['step_s'], '.1f', 1e3)} "
            f"| {_f(r['step_s'] / roof if roof else None, '.2f')} |"
        )
    h, w = s["eval_hw"]
    out += [
        "",
        f"## Evaluation, {w}x{h} images (labels {s['label_hw'][1]}x{s['label_hw'][0]}), "
        "whole-image inference + confusion matrix on the device",
        "",
        "| model | dtype | batch | images/s | ms/batch | first call s |",
        "|---|---|---|---|---|---|",
    ]
    ev = parts.get("eval", {})
    if "rows" not in ev:
        out.append(f"| all | | | {_why(ev)} | | |")
    for r in ev.get("rows", {}).values():
        model = mit if r["model"].startswith("mit") else r101
        out.append(
            f"| {model} | {r['dtype']} | {r['batch']} | {_f(r['images_per_s'], '.1f')} "
            f"| {_f(r['step_s'], '.1f', 1e3)} | {_f(r['first_call_s'], '.0f')} |"
        )
    out += ["", "## Targets", "", "| what | measured | target | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a" if sm else "not measured"}[t["met"]]
        out.append(f"| {t['what']} | {_f(t['value'], '.2f')} | {t['target']} | {met} |")
    forbidden = sorted(
        {m for p in parts.values() for m in p.get("imports", {}).get("forbidden", [])}
    )
    missing = sorted(
        {m for p in parts.values() for m in p.get("imports", {}).get("not_on_device", [])}
    )
    out += [
        "",
        f"Imported TensorFlow / tensorflow-datasets / CLU: {forbidden or 'none'}. Third-party "
        f"modules not in the device image's list nor travelling: {missing or 'none'}.",
    ]
    return "\n".join(out) + "\n"


def _why(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "error" in r:
        return "failed: " + r["error"].splitlines()[0][:120]
    return "not run"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, CPU, < 60 s")
    parser.add_argument("--out", default="", help="folder for device_check.{json,md}")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all parts")
    parser.add_argument(
        "--isolate",
        default=None,
        help="comma-separated parts run in their own process (default: all; --smoke: torch_r101)",
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.smoke:  # before jax is imported (here or in the children)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        # LLVM without its optimisation passes: about 3x faster compiles (tests/conftest.py).
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    if args.child:
        print(json.dumps(run_part(args.child, args.smoke), default=float))
        return 0
    names = [n for n in args.parts.split(",") if n]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; known: {list(PARTS)}")
    isolate = args.isolate
    if isolate is None:
        isolate = "torch_r101" if args.smoke else ",".join(PARTS)
    isolate = {n for n in isolate.split(",") if n}
    default_out = HERE.parent / "runs" / "benchmarks" / "device_check"  # runs/: git-ignored
    out = pathlib.Path(args.out or os.environ.get("OUT") or default_out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "mode": "smoke" if args.smoke else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "load_before": [round(v, 2) for v in os.getloadavg()],
        "versions": versions(),
        "parts": {},
    }
    print(f"device check ({report['mode']}): load {report['load_before']}", flush=True)
    start = time.perf_counter()
    for name in names:
        left = args.budget - (time.perf_counter() - start)
        kind = PARTS[name][0]
        if not args.smoke and left < MIN_SECONDS[kind]:
            result = {"skipped": f"{left:.0f} s of the {args.budget:.0f} s budget left"}
        elif name in isolate:
            result = run_isolated(name, args, left)
        else:
            result = run_part(name, args.smoke)
        report["parts"][name] = result
        brief = {k: v for k, v in result.items() if k not in ("imports", "traceback")}
        print(f"[{time.perf_counter() - start:.0f} s] {name}: {json.dumps(brief, default=str)}",
              flush=True)  # fmt: skip
    report["elapsed_s"] = time.perf_counter() - start
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    report["device"] = next(
        (p["device"] for p in report["parts"].values() if p.get("device")), "unknown device"
    )
    r101 = report["parts"].get("r101_bf16", {})
    torch_part = report["parts"].get("torch_r101", {})
    report["bf16_matmul_peak"] = r101.get("jax_matmul_peak_bf16") or torch_part.get(
        "torch_matmul_peak_bf16"
    )
    report["peak_note"] = (
        f", torch {torch_part['torch_matmul_peak_bf16'] / 1e12:.1f}"
        if torch_part.get("torch_matmul_peak_bf16")
        else ""
    )
    report["targets"] = check_targets(report["parts"], args.smoke)
    (out / "device_check.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    text = markdown(report)
    (out / "device_check.md").write_text(text)
    print("\n" + text, flush=True)
    print(f"wrote {out / 'device_check.json'} and {out / 'device_check.md'}")
    failed = [n for n, p in report["parts"].items() if "error" in p]
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
