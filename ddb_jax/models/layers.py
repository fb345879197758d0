"""The layers every model here is built from, with PyTorch's semantics.

Convolutions: bias-free, with torch's padding ``dilation*(kernel//2)``, as XLA's own
convolution (``lax``), as shifted slices + one matmul (``im2col``) or with matmul gradients
(``matmul``, the CPU path); :func:`make_conv` picks one (``config.model.conv_impl``).
BatchNorm lives in :mod:`ddb_jax.models.batch_norm`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# mmseg's kaiming init (fan_out, relu) for random initialisation.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


CONV_IMPLS = ("lax", "im2col", "matmul")


def lax_conv(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    """NHWC x HWIO -> NHWC, torch padding ``dilation*(kernel//2)``: what ``nn.Conv`` computes."""
    pad = dilation * (kernel.shape[0] // 2)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _taps(a: jax.Array, k: int, stride: int, dilation: int, out_hw, flip: bool = False):
    """The k*k shifted (strided) windows of ``a`` padded by ``dilation*(k//2)``, in HWIO tap
    order (reversed with ``flip``), each of spatial size ``out_hw``."""
    pad = dilation * (k // 2)
    a = jnp.pad(a, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h, out_w = out_hw
    windows = []
    for i in range(k):
        for j in range(k):
            ti, tj = (k - 1 - i, k - 1 - j) if flip else (i, j)
            top, left = ti * dilation, tj * dilation
            windows.append(
                a[
                    :,
                    top : top + (out_h - 1) * stride + 1 : stride,
                    left : left + (out_w - 1) * stride + 1 : stride,
                ]
            )
    return windows


def _contract_pixels(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum over (n, h, w) of a[n,h,w,:]^T b[n,h,w,:]: (Ca, Cb), one matmul over the pixels."""
    a2 = a.reshape(-1, a.shape[-1])
    b2 = b.reshape(-1, b.shape[-1])
    return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())))


# Weight gradients of k x k convs with at most this many input x output channels stay
# XLA's own (as fast as the matmuls there, and no copies of the input).
SMALL_CONV_CHANNELS = 128 * 128


def weight_grad_path(kernel: int, stride: int, cin: int, cout: int) -> str:
    """How :func:`matmul_grad_conv` computes a conv's weight gradient: 'matmul' (1x1),
    'lax' (small k x k), 'output_taps' (stride 1, fewer output than input channels: the
    DeepLabV2 ASPP) or 'input_taps' (other k x k)."""
    if kernel == 1:
        return "matmul"
    if cin * cout <= SMALL_CONV_CHANNELS:
        return "lax"
    if stride == 1 and cout < cin:
        return "output_taps"
    return "input_taps"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul_grad_conv(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    """``lax_conv`` with its gradients as matmuls (``conv_impl='matmul'``, the CPU path).

    XLA:CPU runs a convolution's weight gradient as a convolution whose window is the whole
    feature map: 5-20x slower than a matmul of the same FLOPs for 1x1 convs, 2-4x for the
    dilated 3x3 convs at 256-2048 channels (benchmarks/conv_grads.py, benchmarks/RESULTS.md).
    Here:

    * forward: 1x1 convs are one matmul (of the strided input), larger ones ``lax_conv``;
    * input gradient: 1x1 a matmul (scattered back to the stride), larger ones XLA's own
      transposed convolution (as fast as the forward on CPU);
    * weight gradient (:func:`weight_grad_path`): 1x1 one matmul over the pixels; k x k,
      one matmul over the pixels per tap, of the shifted input by the output gradient
      ('input_taps'), or, for stride-1 convs with fewer output than input channels, of the
      input by all shifted output gradients at once ('output_taps': the copies are of the
      smaller tensor); small k x k convs keep XLA's own. No im2col columns are kept: the
      forward saves the input, as ``lax`` does.

    Same values as ``lax_conv`` up to float summation order (tests/test_benchmarks.py
    bounds both against float64).
    """
    return _matmul_grad_forward(x, kernel, stride, dilation)


def _matmul_grad_forward(x, kernel, stride, dilation):
    if kernel.shape[0] == 1:
        strided = x[:, ::stride, ::stride] if stride > 1 else x
        return jax.lax.dot_general(strided, kernel[0, 0], (((3,), (0,)), ((), ())))
    return lax_conv(x, kernel, stride, dilation)


def _matmul_grad_fwd(x, kernel, stride, dilation):
    return _matmul_grad_forward(x, kernel, stride, dilation), (x, kernel)


def _matmul_grad_bwd(stride, dilation, residuals, g):
    x, kernel = residuals
    k, _, cin, cout = kernel.shape
    path = weight_grad_path(k, stride, cin, cout)
    if k == 1:
        strided = x[:, ::stride, ::stride] if stride > 1 else x
        dx = jax.lax.dot_general(g, kernel[0, 0], (((3,), (1,)), ((), ())))
        if stride > 1:
            dx = jnp.zeros(x.shape, dx.dtype).at[:, ::stride, ::stride].set(dx)
        dw = _contract_pixels(strided, g).reshape(kernel.shape)
        return dx.astype(x.dtype), dw.astype(kernel.dtype)
    conv = lambda x_, w_: lax_conv(x_, w_, stride, dilation)  # noqa: E731
    if path == "lax":
        _, transpose = jax.vjp(conv, x, kernel)
        dx, dw = transpose(g)
        return dx, dw
    _, transpose = jax.vjp(lambda x_: conv(x_, kernel), x)
    (dx,) = transpose(g)
    if path == "output_taps":
        # dW[i, j] = sum_p x[p]^T g[p - offset(i, j)]: the shifted g (taps reversed), all
        # in one matmul.
        shifted = jnp.concatenate(_taps(g, k, 1, dilation, x.shape[1:3], flip=True), axis=-1)
        dw = _contract_pixels(x, shifted).reshape(cin, k, k, cout).transpose(1, 2, 0, 3)
    else:
        taps = _taps(x, k, stride, dilation, g.shape[1:3])
        dw = jnp.stack([_contract_pixels(tap, g) for tap in taps]).reshape(kernel.shape)
    return dx, dw.astype(kernel.dtype)


matmul_grad_conv.defvjp(_matmul_grad_fwd, _matmul_grad_bwd)


class MatmulGradConv(nn.Module):
    """A bias-free 2-D conv through :func:`matmul_grad_conv`; same parameter ('kernel', HWIO)
    and result as ``nn.Conv``. The CPU path: keep ``lax`` on GPU/TPU."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = conv_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        shape = (k, k, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        return matmul_grad_conv(
            x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.dilation
        )


class Im2colConv(nn.Module):
    """A bias-free 2-D conv as shifted slices concatenated + one matmul.

    Same parameter ('kernel', HWIO) and result as ``nn.Conv``. Its gradients are XLA's
    transposes of the slices and the matmul; the forward keeps the k*k-times larger
    columns for the backward pass. ``matmul`` is faster on CPU (benchmarks/RESULTS.md);
    keep ``lax`` on GPU/TPU.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = conv_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, d = self.kernel_size, self.stride, self.dilation
        shape = (k, k, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        pad = d * (k // 2)
        out_hw = tuple((n + 2 * pad - d * (k - 1) - 1) // s + 1 for n in x.shape[1:3])
        patches = _taps(x.astype(self.dtype), k, s, d, out_hw)
        columns = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
        weights = kernel.astype(self.dtype).reshape(-1, self.features)
        return jnp.dot(columns, weights)


def make_conv(
    features: int,
    kernel: int,
    stride: int,
    dilation: int,
    dtype,
    name: str,
    impl: str = "lax",
    kernel_init: Callable = conv_init,
) -> nn.Module:
    """A bias-free conv with torch padding ``dilation*(kernel//2)`` on each side; mmseg's
    kaiming init unless the module's reference init differs (``kernel_init``)."""
    if impl == "im2col":
        return Im2colConv(features, kernel, stride, dilation, dtype, kernel_init, name=name)
    if impl == "matmul":
        return MatmulGradConv(features, kernel, stride, dilation, dtype, kernel_init, name=name)
    if impl != "lax":
        raise ValueError(f"conv_impl={impl!r}; known: {list(CONV_IMPLS)}")
    pad = dilation * (kernel // 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=False,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )
