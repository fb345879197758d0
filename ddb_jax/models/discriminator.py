"""ADVENT's output-space discriminator (valeoai/ADVENT advent/model/discriminator.py).

``get_fc_discriminator``: five 4x4 convs, stride 2, padding 1, with bias, of ndf, 2ndf,
4ndf, 8ndf and 1 channels, LeakyReLU(0.2) between them. ADVENT applies one to the
weighted self-information map of the main prediction and one to the auxiliary's, and never
re-initialises them: PyTorch's Conv2d default init.

Names are AdaptSegNet's FCDiscriminator ones (``conv1``..``conv4``, ``classifier``);
ADVENT's own ``nn.Sequential`` keys (``0``, ``2``, ``4``, ``6``, ``8``) are mapped by
``ddb_jax.convert.advent.convert_discriminator``.

ProDA's warm-up discriminator (microsoft/ProDA models/discriminator.py, also named
``FCDiscriminator``, same widths and names) differs in three places, each a field here:
3x3 convs (``kernel``), a 1x1 stride-1 classifier (``classifier_kernel``) and ReLU after
conv1..conv3 (``hidden_slope=0``; LeakyReLU(0.2) after conv4 in both):
:func:`proda_discriminator`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddb_jax.models.deeplabv2 import TORCH_CONV_KERNEL_INIT, torch_conv_bias_init
from ddb_jax.ops import upcast

LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "classifier")
NEGATIVE_SLOPE = 0.2


class FCDiscriminator(nn.Module):
    """NHWC maps (N, H, W, C) -> float32 logits (N, h, w, 1), h = H/32 with torch's floors
    (ADVENT's; ProDA's: H/16, rounded up)."""

    ndf: int = 64
    dtype: jnp.dtype = jnp.float32
    kernel: int = 4  # conv1..conv4, stride 2, padding 1 (ProDA: 3)
    classifier_kernel: int = 4  # 4: stride 2, padding 1 as the others; 1: stride 1 (ProDA)
    hidden_slope: float = NEGATIVE_SLOPE  # LeakyReLU after conv1..conv3; 0: ReLU (ProDA)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        widths = (self.ndf, self.ndf * 2, self.ndf * 4, self.ndf * 8, 1)
        x = x.astype(self.dtype)
        for i, (name, features) in enumerate(zip(LAYER_NAMES, widths, strict=True)):
            slope = self.hidden_slope if 0 < i < len(widths) - 1 else NEGATIVE_SLOPE
            if i:
                x = nn.relu(x) if slope == 0 else nn.leaky_relu(x, slope)
            last = i == len(widths) - 1
            k = self.classifier_kernel if last else self.kernel
            stride, pad = (1, 0) if k == 1 else (2, 1)
            x = nn.Conv(
                features,
                (k, k),
                strides=(stride, stride),
                padding=((pad, pad), (pad, pad)),
                kernel_init=TORCH_CONV_KERNEL_INIT,
                bias_init=torch_conv_bias_init(k * k * x.shape[-1]),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )(x)
        return upcast(x)


def proda_discriminator(ndf: int = 64, dtype: jnp.dtype = jnp.float32) -> FCDiscriminator:
    """ProDA's warm-up discriminator: 3x3/2 convs, ReLU, then LeakyReLU(0.2) after conv4, a
    1x1 classifier; PyTorch's default initialisation (the reference never re-initialises
    it)."""
    return FCDiscriminator(ndf=ndf, dtype=dtype, kernel=3, classifier_kernel=1, hidden_slope=0.0)
