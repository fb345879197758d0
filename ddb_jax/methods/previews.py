"""Image summaries: label maps in the Cityscapes palette and images back to uint8 RGB.

Every function is jnp-only, so a stage's preview function can build its whole panel
grid inside one jitted call (nothing but a small uint8 array leaves the device) and
the train step itself stays untouched. Used by the self-training and CKD stages:

    panels = [denormalize(images), colorize(labels), ...]      # each (N, H, W, 3) uint8
    {"bridging": panel_rows(panels, max_samples=4)}             # for writer.write_images
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax.labels import CITYSCAPES_PALETTE
from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD

SEPARATOR = 255  # white gap between panels


def colorize(labels: jax.Array, palette: np.ndarray = CITYSCAPES_PALETTE) -> jax.Array:
    """(..., H, W) class ids -> (..., H, W, 3) uint8; ignore (255) and unknown ids black."""
    table = jnp.concatenate([jnp.asarray(palette, jnp.uint8), jnp.zeros((1, 3), jnp.uint8)])
    labels = jnp.asarray(labels).astype(jnp.int32)
    index = jnp.where((labels >= 0) & (labels < len(palette)), labels, len(palette))
    return table[index]


def denormalize(images: jax.Array) -> jax.Array:
    """Normalised (..., 3) images (ops.normalize_image space) -> uint8 RGB, rounded, clipped."""
    mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
    std = jnp.asarray(IMAGE_STD, jnp.float32)
    rgb = jnp.asarray(images, jnp.float32) * std + mean
    return jnp.clip(jnp.round(rgb), 0, 255).astype(jnp.uint8)


def downsample(panel: jax.Array, max_side: int) -> jax.Array:
    """Strided (nearest) subsampling of (N, H, W, C) until max(H, W) <= max_side.

    Nearest, so label colours stay exact; keeps 512x512 previews small on disk.
    """
    factor = max(1, -(-max(panel.shape[1:3]) // max_side))
    return panel[:, ::factor, ::factor]


def panel_rows(
    panels: Sequence[jax.Array], max_samples: int = 4, max_side: int = 256, gap: int = 2
) -> jax.Array:
    """One image per sample: its panels side by side, ``gap`` white columns between them.

    ``panels``: (N, H, W, 3) uint8 arrays of equal shape. Returns (min(N, max_samples), h,
    k*w + (k-1)*gap, 3) with (h, w) the panels' size after :func:`downsample`.
    """
    shapes = {tuple(p.shape) for p in panels}
    if len(shapes) != 1:
        raise ValueError(f"panel_rows: panels differ in shape: {sorted(shapes)}")
    small = [downsample(p[:max_samples], max_side) for p in panels]
    n, h, _, c = small[0].shape
    spacer = jnp.full((n, h, gap, c), SEPARATOR, jnp.uint8)
    row = [small[0]]
    for p in small[1:]:
        row += [spacer, p]
    return jnp.concatenate(row, axis=2)
