"""Cost of DDB's per-step array ops vs one model forward+backward, JAX and PyTorch.

Times (jitted, warm, block_until_ready) bridging (class-mix masks + mixing image, label,
weight), CKD's 'zero' bridging, strong augmentation, pseudo-labelling and the CKD
rectification (prototype weights of two teachers + rectified ensemble), then a DLV2-R101
forward+backward built from configs/default.py, and prints each op's share of the model
step and the totals of the self-training step's ops (bridging + augmentation +
pseudo-labels) and of the CKD step's (zero bridging + augmentation + rectification). The
same ops are timed in PyTorch (the transcriptions of the reference in torch_ref/) on the same
inputs. Every figure is the best of ``--repeats`` warm calls (the model: of repeats // 3):
on a shared machine the minimum is the least noisy estimate.

    .venv/bin/python benchmarks/ops.py            # batch 4, 512x512, DLV2-R101
    .venv/bin/python benchmarks/ops.py --small    # seconds on CPU (batch 2, 64x64, R18)
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddb_jax.ops import resize_bilinear  # noqa: E402
from ddb_jax.uda import augment, bridging, losses, prototypes  # noqa: E402


def load_default_config():
    spec = importlib.util.spec_from_file_location("configs_default", ROOT / "configs/default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timeit(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn()`` after a warm-up call (which compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def make_inputs(batch: int, size: int, classes: int, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    low = size // 8
    return dict(
        src_img=rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        tgt_img=rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        src_lbl=rng.integers(0, classes, (batch, size, size)).astype(np.int32),
        logits_a=rng.normal(size=(batch, low, low, classes)).astype(np.float32),
        logits_b=rng.normal(size=(batch, low, low, classes)).astype(np.float32),
        feat_a=rng.normal(size=(batch, low, low, channels)).astype(np.float32),
        feat_b=rng.normal(size=(batch, low, low, channels)).astype(np.float32),
        protos_a=rng.normal(size=(classes, channels)).astype(np.float32),
        protos_b=rng.normal(size=(classes, channels)).astype(np.float32),
    )


def jax_ops(size: int):
    """name -> jitted function of the input dict."""

    @jax.jit
    def bridge(key, x):
        labels, weight = losses.pseudo_labels(x["logits_a"], (size, size))
        mask = bridging.make_masks(key, x["src_lbl"], "class")
        return (
            bridging.mix(mask, x["src_img"], x["tgt_img"]),
            bridging.mix(mask, x["src_lbl"], labels),
            bridging.mix(mask, jnp.ones_like(weight), weight),
        )

    @jax.jit
    def bridge_zero(key, x):  # CKD: the student's input is the target image itself
        mask = bridging.make_masks(key, x["src_lbl"], "zero")
        return bridging.mix(mask, x["src_img"], x["tgt_img"])

    @jax.jit
    def strong(key, x):
        return augment.strong_augment(key, x["tgt_img"])

    @jax.jit
    def pseudo(key, x):
        return losses.pseudo_labels(x["logits_a"], (size, size))

    @jax.jit
    def rectify(key, x):
        wa = prototypes.prototype_weights(x["feat_a"], x["protos_a"], (size, size))
        wb = prototypes.prototype_weights(x["feat_b"], x["protos_b"], (size, size))
        la = resize_bilinear(x["logits_a"], (size, size))
        lb = resize_bilinear(x["logits_b"], (size, size))
        return prototypes.rectified_ensemble(la, wa, lb, wb)

    return dict(
        bridging=bridge,
        bridging_zero=bridge_zero,
        strong_aug=strong,
        pseudo_labels=pseudo,
        ckd_rectify=rectify,
    )


def torch_ops(size: int, classes: int):
    """The same ops in PyTorch, per sample where the reference is per sample."""
    import torch
    import torch.nn.functional as F

    from torch_ref.augment import strong as torch_strong
    from torch_ref.common import nchw
    from torch_ref.prototypes import prototype_weight as torch_proto_weights
    from torch_ref.prototypes import rectified_ensemble as torch_rectified_labels

    def pseudo(x):
        logits = F.interpolate(nchw(x["logits_a"]), (size, size), mode="bilinear")
        prob, label = torch.max(torch.softmax(logits, 1), 1)
        weight = torch.sum(prob.ge(0.968).long() == 1).item() / label.numel()
        return label, weight * torch.ones(prob.shape)

    def bridge(x):
        label, weight = pseudo(x)
        src_lbl = torch.from_numpy(x["src_lbl"])
        masks = []
        for lab in src_lbl:  # STDataset.get_class_mask
            classes_ = torch.unique(lab)
            n = classes_.shape[0]
            choice = np.random.choice(n, int((n + n % 2) / 2), replace=False)
            chosen = classes_[torch.Tensor(choice).long()]
            masks.append(lab.eq(chosen[:, None, None]).sum(0))
        m = torch.stack(masks)
        img = m[:, None] * nchw(x["src_img"]) + (1 - m[:, None]) * nchw(x["tgt_img"])
        return img, m * src_lbl + (1 - m) * label, m * 1.0 + (1 - m) * weight

    def bridge_zero(x):
        m = torch.zeros(x["src_lbl"].shape)[:, None]
        return m * nchw(x["src_img"]) + (1 - m) * nchw(x["tgt_img"])

    def strong(x):
        rng = np.random.default_rng(0)
        outs = []
        for img in x["tgt_img"]:
            p = dict(
                jitter=rng.uniform() > 0.2, brightness=rng.uniform(0.8, 1.2),
                contrast=rng.uniform(0.8, 1.2), saturation=rng.uniform(0.8, 1.2),
                hue=rng.uniform(-0.2, 0.2), order=rng.permutation(4),
                blur=rng.uniform() > 0.5, sigma=rng.uniform(0.15, 1.15),
            )  # fmt: skip
            outs.append(torch_strong(img, p))
        return outs

    def rectify(x):
        def up(a):
            return F.interpolate(nchw(a), (size, size), mode="bilinear")

        wa = torch_proto_weights(up(x["feat_a"]), torch.from_numpy(x["protos_a"]))
        wb = torch_proto_weights(up(x["feat_b"]), torch.from_numpy(x["protos_b"]))
        return torch_rectified_labels(up(x["logits_a"]), wa, up(x["logits_b"]), wb, True)

    return dict(
        bridging=bridge,
        bridging_zero=bridge_zero,
        strong_aug=strong,
        pseudo_labels=pseudo,
        ckd_rectify=rectify,
    )


def model_step_time(backbone: str, batch: int, size: int, repeats: int) -> float | None:
    """Seconds of one jitted forward+backward (train mode, CE loss) of the config's model."""
    try:
        from ddb_jax.models import build_model, init_variables
    except ImportError as err:  # pragma: no cover - depends on the tree
        print(f"model part skipped: {err}")
        return None
    cfg = load_default_config().get_model_config()
    cfg.backbone = backbone
    model = build_model(cfg)
    variables = init_variables(model, jax.random.key(0), (size, size))
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, cfg.num_classes, (batch, size, size)), jnp.int32)

    @jax.jit
    def grad_step(params, batch_stats):
        def loss_fn(p):
            named_outputs, new_state = model.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )
            logits = named_outputs["logits"]
            return losses.cross_entropy(logits, labels), new_state

        return jax.grad(loss_fn, has_aux=True)(params)

    return timeit(lambda: grad_step(variables["params"], variables["batch_stats"]), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--backbone", default="resnet101_v1c")
    parser.add_argument("--model-batch", type=int, default=None, help="default: --batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--small", action="store_true", help="batch 2, 64x64, resnet18_v1c")
    args = parser.parse_args()
    if args.small:
        args.batch, args.size, args.backbone = 2, 64, "resnet18_v1c"
    model_batch = args.model_batch or args.batch

    inputs = make_inputs(args.batch, args.size, args.classes, args.channels)
    key = jax.random.key(0)
    jax_inputs = jax.tree.map(jnp.asarray, inputs)
    jax_times = {
        name: timeit(lambda fn=fn: fn(key, jax_inputs), args.repeats)
        for name, fn in jax_ops(args.size).items()
    }
    torch_times = {}
    if not args.skip_torch:
        import torch

        with torch.no_grad():
            torch_times = {
                name: timeit(lambda fn=fn: fn(inputs), args.repeats)
                for name, fn in torch_ops(args.size, args.classes).items()
            }
    model_time = None
    if not args.skip_model:
        model_time = model_step_time(
            args.backbone, model_batch, args.size, max(1, args.repeats // 3)
        )
        if model_time is not None and model_batch != args.batch:
            model_time *= args.batch / model_batch  # linear extrapolation (CPU)

    print(
        f"\nbatch {args.batch}, {args.size}x{args.size}, {args.classes} classes, "
        f"{args.channels}-ch features at 1/8; {jax.devices()[0].platform}; "
        f"model {args.backbone} fwd+bwd batch {model_batch}"
        + (f" (scaled to {args.batch})" if model_batch != args.batch else "")
    )
    print(f"{'op':<18}{'jax ms':>10}{'torch ms':>10}{'jax / model':>13}")
    for name, t in jax_times.items():
        ref = f"{1e3 * torch_times[name]:10.1f}" if name in torch_times else f"{'-':>10}"
        frac = f"{t / model_time:13.4f}" if model_time else f"{'-':>13}"
        print(f"{name:<18}{1e3 * t:10.1f}{ref}{frac}")
    groups = {
        "self-training": ("bridging", "strong_aug", "pseudo_labels"),
        "CKD": ("bridging_zero", "strong_aug", "ckd_rectify"),
    }
    for group, names in groups.items():
        total = sum(jax_times[name] for name in names)
        ref_total = sum(torch_times.get(name, float("nan")) for name in names)
        ref = f"{1e3 * ref_total:10.1f}" if torch_times else f"{'-':>10}"
        frac = f"{total / model_time:13.4f}" if model_time else f"{'-':>13}"
        print(f"{group + ' ops':<18}{1e3 * total:10.1f}{ref}{frac}   ({' + '.join(names)})")
    if model_time:
        print(f"{'model fwd+bwd':<18}{1e3 * model_time:10.1f}")
    else:
        print("model fwd+bwd: skipped")


if __name__ == "__main__":
    main()
