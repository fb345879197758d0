"""Self-training step time: ours (jitted, donated state) vs the PyTorch reference step,
alternated step by step in one process.

One round runs one step of each of our conv implementations, then one PyTorch reference
step (torch_ref's transcription of DDB's ``ST.forward_train``: EMA update, source CE,
teacher pseudo-labels, bridging + strong augmentation, mixed CE, AdamW; mmseg-style
ResNetV1c + DLV2 head) on the same weights and inputs; a change of machine load during the
run hits every side alike. Reports the median ms/step, images/s (source+target pairs), XLA's
FLOP count of the compiled step, the achieved FLOP/s against a matmul peak measured in the
same run (``jnp.dot`` for ours, ``torch.mm`` for PyTorch), the host dispatch time, the
compilations after the first step (asserted 0), and the load average before and after.

    .venv/bin/python benchmarks/train_step.py --preset cpu-idle      # the CPU comparison
    .venv/bin/python benchmarks/train_step.py --depth 18 --size 128 --batch 4 --steps 3
    .venv/bin/python benchmarks/train_step.py --conv-impl lax,matmul --dtype float32

``--preset cpu-idle`` is the idle-machine comparison of benchmarks/RESULTS.md in one
command: DLV2-R18 at 128x128 batch 4 (our matmul, im2col and lax convs, 5 rounds), then
DLV2-R101 at 512x512 batch 2 (our matmul convs, 3 rounds; batch 4 does not fit beside the
PyTorch step in 23 GiB: the process reached 24 GiB and was killed; ~10 minutes on a
2-core CPU), with ``--json``/``--markdown`` defaults under runs/benchmarks/ (git-ignored).

Defaults follow the platform: on GPU/TPU bfloat16 compute and ``lax`` convs; on CPU
float32 and ``matmul`` convs (configs/default.py documents both switches).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

PRESETS = {
    "cpu-idle": [
        dict(depth=18, size=128, batch=4, conv_impl="matmul,im2col,lax", steps=5),
        dict(depth=101, size=512, batch=2, conv_impl="matmul", steps=3),
    ],
}


def compare(args, counter: bc.CompileCounter, log=print) -> dict:
    """One configuration: our steps and the PyTorch steps alternated; a result dict."""
    impls = [i for i in args.conv_impl.split(",") if i]
    threads = [int(t) for t in args.torch_threads.split(",") if t] or [None]
    load_before = bc.load_average()
    log(f"DLV2-R{args.depth} {args.size}x{args.size} batch {args.batch}: load {load_before}")
    peak = bc.matmul_peak(args.dtype, args.peak_size)
    batch_np = bc.make_batch(args.batch, args.size)
    runners, ours, theirs = {}, {}, {}
    for impl in impls:
        config = bc.st_config(f"resnet{args.depth}_v1c", args.size, args.batch, args.dtype, impl)
        student, _ = bc.torch_models(config)
        step = bc.JaxStep(config, batch_np, student, counter)
        log(f"ours ({impl}): compiled in {step.compile_s:.0f} s, {step.flops / 1e12:.3f} TFLOP")
        step.warm_up(args.warmup)
        ours[impl] = step
        runners[f"ours ({impl}, {args.dtype})"] = step
    torch_peak = None
    if not args.no_torch:
        config = bc.st_config(f"resnet{args.depth}_v1c", args.size, args.batch, "float32", "lax")
        for n in threads:
            step = bc.TorchStep(config, batch_np, args.torch_device, threads=n)
            for _ in range(args.warmup):
                step(record=False)
            name = f"PyTorch reference (fp32, {args.torch_device}, {n or 'default'} threads)"
            theirs[name] = runners[name] = step
        torch_peak = bc.torch_matmul_peak(args.peak_size, args.torch_device)
    bc.alternate(runners, args.steps, log)
    peak_after = bc.matmul_peak(args.dtype, args.peak_size)
    load_after = bc.load_average()
    flops = min(s.flops for s in ours.values())  # lax's count: the model's own work
    rows = []
    for impl, step in ours.items():
        r = step.summary()
        assert r["recompiles"] == 0, r
        rows.append({"name": f"ours ({impl}, {args.dtype})", "impl": impl, **r})
    for name, step in theirs.items():
        rows.append({"name": name, "impl": "torch", "flops": flops, **step.summary()})
    for r in rows:
        is_torch = r["impl"] == "torch"
        matmul = torch_peak if is_torch else max(peak, peak_after)
        r["images_per_s"] = args.batch / r["step_s"]
        r["flop_per_s"] = r["flops"] / r["step_s"]
        r["pct_of_peak"] = 100 * r["flop_per_s"] / matmul
    return {
        "config": {k: getattr(args, k) for k in ("depth", "size", "batch", "dtype", "steps")},
        "platform": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "load_before": load_before,
        "load_after": load_after,
        "jax_matmul_peak": [peak, peak_after],
        "torch_matmul_peak": torch_peak,
        "peak_size": args.peak_size,
        "flops_min": flops,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    c = result["config"]
    peaks = ", ".join(f"{p / 1e9:.0f}" for p in result["jax_matmul_peak"])
    lines = [
        f"DLV2-R{c['depth']}, {c['size']}x{c['size']}, batch {c['batch']}, platform "
        f"{result['platform']} ({result['device']}), {c['steps']} alternated rounds (median); "
        f"load average {result['load_before']} before, {result['load_after']} after",
        f"matmul peak ({result['peak_size']}^2 {c['dtype']}): jax {peaks} GFLOP/s (before, after)"
        + (
            f", torch {result['torch_matmul_peak'] / 1e9:.0f} GFLOP/s"
            if result["torch_matmul_peak"]
            else ""
        ),
        "",
        "| implementation | ms/step | images/s | step TFLOP | GFLOP/s | % of matmul peak "
        "| dispatch ms | recompiles | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        torch_row = r["impl"] == "torch"
        lines.append(
            f"| {r['name']} | {1e3 * r['step_s']:.0f} | {r['images_per_s']:.3f} "
            f"| {r['flops'] / 1e12:.3f} | {r['flop_per_s'] / 1e9:.0f} | {r['pct_of_peak']:.0f} % "
            + ("| | | |" if torch_row else (
                f"| {1e3 * r['dispatch_s']:.1f} | {r['recompiles']} | {r['compile_s']:.0f} |"
            ))
        )  # fmt: skip
    fastest = min((r["step_s"] for r in result["rows"] if r["impl"] == "torch"), default=None)
    if fastest:
        lines.append("")
        for r in result["rows"]:
            if r["impl"] != "torch":
                ratio = fastest / r["step_s"]
                lines.append(f"- {r['name']}: {ratio:.2f}x the PyTorch step's speed")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="run a set of configurations")
    parser.add_argument("--depth", type=int, default=101, help="ResNetV1c depth: 18..152")
    parser.add_argument("--size", type=int, default=512, help="square crop size")
    parser.add_argument("--batch", type=int, default=4, help="global batch")
    platform = jax.default_backend()
    on_accel = platform in ("gpu", "tpu")
    parser.add_argument("--dtype", default="bfloat16" if on_accel else "float32")
    parser.add_argument(
        "--conv-impl",
        default="lax" if on_accel else "matmul",
        help="comma-separated conv implementations to time: lax, im2col, matmul",
    )
    parser.add_argument("--steps", type=int, default=5, help="alternated timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    parser.add_argument("--peak-size", type=int, default=8192 if on_accel else 2048)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--torch-threads",
        default="",
        help="comma-separated torch intra-op thread counts, each its own row (default: "
        "torch's own); on a loaded machine 1 thread can be far faster than 2",
    )
    parser.add_argument("--torch-device", default="", help="cpu | cuda (default: cuda if any)")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--markdown", default="", help="write the tables here")
    args = parser.parse_args(argv)
    if not args.torch_device and not args.no_torch:
        import torch

        args.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = [{}]
    if args.preset:
        configs = PRESETS[args.preset]
        out = pathlib.Path(__file__).resolve().parents[1] / "runs" / "benchmarks"  # git-ignored
        args.json = args.json or str(out / f"train_step_{args.preset}.json")
        args.markdown = args.markdown or str(out / f"train_step_{args.preset}.md")
    counter = bc.CompileCounter()
    load_start = bc.load_average()
    print(f"load average at the start: {load_start}", flush=True)
    results = []
    for overrides in configs:
        run_args = argparse.Namespace(**{**vars(args), **overrides})
        result = compare(run_args, counter, log=lambda m: print(m, flush=True))
        results.append(result)
        print("\n" + markdown(result) + "\n", flush=True)
    load_end = bc.load_average()
    print(f"load average at the start: {load_start}, at the end: {load_end}")
    text = f"load average at the start {load_start}, at the end {load_end}\n\n" + "\n\n".join(
        markdown(r) for r in results
    )
    for path, content in ((args.json, None), (args.markdown, text)):
        if path:
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                if content is None:
                    json.dump({"load_start": load_start, "load_end": load_end,
                               "runs": results}, f, indent=2)  # fmt: skip
                else:
                    f.write(content + "\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
