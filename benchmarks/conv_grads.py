"""Where a DeepLabV2-ResNet101 training step spends its time on the CPU: per conv type.

Two measurements, each alternating the implementations round by round (so a change of
machine load hits them all alike) and keeping each one's best round:

* ``--convs``: every distinct convolution of DLV2-R101 (stem, 1x1 at 64-2048 channels,
  strided, dilated 3x3, the ASPP branches), its forward, input gradient (dx) and weight
  gradient (dW) alone, for each ``conv_impl`` and for PyTorch (``F.conv2d``,
  ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``); then the totals weighted by how
  often each conv occurs in the network (one forward + backward of the model's convs).
* ``--model``: the whole model (DLV2-R101 + head), train mode, mmseg CE, forward alone and
  forward+backward, for each ``conv_impl`` and for the PyTorch transcription
  (torch_ref/resnet_dlv2.py) on the same weights and images.

    .venv/bin/python benchmarks/conv_grads.py --convs --size 256 --batch 2
    .venv/bin/python benchmarks/conv_grads.py --model --size 256 --batch 2 --rounds 3
    .venv/bin/python benchmarks/conv_grads.py --convs --model --impls lax,matmul

Prints the load average before and after: on a shared machine the figures are for
comparing the rows of one run, not for quoting.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddb_jax.models import layers  # noqa: E402

# (name, input size as a fraction of the image, cin, cout, kernel, stride, dilation,
#  occurrences in DLV2-R101 + DLV2 head)
R101_CONVS = [
    ("stem 3x3/2 3->32", 1, 3, 32, 3, 2, 1, 1),
    ("stem 3x3 32->32, 32->64", 2, 32, 64, 3, 1, 1, 2),
    ("layer1 1x1 256->64", 4, 256, 64, 1, 1, 1, 3),
    ("layer1 3x3 64", 4, 64, 64, 3, 1, 1, 3),
    ("layer1 1x1 64->256 (+downsample)", 4, 64, 256, 1, 1, 1, 4),
    ("layer2 3x3/2 128", 4, 128, 128, 3, 2, 1, 1),
    ("layer2 downsample 1x1/2 256->512", 4, 256, 512, 1, 2, 1, 1),
    ("layer2 1x1 512->128", 8, 512, 128, 1, 1, 1, 4),
    ("layer2 3x3 128", 8, 128, 128, 3, 1, 1, 3),
    ("layer3 1x1 1024->256", 8, 1024, 256, 1, 1, 1, 23),
    ("layer3 3x3 dil 2 256", 8, 256, 256, 3, 1, 2, 23),
    ("layer3 1x1 256->1024 (+downsample)", 8, 256, 1024, 1, 1, 1, 24),
    ("layer4 1x1 2048->512", 8, 2048, 512, 1, 1, 1, 3),
    ("layer4 3x3 dil 4 512", 8, 512, 512, 3, 1, 4, 3),
    ("layer4 1x1 512->2048 (+downsample)", 8, 512, 2048, 1, 1, 1, 4),
    ("head ASPP 3x3 dil 6/12 2048->128", 8, 2048, 128, 3, 1, 12, 2),
    ("head bottleneck 3x3 256", 8, 256, 256, 3, 1, 1, 1),
]


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def jax_conv(impl: str):
    """conv(x, w, stride, dilation) of one conv_impl (the functions the models use)."""
    if impl == "lax":
        return layers.lax_conv
    if impl == "matmul":
        return layers.matmul_grad_conv
    if impl == "im2col":

        def im2col(x, w, stride, dilation):
            k = w.shape[0]
            out_hw = [
                (n + 2 * dilation * (k // 2) - dilation * (k - 1) - 1) // stride + 1
                for n in x.shape[1:3]
            ]
            columns = jnp.concatenate(layers._taps(x, k, stride, dilation, out_hw), axis=-1)
            return jnp.dot(columns, w.reshape(-1, w.shape[-1]))

        return im2col
    raise ValueError(f"unknown conv_impl {impl!r}; known: {list(layers.CONV_IMPLS)}")


def _best(fn, best: dict, key) -> None:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)


def conv_runners(impls, x, w, g, stride: int, dilation: int, with_torch: bool) -> dict:
    """impl -> (forward, input gradient, weight gradient), each a no-argument call."""
    runners = {}
    xj, wj, gj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)
    for impl in impls:
        conv = functools.partial(jax_conv(impl), stride=stride, dilation=dilation)
        fwd = jax.jit(conv)
        dx = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda a: conv(a, w), x)[1](g)[0])
        dw = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda b: conv(x, b), w)[1](g)[0])
        runners[impl] = (
            functools.partial(fwd, xj, wj),
            functools.partial(dx, xj, wj, gj),
            functools.partial(dw, xj, wj, gj),
        )
        for fn in runners[impl]:
            jax.block_until_ready(fn())  # compile
    if with_torch:
        import torch
        import torch.nn.functional as F

        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
        conv_args = (stride, dilation * (w.shape[0] // 2), dilation)
        runners["torch"] = (
            functools.partial(F.conv2d, xt, wt, None, *conv_args),
            functools.partial(torch.nn.grad.conv2d_input, xt.shape, wt, gt, *conv_args),
            functools.partial(torch.nn.grad.conv2d_weight, xt, wt.shape, gt, *conv_args),
        )
    return runners


def conv_table(args) -> None:
    rng = np.random.default_rng(0)
    totals: dict[str, list[float]] = {}
    print(
        f"\nPer-conv timings, DLV2-R101 convs at {args.size}x{args.size} batch {args.batch}, "
        f"float32, best of {args.rounds} alternated rounds; GFLOP/s of the forward's FLOPs"
    )
    print("| conv | x count | GFLOP | impl | fwd ms | dx ms | dW ms | fwd | dx | dW GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, frac, cin, cout, k, s, d, count in R101_CONVS:
        if args.only and args.only not in name:
            continue
        h = args.size // frac
        x = rng.normal(size=(args.batch, h, h, cin)).astype(np.float32)
        w = (rng.normal(size=(k, k, cin, cout)) * 0.05).astype(np.float32)
        ho = (h + 2 * d * (k // 2) - d * (k - 1) - 1) // s + 1
        g = rng.normal(size=(args.batch, ho, ho, cout)).astype(np.float32)
        flops = 2 * args.batch * ho * ho * k * k * cin * cout
        runners = conv_runners(args.impls, x, w, g, s, d, not args.no_torch)
        best: dict = {}
        for _ in range(args.rounds):
            for impl, parts in runners.items():
                for part, fn in zip(("fwd", "dx", "dw"), parts, strict=True):
                    _best(fn, best, (impl, part))
        for impl in runners:
            times = [best[(impl, part)] for part in ("fwd", "dx", "dw")]
            total = totals.setdefault(impl, [0.0, 0.0, 0.0])
            for i, t in enumerate(times):
                total[i] += count * t
            print(
                f"| {name} | {count} | {flops / 1e9:.2f} | {impl} | "
                + " | ".join(f"{1e3 * t:.1f}" for t in times)
                + " | "
                + " | ".join(f"{flops / t / 1e9:.0f}" for t in times)
                + " |",
                flush=True,
            )
    print("\nWeighted by occurrences (one forward + backward of every conv of DLV2-R101):")
    print("| impl | fwd s | dx s | dW s | sum s |")
    print("|---|---|---|---|---|")
    for impl, (f, x, w) in totals.items():
        print(f"| {impl} | {f:.2f} | {x:.2f} | {w:.2f} | {f + x + w:.2f} |")


def model_table(args) -> None:
    import torch

    from configs import default
    from ddb_jax import models
    from ddb_jax.convert import resnet as resnet_names
    from ddb_jax.convert.common import convert_state_dict
    from ddb_jax.uda import losses
    from torch_ref.common import nchw, numpy_state_dict, to_torch
    from torch_ref.losses import seg_ce
    from torch_ref.resnet_dlv2 import Segmentor, randomize

    torch_model = randomize(Segmentor(args.depth, num_classes=19, dropout=0.0), seed=3).train()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, 19, size=(args.batch, args.size, args.size)).astype(np.int32)
    runs = {}
    for impl in args.impls:
        cfg = default.get_model_config()
        cfg.backbone, cfg.conv_impl, cfg.dropout_ratio = f"resnet{args.depth}_v1c", impl, 0.0
        model = models.build_model(cfg)
        shapes = models.variable_shapes(model)
        variables = convert_state_dict(
            numpy_state_dict(torch_model), shapes, resnet_names.torch_name
        )
        variables = jax.tree_util.tree_map(jnp.asarray, variables)

        def loss(params, images, labels, variables=variables, model=model):
            named_outputs, _ = model.apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            logits = named_outputs["logits"]
            return losses.cross_entropy(logits, labels)

        fwd = jax.jit(loss)
        fwd_bwd = jax.jit(jax.value_and_grad(loss))
        args_ = (variables["params"], jnp.asarray(images), jnp.asarray(labels))
        jax.block_until_ready(fwd(*args_))
        jax.block_until_ready(fwd_bwd(*args_))
        runs[impl] = (lambda f=fwd, a=args_: f(*a), lambda f=fwd_bwd, a=args_: f(*a))
    if not args.no_torch:
        xt, yt = nchw(images), to_torch(labels).long()

        def torch_fwd():
            with torch.no_grad():
                return seg_ce(torch_model(xt)[0], yt)

        def torch_fwd_bwd():
            torch_model.zero_grad(set_to_none=True)
            value = seg_ce(torch_model(xt)[0], yt)
            value.backward()
            return value

        torch_fwd_bwd()
        runs[f"torch ({torch.get_num_threads()} threads)"] = (torch_fwd, torch_fwd_bwd)
    best: dict = {}
    for _ in range(args.rounds):
        for name, (fwd, fwd_bwd) in runs.items():
            _best(fwd, best, (name, "fwd"))
            _best(fwd_bwd, best, (name, "fwd_bwd"))
    print(f"\nDLV2-R{args.depth} + head, {args.size}x{args.size} batch {args.batch}, train mode, "
          f"CE, float32, best of {args.rounds} alternated rounds")  # fmt: skip
    print("| implementation | forward ms | forward+backward ms | backward alone ms |")
    print("|---|---|---|---|")
    for name in runs:
        f, fb = best[(name, "fwd")], best[(name, "fwd_bwd")]
        print(f"| {name} | {1e3 * f:.0f} | {1e3 * fb:.0f} | {1e3 * (fb - f):.0f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convs", action="store_true", help="per-conv fwd / dx / dW table")
    parser.add_argument("--model", action="store_true", help="whole-model fwd / fwd+bwd table")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--depth", type=int, default=101, help="--model: ResNetV1c depth")
    parser.add_argument("--impls", default="lax,im2col,matmul", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="", help="--convs: only convs whose name has this")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    args.impls = [i for i in args.impls.split(",") if i]
    if not (args.convs or args.model):
        args.convs = args.model = True
    print(f"{load()} (start); jax {jax.__version__} on {jax.devices()[0].device_kind}")
    if args.convs:
        conv_table(args)
    if args.model:
        model_table(args)
    print(f"\n{load()} (end)")


if __name__ == "__main__":
    main()
