"""Helpers of the step-level parity tests (self-training, CKD, supervised, previews).

The parity tests run both sides in float64 (``jax.enable_x64`` and torch double), so their
bounds follow from float64 arithmetic and hold on any x86-64 CPU: an accumulation of n
rounded operations on values of magnitude ``scale`` is off by at most ~ n * EPS64 * scale
(EPS64 = 2^-52). The float32 checks (devices, bfloat16/float32 paths) take their bounds
from EPS32 (2^-23) and a float64 run of the same step.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from configs import default
from ddb_jax import models
from ddb_jax.convert import resnet as resnet_names
from ddb_jax.convert.common import convert_state_dict, path_to_str
from ddb_jax.methods import assemble
from ddb_jax.methods.state import as_optimizers
from torch_ref.common import numpy_state_dict
from torch_ref.optim import mmcv_lr
from torch_ref.resnet_dlv2 import Segmentor, randomize

EPS64 = float(np.finfo(np.float64).eps)  # 2^-52
EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
ADAM_EPS = 1e-8  # optax.adamw / torch.optim.AdamW


# ResNet-18 DLV2 at a quarter of the published base width and an eighth of the head width:
# the same layers, names and arithmetic, and the steps run in a fraction of the time.
BASE_CHANNELS, HEAD_CHANNELS = 16, 32


def make_config(stage: str = "self_training", dtype: str = "float64") -> ml_collections.ConfigDict:
    """ResNet-18 DLV2 (tiny widths), no dropout, lr 1e-3 without warmup, 10 steps."""
    config = default.get_config()
    config.stage = stage
    config.model.backbone = "resnet18_v1c"
    config.model.base_channels = BASE_CHANNELS
    config.model.head_channels = HEAD_CHANNELS
    config.model.dropout_ratio = 0.0
    config.model.dtype = dtype
    config.optim.lr = 1e-3
    config.optim.warmup_iters = 0
    config.num_steps = 10
    config.st.mask = "zero" if stage == "ckd" else "class"
    return config


def make_batch(seed: int, n: int = 2, size=(32, 40), dtype=np.float64, num_labels: int = 6):
    """Random normalised images and labels 0..num_labels-1 with ignored (255) top rows."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, size=(n, *size)).astype(np.int32)
    labels[:, :3] = 255
    return {
        "source_image": rng.normal(size=(n, *size, 3)).astype(dtype),
        "source_label": labels,
        "target_image": rng.normal(size=(n, *size, 3)).astype(dtype),
    }


@contextlib.contextmanager
def torch_threads(num: int = 1):
    """The reference steps are tiny: torch's thread pool only costs time on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_segmentor(seed: int, dtype=torch.float64) -> Segmentor:
    """A random ResNet-18 DLV2 of :func:`make_config`'s widths (non-trivial BN statistics).
    ``randomize`` draws float32 values, so the float32 and float64 models hold the same."""
    model = Segmentor(
        18, num_classes=19, dropout=0.0, base_channels=BASE_CHANNELS, channels=HEAD_CHANNELS
    )
    return randomize(model, seed=seed).to(dtype)


def initial_state(method, tx, variables, key):
    """The stage's initial state (``methods.assemble.initial_state``, the loop's) as one
    compiled program (op by op it is ~100 tiny compiles, one per leaf shape and operation:
    seconds)."""
    txs = as_optimizers(tx)
    return jax.jit(lambda v, k: assemble.initial_state(method, txs, v, k))(variables, key)


def to_flax(torch_model: torch.nn.Module, model, dtype=jnp.float64, names=None):
    """The torch model's state dict as Flax variables of ``model``, every leaf in ``dtype``
    (``models.variable_shapes`` says float32 for the parameters: the variables decide)."""
    shapes = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, dtype), models.variable_shapes(model)
    )
    names = names or resnet_names.torch_name
    variables = convert_state_dict(numpy_state_dict(torch_model), shapes, names)
    return jax.tree_util.tree_map(jnp.asarray, variables)


def flat_with_names(tree, collection: str) -> list[tuple[tuple[str, ...], np.ndarray]]:
    """(('params'|'batch_stats', *module path, leaf), value) for every leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [((collection, *path_to_str(p).split("/")), np.asarray(v)) for p, v in leaves]


