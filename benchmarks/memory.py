"""Peak memory of one jitted self-training step, with and without remat and bfloat16.

Each configuration (model x remat x dtype) runs in a fresh subprocess, so one
configuration's allocations never inflate another's peak. The child builds the
real stage step (``ddb_jax.methods.base.make_train_step`` of self-training: EMA teacher,
two student passes, AdamW) from ``configs/default.py``, lowers and compiles it, and
reports

* XLA's buffer assignment of the compiled step (``memory_analysis()``: arguments,
  outputs, temporaries): what a device needs for the step, known without running it;
* with ``--run``: the process's peak resident set (``VmHWM``, host RSS) after one
  executed step, and on a GPU/TPU the device's ``peak_bytes_in_use``.

    .venv/bin/python benchmarks/memory.py                       # 512x512 batch 4, compile only
    .venv/bin/python benchmarks/memory.py --run --size 256 --batch 2
    .venv/bin/python benchmarks/memory.py --models dlv2_r101 --run   # on a GPU machine
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {
    "dlv2_r101": dict(backbone="resnet101_v1c", head="dlv2", head_channels=256),
    "mitb5_daformer": dict(backbone="mit_b5", head="daformer", head_channels=256),
}
VARIANTS = [(False, "float32"), (True, "float32"), (False, "bfloat16"), (True, "bfloat16")]
GIB = 2.0**30


def _variant_name(remat: bool, dtype: str) -> str:
    return f"remat_{'on' if remat else 'off'}-{dtype}"


def _default_config():
    spec = importlib.util.spec_from_file_location("configs_default", ROOT / "configs/default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _peak_rss_bytes() -> int:
    """VmHWM of this process (Linux), the peak resident set since it started."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM (not Linux?)")


def child(model: str, remat: bool, dtype: str, size: int, batch: int, run: bool) -> dict:
    """One configuration, in this (fresh) process: compile, optionally run one step."""
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np

    from ddb_jax import models
    from ddb_jax.methods import assemble

    config = _default_config()
    config.model.update(MODELS[model])
    config.model.remat = remat
    config.model.dtype = dtype
    student = models.build_model(config.model)
    variables = models.init_variables(student, jax.random.PRNGKey(0))
    stage = assemble.assemble(config, variables, jax.random.PRNGKey(1))
    state = stage.state
    rng = np.random.default_rng(0)
    batch_arrays = {
        "source_image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "target_image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "source_label": rng.integers(0, 19, (batch, size, size)).astype(np.int32),
    }
    step = assemble.train_step(stage)
    start = time.perf_counter()
    compiled = step.lower(state, batch_arrays, None).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    out = {
        "model": model,
        "remat": remat,
        "dtype": dtype,
        "size": size,
        "batch": batch,
        "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 1),
        "xla_argument_bytes": int(stats.argument_size_in_bytes),
        "xla_output_bytes": int(stats.output_size_in_bytes),
        "xla_alias_bytes": int(stats.alias_size_in_bytes),
        "xla_temp_bytes": int(stats.temp_size_in_bytes),
    }
    if run:
        start = time.perf_counter()
        new_state, metrics = compiled(state, batch_arrays, None)
        jax.block_until_ready((new_state, metrics))
        out["step_s"] = round(time.perf_counter() - start, 1)
        out["loss"] = float(metrics["loss"])
        device_stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in device_stats:
            out["device_peak_bytes"] = int(device_stats["peak_bytes_in_use"])
    out["host_peak_rss_bytes"] = _peak_rss_bytes()
    return out


def residual_bytes(model: str, remat: bool, dtype: str, size: int, batch: int) -> int:
    """Bytes one student forward keeps for its backward pass (traced, any device)."""
    sys.path.insert(0, str(ROOT))
    from ddb_jax import models
    from ddb_jax.models.residuals import kept_for_backward_bytes

    config = _default_config()
    config.model.update(MODELS[model])
    config.model.remat, config.model.dtype = remat, dtype
    return kept_for_backward_bytes(models.build_model(config.model), (batch, size, size, 3))


