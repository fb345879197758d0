"""Self-training step time: ours (jitted, donated state) vs the PyTorch reference step.

One run times DDB's self-training iteration (EMA update, source CE, teacher pseudo-labels,
bridging + strong augmentation, mixed CE, AdamW) as ``train_and_evaluate`` jits it, and the
PyTorch transcription of the same iteration (torch_ref/self_training.py, mmseg-style
ResNetV1c + DLV2 head) on the same weights and inputs. Reports ms/step and images/s (source +
target pairs), XLA's FLOP count of the compiled step and the achieved FLOP/s against a matmul
peak measured in the same run, the host-side dispatch time, and the number of compilations
after the first step (asserted to be 0).

    .venv/bin/python benchmarks/train_step.py                         # DLV2-R101, 512x512, batch 4
    .venv/bin/python benchmarks/train_step.py --depth 18 --size 128 --batch 4   # quick CPU size
    .venv/bin/python benchmarks/train_step.py --conv-impl lax,im2col --dtype float32

Defaults follow the platform: on GPU/TPU bfloat16 compute and ``lax`` convs; on CPU
float32 and ``im2col`` convs (configs/default.py documents both switches).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import default  # noqa: E402
from ddb_jax import methods, models  # noqa: E402
from ddb_jax.methods import base  # noqa: E402
from ddb_jax.train import optim, setup  # noqa: E402
from ddb_jax.train.state import create_train_state  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations through jax.monitoring (any jitted function)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, duration: float, **kwargs) -> None:
        if name == COMPILE_EVENT:
            self.count += 1


def make_config(args: argparse.Namespace, conv_impl: str):
    config = default.get_config()
    config.model.backbone = f"resnet{args.depth}_v1c"
    config.model.dtype = args.dtype
    config.model.conv_impl = conv_impl
    config.batch_size = args.batch
    config.data.crop_size = (args.size, args.size)
    return config


def make_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 19, size=(batch, size, size)).astype(np.int32)
    labels[:, : size // 16] = 255
    return {
        "source_image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "source_label": labels,
        "target_image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
    }


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n x n jnp.dot calls (the machine's practical peak)."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(key_b, (n, n), jnp.dtype(dtype))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def torch_sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_matmul_peak(n: int, device: str, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    torch_sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        torch_sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def torch_models(depth: int, seed: int = 3):
    import copy

    from torch_ref.resnet_dlv2 import Segmentor, randomize

    student = randomize(Segmentor(depth, num_classes=19, dropout=0.1), seed=seed)
    return student, copy.deepcopy(student)


def jax_state(config, student_torch):
    """Our train state on the torch student's weights (the same model on both sides)."""
    from ddb_jax.convert import resnet as resnet_names
    from ddb_jax.convert.common import convert_state_dict
    from torch_ref.common import numpy_state_dict

    model = models.build_model(config.model)
    shapes = models.variable_shapes(model)
    variables = convert_state_dict(numpy_state_dict(student_torch), shapes, resnet_names.torch_name)
    tx, _ = optim.make_optimizer(config.optim, config.num_steps)
    method = methods.create(config, model.apply)
    state = method.init_state(
        create_train_state(jax.tree_util.tree_map(jnp.asarray, variables), tx, jax.random.key(0))
    )
    return method, tx, state


def time_jax(config, student_torch, batch_np, args, counter: CompileCounter) -> dict:
    """Times the jitted self-training step exactly as train_and_evaluate builds it."""
    method, tx, state = jax_state(config, student_torch)
    mesh = setup.make_mesh(config)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    step = base.make_train_step(method, tx, mesh)
    state = jax.device_put(state, replicated)
    batch = jax.device_put(batch_np, sharded)

    start = time.perf_counter()
    compiled = step.lower(state, batch, None).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))

    for _ in range(args.warmup):  # the first call reuses the compilation above
        state, metrics = step(state, batch, None)
        jax.block_until_ready(metrics)
    compiles_before, cache_before = counter.count, step._cache_size()
    times, dispatch = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, None)
        dispatched = time.perf_counter()
        jax.block_until_ready((state, metrics))
        end = time.perf_counter()
        times.append(end - start)
        dispatch.append(dispatched - start)
    recompiles = counter.count - compiles_before
    cache_growth = step._cache_size() - cache_before
    loss = float(metrics["loss"])
    assert np.isfinite(loss), loss
    assert recompiles == 0 and cache_growth == 0, (recompiles, cache_growth)
    return {
        "step_s": statistics.median(times),
        "dispatch_s": statistics.median(dispatch),
        "compile_s": compile_s,
        "flops": flops,
        "recompiles": recompiles,
        "loss": loss,
    }


