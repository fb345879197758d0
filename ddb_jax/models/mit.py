"""Mix Transformer (MiT-B0..B5), the SegFormer encoder, in Flax.

Submodule names follow the NVlabs/DAFormer PyTorch code with ``.`` before an
index written as ``_`` (``block3_17/attn/kv`` is ``block3.17.attn.kv``), so the
checkpoint map is a rename. Blocks work on NHWC maps throughout: the token
sequence of the reference is the flattened map, and keeping the 2-D shape lets
``nn.remat`` see only static Python values besides the array.

The two checkpoint layouts differ numerically only in LayerNorm eps (see
``LAYER_NORM_EPS``); the mmseg layout's fused in_proj is the same math as the
NVlabs q/kv split (converted in ``ddb_jax.convert.mit``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax.ops import upcast


@dataclasses.dataclass(frozen=True)
class MiTSpec:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


_WIDE = (64, 128, 320, 512)
MIT_SPECS = {
    "b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": MiTSpec(_WIDE, (2, 2, 2, 2)),
    "b2": MiTSpec(_WIDE, (3, 4, 6, 3)),
    "b3": MiTSpec(_WIDE, (3, 4, 18, 3)),
    "b4": MiTSpec(_WIDE, (3, 8, 27, 3)),
    "b5": MiTSpec(_WIDE, (3, 6, 40, 3)),
}
# (kernel, stride) of the overlapping patch embedding of each stage.
PATCH_EMBEDS = ((7, 4), (3, 2), (3, 2), (3, 2))

# LayerNorm eps per checkpoint layout: NVlabs builds blocks and stage norms with
# eps 1e-6 but patch_embed*.norm and attn.norm with torch's default 1e-5; mmseg
# uses 1e-6 everywhere. Keys: 'block' (norm1, norm2, norm{i}), 'patch', 'attn'.
LAYER_NORM_EPS = {
    "nvlabs": {"block": 1e-6, "patch": 1e-5, "attn": 1e-5},
    "mmseg": {"block": 1e-6, "patch": 1e-6, "attn": 1e-6},
}

Dtype = Any


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance as torch: MiT activations have large-mean channels.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class OverlapPatchEmbed(nn.Module):
    """Strided conv (padding kernel//2) then LayerNorm: the stage's downsampling."""

    embed_dim: int
    kernel: int
    stride: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.kernel // 2
        x = nn.Conv(
            self.embed_dim,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            dtype=self.dtype,
            name="proj",
        )(x)
        return layer_norm(self.eps, self.dtype, "norm")(x)


class Attention(nn.Module):
    """Efficient self-attention: keys/values from a map shrunk by ``sr_ratio``."""

    num_heads: int
    sr_ratio: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, dim = x.shape
        head_dim = dim // self.num_heads
        q = nn.Dense(dim, dtype=self.dtype, name="q")(x)
        q = q.reshape(batch, height * width, self.num_heads, head_dim)
        source = x
        if self.sr_ratio > 1:
            r = self.sr_ratio
            source = nn.Conv(
                dim, (r, r), strides=(r, r), padding="VALID", dtype=self.dtype, name="sr"
            )(x)
            source = layer_norm(self.eps, self.dtype, "norm")(source)
        kv = nn.Dense(2 * dim, dtype=self.dtype, name="kv")(source)
        kv = kv.reshape(batch, -1, 2, self.num_heads, head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * (head_dim**-0.5)
        weights = jax.nn.softmax(upcast(logits), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhnm,bmhd->bnhd", weights, v).reshape(batch, height, width, dim)
        return nn.Dense(dim, dtype=self.dtype, name="proj")(out)


class DWConv(nn.Module):
    """3x3 depthwise conv (the Mix-FFN's positional information); NVlabs nests it twice."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        return nn.Conv(
            dim,
            (3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=dim,
            dtype=self.dtype,
            name="dwconv",
        )(x)


class Mlp(nn.Module):
    """Mix-FFN: fc1, depthwise 3x3, exact GELU, fc2."""

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
        x = DWConv(self.dtype, name="dwconv")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(dim, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches."""

    num_heads: int
    sr_ratio: int
    mlp_ratio: int
    drop_path: float
    block_eps: float
    attn_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # Dropping whole samples' branches = dropout broadcast over every non-batch axis.
        drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)
        y = layer_norm(self.block_eps, self.dtype, "norm1")(x)
        y = Attention(self.num_heads, self.sr_ratio, self.attn_eps, self.dtype, name="attn")(y)
        x = x + drop_path(y)
        y = layer_norm(self.block_eps, self.dtype, "norm2")(x)
        y = Mlp(x.shape[-1] * self.mlp_ratio, self.dtype, name="mlp")(y)
        return x + drop_path(y)


def drop_path_rates(rate: float, depths: tuple[int, ...]) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over all blocks (NVlabs rule)."""
    return [float(r) for r in np.linspace(0.0, rate, sum(depths))]


class MixVisionTransformer(nn.Module):
    """MiT encoder: NHWC image -> four NHWC maps at strides 4, 8, 16, 32."""

    variant: str = "b0"
    layout: str = "nvlabs"
    drop_path_rate: float = 0.1
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        if self.variant not in MIT_SPECS:
            raise ValueError(f"MiT variant={self.variant!r}; known: {sorted(MIT_SPECS)}")
        if self.layout not in LAYER_NORM_EPS:
            raise ValueError(f"MiT layout={self.layout!r}; known: {sorted(LAYER_NORM_EPS)}")
        spec = MIT_SPECS[self.variant]
        eps = LAYER_NORM_EPS[self.layout]
        rates = iter(drop_path_rates(self.drop_path_rate, spec.depths))
        # train (arg 2 counting self) is a Python bool: static under remat.
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        x = x.astype(self.dtype)
        outs = []
        for stage in range(4):
            kernel, stride = PATCH_EMBEDS[stage]
            x = OverlapPatchEmbed(
                spec.embed_dims[stage],
                kernel,
                stride,
                eps["patch"],
                self.dtype,
                name=f"patch_embed{stage + 1}",
            )(x)
            for index in range(spec.depths[stage]):
                x = block_cls(
                    num_heads=spec.num_heads[stage],
                    sr_ratio=spec.sr_ratios[stage],
                    mlp_ratio=spec.mlp_ratio,
                    drop_path=next(rates),
                    block_eps=eps["block"],
                    attn_eps=eps["attn"],
                    dtype=self.dtype,
                    name=f"block{stage + 1}_{index}",
                )(x, train)
            x = layer_norm(eps["block"], self.dtype, f"norm{stage + 1}")(x)
            outs.append(x)
        return outs