def _vm_hwm_bytes(pid: int) -> int | None:
    """VmHWM of a running process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_isolated(args: argparse.Namespace, model: str, remat: bool, dtype: str) -> dict:
    """Runs one configuration in a fresh interpreter and parses its JSON line.

    The child's peak RSS is also sampled from outside (every second), so a configuration
    the kernel kills for lack of memory still reports how far it got.
    """
    cmd = [
        sys.executable, __file__, "--child", model, str(int(remat)), dtype,
        "--size", str(args.size), "--batch", str(args.batch),
    ] + (["--run"] if args.run else [])  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, peak = time.monotonic() + args.timeout, 0
    while True:
        peak = max(peak, _vm_hwm_bytes(proc.pid) or 0)
        try:
            stdout, stderr = proc.communicate(timeout=1)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.kill()
                stdout, stderr = proc.communicate()
                break
    if proc.returncode != 0:
        why = f"exited {proc.returncode}"
        if proc.returncode == -9:
            why += " (SIGKILL: out of memory or --timeout)"
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        return {
            "model": model, "remat": remat, "dtype": dtype,
            "error": f"{why} {tail}".strip(), "host_peak_rss_bytes": peak,
        }  # fmt: skip
    return json.loads(stdout.strip().splitlines()[-1])


def gib(value: int | None) -> str:
    return "" if value is None else f"{value / GIB:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | remat | dtype | XLA args+temp GiB | XLA temp GiB | host peak RSS GiB "
        "| device peak GiB | compile s | step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {'on' if r['remat'] else 'off'} | {r['dtype']} | | "
                f"| >= {gib(r.get('host_peak_rss_bytes'))} when stopped | | | {r['error']} |"
            )
            continue
        lines.append(
            f"| {r['model']} | {'on' if r['remat'] else 'off'} | {r['dtype']} "
            f"| {gib(r['xla_argument_bytes'] + r['xla_temp_bytes'])} | {gib(r['xla_temp_bytes'])} "
            f"| {gib(r.get('host_peak_rss_bytes'))} | {gib(r.get('device_peak_bytes'))} "
            f"| {r['compile_s']} | {r.get('step_s', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--size", type=int, default=512, help="square crop side")
    parser.add_argument("--batch", type=int, default=4, help="global batch (one device)")
    parser.add_argument("--run", action="store_true", help="execute one step (else compile)")
    parser.add_argument(
        "--variants",
        default=",".join(_variant_name(*v) for v in VARIANTS),
        help="comma-separated remat/dtype variants, e.g. 'remat_off-float32,remat_on-bfloat16'",
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument(
        "--residuals", action="store_true", help="only trace: activations kept for backward"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("MODEL", "REMAT", "DTYPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        model, remat, dtype = args.child
        print(json.dumps(child(model, bool(int(remat)), dtype, args.size, args.batch, args.run)))
        return 0
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    by_name = {_variant_name(*v): v for v in VARIANTS}
    unknown = [v for v in args.variants.split(",") if v not in by_name]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(by_name)}")
    variants = [by_name[v] for v in args.variants.split(",")]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.residuals:
        print("| model | remat | dtype | activations kept for backward, one forward, GiB |")
        print("|---|---|---|---|")
        for model in args.models.split(","):
            for remat, dtype in variants:
                kept = residual_bytes(model, remat, dtype, args.size, args.batch)
                print(f"| {model} | {'on' if remat else 'off'} | {dtype} | {gib(kept)} |")
        return 0
    rows = []
    for model in args.models.split(","):
        for remat, dtype in variants:
            row = run_isolated(args, model, remat, dtype)
            print(json.dumps(row), flush=True)
            rows.append(row)
    what = "one step run" if args.run else "compile only"
    print(f"\n{args.size}x{args.size}, batch {args.batch}, {what}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
