"""Training images normalised on the device: they cross the host-to-device link as uint8.

With ``config.data.image_transfer='uint8'`` (the default) the training stream
(:func:`input_pipeline.train.make_train_dataset`) yields each image as its cropped, flipped
uint8 pixels padded with 0, beside '<image key>_size' (int32 [B, 2], the unpadded height and
width): a quarter of the bytes of the float32 image the host used to normalise; and each
label map as uint8 (train ids and the ignore index 255), a quarter of int32's bytes. Every
training step starts with :func:`network_input`, so the methods see the float images and
int32 labels they always saw.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD, IMAGE_TRANSFERS, SIZE_SUFFIX

__all__ = ["IMAGE_TRANSFERS", "LABEL_SUFFIX", "SIZE_SUFFIX", "network_input", "normalise"]

LABEL_SUFFIX = "_label"  # the label maps of a training batch ('source_label')


def normalise(images: jax.Array, sizes: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> ``(x - mean) / std`` float32, 0.0 outside each image's
    unpadded ``sizes`` [B, 2] (rows >= height or columns >= width): the host's
    ``transforms.normalize`` then ``pad_to``, in the same float32 operations and order.

    Bit-identical to the host's values on the CPU (IEEE float32 subtraction and division);
    on accelerators XLA's division may differ from the host's by rounding (a last bit).
    """
    mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
    values = (images.astype(jnp.float32) - mean) / _per_channel(IMAGE_STD, images.shape)
    _, h, w, _ = images.shape
    sizes = sizes.astype(jnp.int32)
    rows = jnp.arange(h, dtype=jnp.int32)[None, :, None] < sizes[:, 0, None, None]
    cols = jnp.arange(w, dtype=jnp.int32)[None, None, :] < sizes[:, 1, None, None]
    return jnp.where((rows & cols)[..., None], values, jnp.zeros((), jnp.float32))


def _per_channel(values: tuple[float, float, float], shape: tuple[int, ...]) -> jax.Array:
    """float32 ``values`` along the last axis of ``shape``, by channel.

    Not a broadcast: XLA turns a division by a broadcast into a product with its
    reciprocal, a last bit off for 214 of the 768 (value, channel) pairs; a division by
    this per-channel select stays a true division (in the same fused loop).
    """
    channel = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    out = jnp.full(shape, values[-1], jnp.float32)
    for c in reversed(range(len(values) - 1)):
        out = jnp.where(channel == c, jnp.float32(values[c]), out)
    return out


def network_input(batch: Mapping[str, jax.Array]) -> Mapping[str, jax.Array]:
    """The batch the methods step on: every uint8 image with a '<key>_size' companion
    normalised (:func:`normalise`), and the '_size' keys of the batch's images dropped
    (a float image beside one, e.g. one a test edited, stays as it is); every uint8
    '<...>_label' as int32; a batch without either (the 'float32' transfer, ProDA's and
    DAF's loaders, the benchmarks') as it is."""
    labels = [k for k, v in batch.items() if k.endswith(LABEL_SUFFIX) and v.dtype == jnp.uint8]
    if labels:
        batch = {**batch, **{k: batch[k].astype(jnp.int32) for k in labels}}
    sizes = {k + SIZE_SUFFIX: k for k in batch if k + SIZE_SUFFIX in batch}
    if not sizes:
        return batch
    out = {k: v for k, v in batch.items() if k not in sizes}
    for size, key in sizes.items():
        if jnp.dtype(batch[key].dtype) == jnp.uint8:
            out[key] = normalise(batch[key], batch[size])
    return out