def torch_value(state_dict: dict[str, np.ndarray], path: tuple[str, ...], names=None) -> np.ndarray:
    """The torch entry of a Flax leaf path, in the Flax layout (``names``: the Flax path ->
    torch key map; the single-scale ResNet segmentor's by default)."""
    src = (names or resnet_names.torch_name)(path)
    return src.transform(np.asarray(state_dict[src.key]))


def paired(tree, collection: str, torch_dict: dict[str, np.ndarray], names=None):
    """[(name, ours, reference)] for every leaf of ``tree`` (``torch_dict``: by torch name)."""
    return [
        ("/".join(path), ours, torch_value(torch_dict, path, names))
        for path, ours in flat_with_names(tree, collection)
    ]


@torch.no_grad()
def load_into_torch(model: torch.nn.Module, params, names=None) -> None:
    """Copies Flax ``params`` into the torch model (same dtype as the model)."""
    named = dict(model.named_parameters())
    for path, value in flat_with_names(params, "params"):
        key = (names or resnet_names.torch_name)(path).key
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        named[key].copy_(torch.from_numpy(np.array(value)))


def group_lr(name: str, optim_cfg, it: int, num_steps: int) -> float:
    """The rate of iteration ``it`` of the parameter ``name`` ('[params/]decode_head/...' at
    ``head_lr_mult`` x the base rate), as mmcv's schedule computes it."""
    mult = optim_cfg.head_lr_mult if "/decode_head/" in f"/{name}" else 1.0
    return mmcv_lr(
        it,
        optim_cfg.lr * mult,
        num_steps,
        optim_cfg.warmup_iters,
        optim_cfg.warmup_ratio,
        optim_cfg.poly_power,
        optim_cfg.min_lr * mult,
    )


def per_image_draws(aug: dict) -> list[dict]:
    """The step's stacked strong-augmentation draws as one dict per image (torch_ref.augment)."""
    aug = {k: np.asarray(v) for k, v in aug.items()}
    return [{k: v[i] for k, v in aug.items()} for i in range(len(aug["jitter"]))]


def assert_bn_statistics(
    state, ref_student: dict, ref_teacher: dict, rel: float, label: str, names=None
):
    """Student and EMA-teacher running BN statistics within ``rel`` of the largest reference
    value of each (a relative bound on the collection, not per element)."""
    for tree, ref_dict, what in (
        (state.batch_stats, ref_student, "student BN statistics"),
        (state.ema_batch_stats, ref_teacher, "teacher BN statistics"),
    ):
        stats = paired(tree, "batch_stats", ref_dict, names)
        scale = max(np.abs(r).max() for _, _, r in stats)
        assert_within(stats, rel * scale, f"{label}: {what}")


def max_error(pairs) -> tuple[float, str]:
    """The largest |ours - reference| over [(name, ours, reference)], and where."""
    worst = max(pairs, key=lambda p: np.max(np.abs(p[1] - p[2])))
    return float(np.max(np.abs(worst[1] - worst[2]))), worst[0]


def assert_within(pairs, bound: float, what: str) -> float:
    """Every |ours - reference| <= bound; returns the largest error (reported by -s)."""
    error, name = max_error(pairs)
    assert error <= bound, f"{what}: |ours - reference| = {error:.3g} at {name} > {bound:.3g}"
    print(f"{what}: max error {error:.3g} (bound {bound:.3g})")
    return error


def top2_margin(scores: np.ndarray, axis: int) -> np.ndarray:
    """Gap between the largest and second largest entry along ``axis``."""
    top2 = np.sort(scores, axis=axis).take([-1, -2], axis=axis)
    return top2.take(0, axis=axis) - top2.take(1, axis=axis)


def assert_argmax_agrees(ours: np.ndarray, scores: np.ndarray, axis: int, tie: float, what: str):
    """``ours`` is the argmax of ``scores`` wherever the top-2 gap exceeds ``tie`` (a bound
    on the two sides' difference of ``scores``): only a provable near-tie may differ."""
    margin = top2_margin(scores, axis)
    differ = ours != scores.argmax(axis)
    assert np.all(margin[differ] <= tie), (what, np.sum(differ), margin[differ].min())
    print(f"{what}: {np.sum(differ)} labels differ, {np.sum(margin <= tie)} near-ties <= {tie:.2g}")


