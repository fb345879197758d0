"""The schedule against mmcv's closed form; the optimiser against torch.optim.AdamW groups."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import default
from ddb_jax import models
from ddb_jax.convert import mit as convert_mit
from ddb_jax.convert import resnet as convert_resnet
from ddb_jax.convert.common import convert_state_dict, path_to_str
from ddb_jax.methods import optim
from tests.parity_support import make_config, torch_segmentor
from torch_ref import mit_heads
from torch_ref.common import numpy_state_dict
from torch_ref.optim import mmcv_lr
from torch_ref.paramwise import DAFORMER_KEYS, multipliers, set_learning_rates
from torch_ref.paramwise import adamw as torch_adamw

EPS64 = float(np.finfo(np.float64).eps)  # 2^-52
ITERATIONS = [0, 1, 7, 749, 1499, 1500, 1501, 20_000, 39_999, 40_000]


def schedule_tolerance(it: int, max_iters: int, warmup: int, ratio: float, power=1.0) -> float:
    """Relative float64 bound of |ours - mmcv_lr|: a few roundings (2^4 EPS64), plus the
    cancellations of mmcv's formula (ours has none: ``(max_iters - it) / max_iters`` and
    ``ratio + (1 - ratio) * it / warmup``): ``1 - it / max_iters`` is off by <= 2^-53
    absolute, so by 2^-53 max_iters / (max_iters - it) relative (times ``power`` through
    the power), and the warmup factor ``1 - (1 - it / warmup) (1 - ratio)`` by <= 4 * 2^-53
    absolute (1e-6 at iteration 0 with ratio 1e-6)."""
    tol = 16 * EPS64
    if it < max_iters:
        tol += power * 2.0**-53 * max_iters / (max_iters - it)
    if it < warmup:
        tol += 4 * 2.0**-53 / (1 - (1 - it / warmup) * (1 - ratio))
    return tol


@pytest.mark.parametrize("it", ITERATIONS)
def test_schedule_matches_mmcv(it):
    schedule = optim.mmcv_poly_warmup_schedule(6e-5, 40_000, 1500, 1e-6)
    expected = mmcv_lr(it, 6e-5, 40_000, 1500, 1e-6)
    np.testing.assert_allclose(float(schedule(it)), expected, rtol=1e-5, atol=1e-14)
    # Under x64 the schedule is computed in float64 (the float64 step parity tests use it).
    with jax.enable_x64(True):
        value = schedule(it)
        assert value.dtype == jnp.float64
        np.testing.assert_allclose(
            float(value), expected, rtol=schedule_tolerance(it, 40_000, 1500, 1e-6), atol=0
        )


def test_schedule_power_and_min_lr():
    schedule = optim.mmcv_poly_warmup_schedule(1e-2, 100, 10, 0.1, power=0.9, min_lr=1e-4)
    for it in (0, 5, 10, 55, 99):
        expected = mmcv_lr(it, 1e-2, 100, 10, 0.1, 0.9, 1e-4)
        np.testing.assert_allclose(float(schedule(it)), expected, rtol=1e-5)
        with jax.enable_x64(True):
            tol = schedule_tolerance(it, 100, 10, 0.1, 0.9)
            np.testing.assert_allclose(float(schedule(it)), expected, rtol=tol, atol=0)


def test_head_parameters_get_ten_times_the_rate_like_torch_adamw():
    """Three AdamW steps on a two-group toy problem, ours vs torch param groups, float64.

    Bound: each element goes through < 2^7 rounded operations over the three steps (2^-45 of
    its O(1) magnitude), and AdamW's update moves by <= 2 d / |g| for a gradient error d
    (gradients 2 (p - target) are O(1) here, far from Adam's eps): 2^-40 absolute.
    """
    cfg = default.get_config().optim
    cfg = ml_collections.ConfigDict({**cfg.to_dict(), "warmup_iters": 2, "lr": 1e-2})
    rng = np.random.default_rng(0)
    init = {
        "backbone": {"w": rng.normal(size=(3, 2))},
        "decode_head": {"w": rng.normal(size=(2,))},
    }
    targets = [rng.normal(size=(3, 2)), rng.normal(size=(2,))]

    def loss_fn(p):
        return jnp.sum((p["backbone"]["w"] - targets[0]) ** 2) + jnp.sum(
            (p["decode_head"]["w"] - targets[1]) ** 2
        )

    with jax.enable_x64(True):
        tx, _ = optim.make_optimizer(cfg, num_steps=10)
        params = jax.tree_util.tree_map(jnp.asarray, init)
        state = tx.init(params)
        for _ in range(3):
            grads = jax.grad(loss_fn)(params)
            updates, state = tx.update(grads, state, params)
            params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        params = jax.device_get(params)
    assert params["backbone"]["w"].dtype == np.float64

    tb = torch.nn.Parameter(torch.from_numpy(init["backbone"]["w"].copy()))
    th = torch.nn.Parameter(torch.from_numpy(init["decode_head"]["w"].copy()))
    opt = torch.optim.AdamW(
        [{"params": [tb], "lr": 1e-2}, {"params": [th], "lr": 1e-1}],
        betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8,
    )  # fmt: skip
    for it in range(3):
        for group, base in zip(opt.param_groups, (1e-2, 1e-1), strict=True):
            group["lr"] = mmcv_lr(it, base, 10, 2, cfg.warmup_ratio)
        opt.zero_grad()
        loss = ((tb - torch.from_numpy(targets[0])) ** 2).sum() + (
            (th - torch.from_numpy(targets[1])) ** 2
        ).sum()
        loss.backward()
        opt.step()
    assert tb.dtype == torch.float64
    np.testing.assert_allclose(params["backbone"]["w"], tb.detach().numpy(), rtol=0, atol=2.0**-40)
    np.testing.assert_allclose(
        params["decode_head"]["w"], th.detach().numpy(), rtol=0, atol=2.0**-40
    )
    # The head moved further than a single-rate optimiser would move it.
    assert not np.allclose(params["decode_head"]["w"], init["decode_head"]["w"], atol=1e-3)


# --- DAFormer's paramwise decay (no weight decay on 'norm' and 'pos_block') --------------------

NO_DECAY = ("norm", "pos_block")


def mmcv_rule(label: str, head_lr_mult: float) -> tuple[float, float]:
    return {"head": (head_lr_mult, 1.0), "no_decay": (1.0, 0.0), "backbone": (1.0, 1.0)}[label]


def torch_models():
    """(name, torch model, flax model, name map) for MiT-B0 + DAFormer head and ResNet-18."""
    mit_cfg = make_config(dtype="float32").model
    mit_cfg.backbone, mit_cfg.head, mit_cfg.head_channels = "mit_b0", "daformer", 16
    mit = mit_heads.EncoderDecoder(
        mit_heads.NVMiT(**mit_heads.MIT_B0), mit_heads.DAFormerHead((32, 64, 160, 256), 16)
    )
    resnet_cfg = make_config(dtype="float32").model
    return [
        ("mit", mit, models.build_model(mit_cfg), convert_mit.torch_name),
        (
            "resnet",
            torch_segmentor(seed=0),
            models.build_model(resnet_cfg),
            convert_resnet.torch_name,
        ),
    ]


def test_paramwise_groups_are_mmcvs():
    """Every parameter's (lr_mult, decay_mult) is what mmcv's DefaultOptimizerConstructor
    gives its torch name under DAFormer's custom keys (the segmentor is 'model.' in the UDA
    model): the first key the name contains, longest keys first, so the head's norms keep
    their decay and its x10."""
    for family, torch_model, model, torch_name in torch_models():
        shapes = models.variable_shapes(model, (64, 64))["params"]
        labels = optim.param_groups(shapes, NO_DECAY)
        leaves = jax.tree_util.tree_flatten_with_path(labels)[0]
        torch_names = set(dict(torch_model.named_parameters()))
        assert len(leaves) == len(torch_names), family
        counts = {}
        for path, label in leaves:
            name = torch_name(("params", *path_to_str(path).split("/"))).key
            torch_names.discard(name)
            assert mmcv_rule(label, 10.0) == multipliers(f"model.{name}", DAFORMER_KEYS), name
            counts[label] = counts.get(label, 0) + 1
        assert not torch_names
        expected = {"head", "backbone", "no_decay"} if family == "mit" else {"head", "backbone"}
        assert set(counts) == expected, (family, counts)
    assert optim.custom_key_order(NO_DECAY) == ["pos_block", "head", "norm"]


def test_no_decay_group_like_torch_adamw_groups():
    """Three AdamW steps on MiT-B0 + DAFormer head with given gradients, ours vs torch AdamW
    with mmcv's param groups, float64: the same bound as above (2^-40; a norm parameter that
    decayed would be off by lr x wd x |p| ~ 1e-5)."""
    cfg = default.get_config().optim
    cfg.lr, cfg.warmup_iters, cfg.no_decay_keys = 1e-3, 2, NO_DECAY
    _, torch_model, model, torch_name = torch_models()[0]
    torch_model = torch_model.double()
    shapes = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float64),
        {"params": models.variable_shapes(model, (64, 64))["params"]},
    )
    rng = np.random.default_rng(0)
    named = dict(torch_model.named_parameters())
    grads_t = [{n: rng.normal(size=p.shape) for n, p in named.items()} for _ in range(3)]
    with jax.enable_x64(True):
        weights = {  # BN running statistics are not parameters: not in ``shapes``
            k: v
            for k, v in numpy_state_dict(torch_model).items()
            if not k.endswith(("running_mean", "running_var"))
        }
        params = convert_state_dict(weights, shapes, torch_name)["params"]
        params = jax.tree_util.tree_map(jnp.asarray, params)
        tx, _ = optim.make_optimizer(cfg, num_steps=10)
        state = tx.init(params)
        update = jax.jit(tx.update)
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        for g in grads_t:
            leaves = []
            for path, _ in paths:
                source = torch_name(("params", *path_to_str(path).split("/")))
                leaves.append(jnp.asarray(source.transform(g[source.key])))
            grads = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)
            updates, state = update(grads, state, params)
            params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    opt = torch_adamw(torch_model, cfg, dict(DAFORMER_KEYS, head={"lr_mult": cfg.head_lr_mult}))
    for it, g in enumerate(grads_t):
        set_learning_rates(opt, it, cfg, 10)
        for n, p in named.items():
            p.grad = torch.from_numpy(g[n])
        opt.step()
    ref = numpy_state_dict(torch_model)
    for path, ours in jax.tree_util.tree_flatten_with_path(params)[0]:
        source = torch_name(("params", *path_to_str(path).split("/")))
        expected = source.transform(ref[source.key])
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2.0**-40, err_msg=source.key)
