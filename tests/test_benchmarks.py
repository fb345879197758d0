"""The benchmarks' CPU conv path (the device check's smoke run: tests/test_device_check.py).

* ``conv_impl='matmul'`` (custom-VJP convs whose gradients are matmuls, the CPU default of
  the benchmarks) gives the forward values and the gradients of ``lax`` convs, bounded by a
  float64 run: per conv kind (1x1, strided, dilated, ASPP-like) and for a whole DLV2-R18.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ddb_jax import models
from ddb_jax.models.layers import lax_conv, matmul_grad_conv, weight_grad_path

# --- conv_impl='matmul' --------------------------------------------------------------------

# (kernel, stride, dilation, cin, cout): 1x1, strided 1x1 (ResNet downsample), small 3x3
# (XLA's weight gradient), strided and dilated 3x3 ('input_taps'), ASPP-like: dilation
# larger than the map, fewer outputs than inputs ('output_taps').
CONV_KINDS = [(1, 1, 1, 6, 10), (1, 2, 1, 6, 10), (3, 1, 1, 6, 5), (3, 2, 1, 130, 132),
              (3, 1, 2, 132, 130), (3, 1, 12, 520, 40)]  # fmt: skip


def _conv_outputs(conv, x, w, g, stride, dilation):
    y, vjp = jax.vjp(lambda a, b: conv(a, b, stride, dilation), x, w)
    return (y, *vjp(g))


@pytest.mark.parametrize("kind", CONV_KINDS, ids=lambda k: "k{}s{}d{}_{}to{}".format(*k))
def test_matmul_conv_value_and_gradients_match_float64(kind):
    """Forward, input and weight gradients of matmul_grad_conv in float32 are as close to a
    float64 lax run as lax's own float32 result (odd sizes: torch's floor in strides)."""
    k, stride, dilation, cin, cout = kind
    rng = np.random.default_rng(sum(kind))
    x = rng.normal(size=(2, 9, 11, cin))
    w = rng.normal(size=(k, k, cin, cout)) / math.sqrt(k * k * cin)
    with jax.enable_x64(True):
        g = rng.normal(size=lax_conv(jnp.asarray(x), jnp.asarray(w), stride, dilation).shape)
        want = _conv_outputs(lax_conv, jnp.asarray(x), jnp.asarray(w), jnp.asarray(g),
                             stride, dilation)  # fmt: skip
        exact = _conv_outputs(matmul_grad_conv, jnp.asarray(x), jnp.asarray(w), jnp.asarray(g),
                              stride, dilation)  # fmt: skip
    args32 = [jnp.asarray(a, jnp.float32) for a in (x, w, g)]
    ours = jax.jit(functools.partial(_conv_outputs, matmul_grad_conv), static_argnums=(3, 4))(
        *args32, stride, dilation
    )
    lax32 = jax.jit(functools.partial(_conv_outputs, lax_conv), static_argnums=(3, 4))(
        *args32, stride, dilation
    )
    for what, a, e, b, ref in zip(("y", "dx", "dw"), ours, exact, lax32, want, strict=True):
        ref = np.asarray(ref)
        assert a.shape == ref.shape and a.dtype == jnp.float32, what
        # The same maths: float64 agrees to rounding.
        np.testing.assert_allclose(np.asarray(e), ref, rtol=1e-12, atol=1e-12, err_msg=what)
        scale = np.abs(ref).max()
        err, lax_err = np.abs(np.asarray(a) - ref).max(), np.abs(np.asarray(b) - ref).max()
        assert err <= max(4 * lax_err, 1e-6 * scale), (what, err, lax_err, scale)


def test_conv_kinds_cover_every_weight_gradient_path():
    paths = {weight_grad_path(k, s, cin, cout) for k, s, _, cin, cout in CONV_KINDS}
    assert paths == {"matmul", "lax", "input_taps", "output_taps"}


def test_matmul_conv_bfloat16_gradients_keep_dtypes():
    x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
    w = jnp.ones((3, 3, 4, 2), jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: matmul_grad_conv(a, b, 2, 1), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    assert y.shape == (1, 4, 4, 2) and dx.shape == x.shape and dw.shape == w.shape


def _r18_config(conv_impl: str, dtype: str = "float32"):
    cfg = default.get_model_config()
    cfg.backbone, cfg.conv_impl, cfg.dtype = "resnet18_v1c", conv_impl, dtype
    cfg.base_channels, cfg.head_channels, cfg.dropout_ratio = 8, 16, 0.0
    return cfg


def _randomized_r18_variables() -> dict:
    """torch_ref's randomised weights (no zero-initialised BN scale, so every conv of every
    residual branch gets a gradient), converted."""
    from ddb_jax.convert.common import convert_state_dict
    from ddb_jax.convert.resnet import torch_name
    from torch_ref.common import numpy_state_dict
    from torch_ref.resnet_dlv2 import Segmentor, randomize

    torch_model = randomize(Segmentor(18, dropout=0.0, base_channels=8, channels=16), seed=5)
    shapes = models.variable_shapes(models.build_model(_r18_config("lax")))
    return convert_state_dict(numpy_state_dict(torch_model), shapes, torch_name)


def _train_grads(cfg, variables, images):
    model = models.build_model(cfg)

    def loss(params):
        named_outputs, updates = model.apply(
            {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
        )
        logits = named_outputs["logits"]
        return jnp.sum(logits**2), updates["batch_stats"]

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


def test_matmul_model_gradients_match_float64():
    """A whole DLV2-R18 (strided, dilated, ASPP convs) in training mode: the gradients and
    BN statistics of conv_impl='matmul' are as close to float64 as those of 'lax'."""
    images = np.random.default_rng(0).normal(size=(2, 33, 47, 3))
    variables = _randomized_r18_variables()
    with jax.enable_x64(True):
        vars64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), variables)
        want = _train_grads(_r18_config("lax", "float64"), vars64, jnp.asarray(images))
        want = jax.tree_util.tree_map(np.asarray, want)
    images32 = jnp.asarray(images, jnp.float32)
    ours = _train_grads(_r18_config("matmul"), variables, images32)
    lax32 = _train_grads(_r18_config("lax"), variables, images32)
    leaves = jax.tree_util.tree_leaves_with_path(want)
    for (path, ref), a, b in zip(
        leaves, jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(lax32), strict=True
    ):
        scale = np.abs(ref).max()
        assert scale > 0, jax.tree_util.keystr(path)
        err, lax_err = np.abs(np.asarray(a) - ref).max(), np.abs(np.asarray(b) - ref).max()
        assert err <= max(4 * lax_err, 3e-5 * scale), (jax.tree_util.keystr(path), err, lax_err)