def adam_param_bound(lr, grad_bound: float, sqrt_v, params, eps: float = EPS64) -> np.ndarray:
    """Elementwise bound on |p_ours - p_ref| after an AdamW step from equal parameters whose
    gradients (this step's and the earlier ones in the moments) differ by <= grad_bound.

    AdamW moves p by -lr * (m / (sqrt(v) + eps) + wd * p), m and v bias-corrected. A
    gradient change <= d moves m by <= d and sqrt(v) by <= d (a weighted 2-norm of the
    gradients, weights summing to 1), and |m| <= 1.0014 sqrt(v) for the first two steps,
    so the update moves by <= 2.0014 d / (max(sqrt(v) - d, 0) + eps): Adam's 1/eps
    sensitivity where the gradient is ~0 (also in float64, where d is tiny). |update| <=
    1.0014, so never more than 2.0028. Plus the rounding (unit ``eps``) of the update (the
    moments, sqrt, division: < 8 roundings of |update| <= 1.0014) and of p (3): 16 ulp.
    """
    sqrt_v = np.abs(np.asarray(sqrt_v, np.float64))
    sensitivity = 2.0014 * grad_bound / (np.maximum(sqrt_v - grad_bound, 0.0) + ADAM_EPS)
    return lr * np.minimum(sensitivity, 2.0028) + 16 * eps * (np.abs(params) + lr)


# Relative bound of the float64 step parity tests (self-training, DAFormer's DACS, MIC):
# far above float64 rounding of their ~2^19 operations per value (2^-33 >> 2^19 * 2^-52).
REL64 = 2.0**-33


def assert_self_training_update(config, it, state, grads, ref_grads, ref_student, ref_teacher,
                                before=None, names=None):  # fmt: skip
    """Iteration ``it`` of a float64 self-training step against the reference: gradients
    (within REL64 of their scale), parameters after AdamW elementwise (adam_param_bound:
    from equal parameters, sqrt(v) from the reference's gradients and the gradient bounds
    of both iterations; at the second, v holds both gradients, bias-corrected), BN
    statistics of the student and of the EMA teacher, and the EMA parameters (a copy at
    iteration 0, then one rounding per mix). ``before``: what this returned for the previous
    iteration (None at the first); ``names``: the Flax path -> torch key map (the
    single-scale ResNet segmentor's by default). Returns (reference gradients by name,
    gradient bound)."""
    pairs = paired(grads, "params", ref_grads, names)
    grad_bound = REL64 * max(np.abs(r).max() for _, _, r in pairs)
    assert_within(pairs, grad_bound, f"gradients {it}")
    this_bound = grad_bound
    if before is None:
        sqrt_v = {name: np.abs(r) for name, _, r in pairs}
    else:
        grads_before, bound_before = before
        b2 = config.optim.b2
        sqrt_v = {
            name: np.sqrt((b2 * (1 - b2) * grads_before[name] ** 2 + (1 - b2) * r**2) / (1 - b2**2))
            for name, _, r in pairs
        }
        grad_bound = max(grad_bound, bound_before)
    worst, ratio = 0.0, 0.0
    for name, ours, r in paired(state.params, "params", ref_student, names):
        lr = group_lr(name, config.optim, it, config.num_steps)
        bound = adam_param_bound(lr, grad_bound, sqrt_v[name], r)
        assert np.all(np.abs(ours - r) <= bound), (it, name)
        worst = max(worst, float(np.max(np.abs(ours - r))))
        ratio = max(ratio, float(np.max(np.abs(ours - r) / bound)))
    print(f"parameters {it}: max error {worst:.3g}, max error / bound {ratio:.3g}")
    assert_bn_statistics(state, ref_student, ref_teacher, REL64, str(it), names)
    for name, ours, r in paired(state.ema_params, "params", ref_teacher, names):
        assert np.all(np.abs(ours - r) <= 4 * EPS64 * np.abs(r).max()), (it, name)
    return {name: r for name, _, r in pairs}, this_bound
