"""ADVENT's output-space discriminator (valeoai/ADVENT advent/model/discriminator.py).

``get_fc_discriminator``: five 4x4 convs, stride 2, padding 1, with bias, of ndf, 2ndf,
4ndf, 8ndf and 1 channels, LeakyReLU(0.2) between them. ADVENT applies one to the
weighted self-information map of the main prediction and one to the auxiliary's, and never
re-initialises them: PyTorch's Conv2d default init.

Names are AdaptSegNet's FCDiscriminator ones (``conv1``..``conv4``, ``classifier``);
ADVENT's own ``nn.Sequential`` keys (``0``, ``2``, ``4``, ``6``, ``8``) are mapped by
``ddb_jax.convert.advent.convert_discriminator``.
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
    """NHWC maps (N, H, W, C) -> float32 logits (N, h, w, 1), h = H/32 with torch's floors."""

    ndf: int = 64
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        widths = (self.ndf, self.ndf * 2, self.ndf * 4, self.ndf * 8, 1)
        x = x.astype(self.dtype)
        for i, (name, features) in enumerate(zip(LAYER_NAMES, widths, strict=True)):
            if i:
                x = nn.leaky_relu(x, NEGATIVE_SLOPE)
            x = nn.Conv(
                features,
                (4, 4),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),
                kernel_init=TORCH_CONV_KERNEL_INIT,
                bias_init=torch_conv_bias_init(16 * x.shape[-1]),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )(x)
        return upcast(x)
