"""BatchNorm's two ways of reducing the batch statistics (ddb_jax/models/batch_norm.py) against
torch's ``BatchNorm2d`` in training mode, in float64: the output, the running statistics and
the gradients of the input, scale and bias. The one-pass moments are taken about the running
mean; the data's mean is far from it (3 against 0.5), so the test sees the shift at work.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddb_jax.models import batch_norm


@pytest.fixture(autouse=True)
def float64():
    """float64 for this module's tests only (a global switch would leak into the worker's
    later tests)."""
    with jax.enable_x64(True):
        yield


SHAPE = (4, 5, 6, 3)  # NHWC


def torch_reference(x, scale, bias, running_mean, running_var, cotangent):
    bn = torch.nn.BatchNorm2d(x.shape[-1], momentum=0.1, eps=1e-5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(scale))
        bn.bias.copy_(torch.from_numpy(bias))
        bn.running_mean.copy_(torch.from_numpy(running_mean))
        bn.running_var.copy_(torch.from_numpy(running_var))
    inputs = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    out = bn(inputs)
    out.backward(torch.from_numpy(cotangent).permute(0, 3, 1, 2))
    return {
        "out": out.detach().permute(0, 2, 3, 1).numpy(),
        "mean": bn.running_mean.numpy(),
        "var": bn.running_var.numpy(),
        "d_x": inputs.grad.permute(0, 2, 3, 1).numpy(),
        "d_scale": bn.weight.grad.numpy(),
        "d_bias": bn.bias.grad.numpy(),
    }


def ours(x, scale, bias, running_mean, running_var, cotangent, statistics):
    module = batch_norm.make_norm(True, jnp.float64, "bn")
    apply = batch_norm.with_batch_statistics(module.apply, statistics)
    stats = {"mean": jnp.asarray(running_mean), "var": jnp.asarray(running_var)}

    def loss(x, params):
        out, updated = apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(out * cotangent), (out, updated["batch_stats"])

    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    (_, (out, new_stats)), (d_x, d_params) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        jnp.asarray(x), params
    )
    return {
        "out": out, "mean": new_stats["mean"], "var": new_stats["var"], "d_x": d_x,
        "d_scale": d_params["scale"], "d_bias": d_params["bias"],
    }  # fmt: skip


@pytest.mark.parametrize("statistics", batch_norm.BN_STATISTICS)
def test_training_mode_matches_torch_in_float64(statistics):
    rng = np.random.default_rng(0)
    x = 3.0 + rng.standard_normal(SHAPE)
    scale, bias = 1.0 + 0.1 * rng.standard_normal(3), 0.1 * rng.standard_normal(3)
    running_mean, running_var = np.full(3, 0.5), np.full(3, 2.0)
    cotangent = rng.standard_normal(SHAPE)
    expected = torch_reference(x, scale, bias, running_mean, running_var, cotangent)
    got = ours(x, scale, bias, running_mean, running_var, cotangent, statistics)
    # Values of order 1-10 from sums of 120 terms: float64 rounding is about 1e-14; the
    # one-pass moments lose (mean - shift)^2 / var ~ 6 more to cancellation.
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[name]), value, rtol=1e-11, atol=1e-11,
                                   err_msg=f"{statistics}: {name}")  # fmt: skip


def test_unknown_statistics_is_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"config.model.bn_statistics='three_pass'; known"):
        batch_norm.with_batch_statistics(lambda: None, "three_pass")


def test_one_pass_gradient_through_the_statistics_too():
    """one_pass_batch_norm's closed-form gradient also carries the cotangents of the mean
    and variance it returns (nothing reads them today but the running statistics): the
    same as autodiff of the two-pass formulas, in float64."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(2.0 + rng.standard_normal(SHAPE))
    scale, bias = jnp.asarray(rng.standard_normal(3)), jnp.asarray(rng.standard_normal(3))
    shift = jnp.asarray(rng.standard_normal(3))
    weights = [jnp.asarray(rng.standard_normal(s)) for s in (SHAPE, (3,), (3,))]
    axes = (0, 1, 2)

    def two_pass(x, scale, bias):
        mean, var = batch_norm.batch_moments(x, axes)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return y, mean, var

    def one_pass(x, scale, bias):
        return batch_norm.one_pass_batch_norm(x, scale, bias, shift, 1e-5)

    def loss(fn):
        return lambda *a: sum(jnp.sum(o * w) for o, w in zip(fn(*a), weights, strict=True))

    expected = jax.grad(loss(two_pass), (0, 1, 2))(x, scale, bias)
    got = jax.grad(loss(one_pass), (0, 1, 2))(x, scale, bias)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-11, atol=1e-11)
