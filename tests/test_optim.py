"""The schedule against mmcv's closed form; the optimiser against torch.optim.AdamW groups."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import default
from ddb_jax.train import optim
from torch_ref.optim import mmcv_lr

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