def time_torch(config, student, teacher, batch_np, args) -> dict:
    """The PyTorch reference step on the same inputs (draws fixed: jitter and blur both on)."""
    import torch

    from ddb_jax import bridging
    from torch_ref.augment import random_draw as fixed_params
    from torch_ref.optim import make_optimizer
    from torch_ref.self_training import torch_reference_step

    masks = np.asarray(
        bridging.make_masks(jax.random.key(1), batch_np["source_label"], config.st.mask)
    )
    augs = [fixed_params(10 + i, jitter=True, blur=True) for i in range(args.batch)]
    student.to(args.torch_device).train()
    teacher.to(args.torch_device).train()
    opt = make_optimizer(student, config.optim)
    times = []
    for it in range(args.warmup + args.torch_steps):
        start = time.perf_counter()
        src, mix, *_ = torch_reference_step(
            student, teacher, opt, it, batch_np, masks, augs, config, keep_grads=False
        )
        torch_sync(args.torch_device)
        if it >= args.warmup:
            times.append(time.perf_counter() - start)
    assert np.isfinite(src + mix)
    return {"step_s": statistics.median(times), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=101, help="ResNetV1c depth: 18..152")
    parser.add_argument("--size", type=int, default=512, help="square crop size")
    parser.add_argument("--batch", type=int, default=4, help="global batch")
    platform = jax.default_backend()
    on_accel = platform in ("gpu", "tpu")
    parser.add_argument("--dtype", default="bfloat16" if on_accel else "float32")
    parser.add_argument(
        "--conv-impl",
        default="lax" if on_accel else "im2col",
        help="comma-separated list of conv implementations to time: lax, im2col",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--torch-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    parser.add_argument("--peak-size", type=int, default=8192 if on_accel else 2048)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--torch-threads",
        default="",
        help="comma-separated torch intra-op thread counts to time (default: torch's own); "
        "on a loaded machine 1 thread can be far faster than 2 (OpenMP barriers)",
    )
    parser.add_argument(
        "--torch-device", default="", help="cpu | cuda (default: cuda when available)"
    )
    args = parser.parse_args()
    args.torch_steps = args.torch_steps or args.steps
    if not args.torch_device and not args.no_torch:
        import torch

        args.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    counter = CompileCounter()

    peak = matmul_peak(args.dtype, args.peak_size)
    config = make_config(args, args.conv_impl.split(",")[0])
    batch_np = make_batch(args.batch, args.size)
    rows = []
    for impl in args.conv_impl.split(","):
        config = make_config(args, impl)
        student, _ = torch_models(args.depth)
        result = time_jax(config, student, batch_np, args, counter)
        rows.append((f"ours ({impl}, {args.dtype})", result))
        print(f"ours {impl}: {result}", flush=True)
    torch_results, torch_peak = [], None
    if not args.no_torch:
        import torch

        for threads in [int(t) for t in args.torch_threads.split(",") if t] or [None]:
            if threads:
                torch.set_num_threads(threads)
            student, teacher = torch_models(args.depth)
            torch_results.append(time_torch(config, student, teacher, batch_np, args))
            torch_results[-1]["peak"] = torch_matmul_peak(args.peak_size, args.torch_device)
            print(f"torch: {torch_results[-1]}", flush=True)
        torch_peak = max(r["peak"] for r in torch_results)

    # The PyTorch row's FLOP/s uses XLA's smallest count (the lax convs; im2col also counts
    # the multiply-adds with its zero padding), i.e. the model's own work.
    flops = min(r["flops"] for _, r in rows)
    print(
        f"\nDLV2-R{args.depth}, {args.size}x{args.size}, batch {args.batch}, "
        f"platform {platform} ({jax.devices()[0].device_kind}), {args.steps} timed steps "
        f"(median) after {args.warmup} warm-up"
    )
    print(
        f"matmul peak ({args.peak_size}^2, {args.dtype}): jax {peak / 1e9:.0f} GFLOP/s"
        + (f", torch {torch_peak / 1e9:.0f} GFLOP/s (fp32)" if torch_peak else "")
    )
    for name, r in rows:
        print(f"step FLOPs (XLA cost analysis, {name}): {r['flops'] / 1e12:.3f} TFLOP")
    print("| implementation | ms/step | images/s | GFLOP/s | % of peak | dispatch ms | "
          "recompiles | compile s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        achieved = r["flops"] / r["step_s"]
        print(
            f"| {name} | {1e3 * r['step_s']:.0f} | {args.batch / r['step_s']:.2f} | "
            f"{achieved / 1e9:.0f} | {100 * achieved / peak:.0f} % | "
            f"{1e3 * r['dispatch_s']:.1f} | {r['recompiles']} | {r['compile_s']:.0f} |"
        )
    for torch_result in torch_results:
        t = torch_result["step_s"]
        achieved = flops / t
        print(
            f"| PyTorch reference (fp32, {args.torch_device}, {torch_result['threads']} threads) | "
            f"{1e3 * t:.0f} | "
            f"{args.batch / t:.2f} | {achieved / 1e9:.0f} | "
            f"{100 * achieved / torch_result['peak']:.0f} % | | | |"
        )
    if torch_results:
        best = min(r["step_s"] for r in torch_results)
        for name, r in rows:
            print(f"{name}: {best / r['step_s']:.2f}x the fastest PyTorch step's speed")


if __name__ == "__main__":
    main()
