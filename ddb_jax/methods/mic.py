"""MIC's masked image consistency, a self-training term (``config.mic``).

MIC (Hoyer et al., CVPR 2023; ``MaskingConsistencyModule`` with ``mask_mode=
'separatetrgaug'``) trains the student to predict the teacher's pseudo-labels of a target
image from which most of the context is hidden, so it must use what remains: per
iteration,

    x_masked = A(xt) * M,   loss = weight * CE(S(x_masked), yhat, w)

with the *host method's* EMA teacher's pseudo-labels ``yhat`` and quality weight ``w``
(``mask_alpha = mask_pseudo_threshold = 'same'``: no teacher of its own, the weight with
the pseudo-label crop applied). ``A`` is DACS's colour augmentation applied to the batch
in one kornia call: one jitter coin, one blur coin, one op order and one blur sigma for
the batch, jitter factors per image, a 2-D blur kernel. ``M`` is MIC's block mask: the
image cut into ``block_size`` blocks, each kept with probability ``1 - mask_ratio``
(nearest upsampling of the block grid); masked pixels become 0 in the normalised space.
The student runs in training mode (its BN statistics updated after the source and mixed
forwards, as the reference's third forward). Draws come from the step key 'mic', dropout
from 'dropout_mic': switching MIC on moves no other draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddb_jax import errors
from ddb_jax.methods import base, self_training
from ddb_jax.uda import augment


class MicConfigError(errors.UsageError, ValueError):
    """config.mic is not usable."""


def check_config(config: ml_collections.ConfigDict) -> None:
    cfg = config.mic
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise MicConfigError(f"config.mic.mask_ratio={cfg.mask_ratio}; use [0, 1)")
    try:
        block_grid_shape(tuple(config.data.crop_size), cfg.block_size)
    except ValueError as err:
        raise MicConfigError(f"config.mic.block_size={cfg.block_size}: {err}") from err


# --- MIC's block mask ---------------------------------------------------------------------


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output index of torch's ``interpolate(mode='nearest')``:
    ``min(floor(dst * scale), in - 1)`` with ``scale = in / out`` in float32, as its kernel
    rounds (static shapes, so computed on the host)."""
    if out_size == in_size:
        return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    return np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)


def block_grid_shape(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """MIC's grid of blocks: ``round(H / block)`` x ``round(W / block)`` (Python rounding)."""
    grid = tuple(round(n / block_size) for n in shape)
    if min(grid) < 1:
        raise ValueError(f"MIC blocks of {block_size} pixels do not fit a {shape} image")
    return grid  # type: ignore[return-value]


def upsample_blocks(keep: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """(N, gh, gw) block grid -> (N, H, W) by torch's nearest resize (MIC's ``resize``)."""
    rows = nearest_indices(keep.shape[1], shape[0])
    cols = nearest_indices(keep.shape[2], shape[1])
    return keep[:, rows][:, :, cols]


def block_keep_grid(
    key: jax.Array, batch_shape: tuple[int, int, int], block_size: int, mask_ratio: float
) -> jax.Array:
    """MIC's ``BlockMaskGenerator`` draw: per image, each block of the grid is kept (True)
    when its U(0, 1) draw exceeds ``mask_ratio``, i.e. with probability ``1 - mask_ratio``;
    (N, gh, gw) bool."""
    n, h, w = batch_shape
    grid = block_grid_shape((h, w), block_size)
    return jax.random.uniform(key, (n, *grid), jnp.float32) > mask_ratio


def block_keep_mask(
    key: jax.Array, batch_shape: tuple[int, int, int], block_size: int, mask_ratio: float
) -> jax.Array:
    """MIC's pixel mask (N, H, W) bool: :func:`block_keep_grid` upsampled to the image."""
    grid = block_keep_grid(key, batch_shape, block_size, mask_ratio)
    return upsample_blocks(grid, batch_shape[1:])


def draw(key: jax.Array, batch_shape: tuple[int, int, int], st, cfg) -> dict:
    """MIC's random part for a target batch (N, H, W): 'aug' (per image, the shared fields
    broadcast; only with ``cfg.color_augment``) and the kept blocks 'grid' (N, gh, gw)."""
    aug_key, mask_key = jax.random.split(key)
    draws = {}
    if cfg.color_augment:
        draws["aug"] = augment.draw_batch_params(
            aug_key, batch_shape[0], augment.MIC_SHARED,
            st.color_jitter_p, st.color_jitter_strength, st.blur_p,
        )  # fmt: skip
    draws["grid"] = block_keep_grid(mask_key, batch_shape, cfg.block_size, cfg.mask_ratio)
    return draws


def apply(images: jax.Array, draws: dict) -> tuple[jax.Array, jax.Array]:
    """(MIC's input, the kept pixels (N, H, W) bool) from the target batch and ``draws``:
    colour augmentation (when drawn), then the block mask."""
    if "aug" in draws:
        images = jax.vmap(lambda x, p: augment.apply_strong(x, p, blur_2d=True))(
            images, draws["aug"]
        )
    keep = upsample_blocks(draws["grid"], images.shape[1:3])
    return images * keep[..., None].astype(images.dtype), keep


def masked_target(
    key: jax.Array, images: jax.Array, st: ml_collections.ConfigDict, cfg
) -> tuple[jax.Array, dict]:
    """MIC's input from the target batch: colour-augmented (``cfg.color_augment``), then
    block-masked. Returns (images, draws with the kept pixels 'keep' (N, H, W) added)."""
    draws = draw(key, images.shape[:3], st, cfg)
    images, draws["keep"] = apply(images, draws)
    return images, draws


@self_training.register_term("mic", order=2, check=check_config)
def mic_term(method, params, ctx: base.Context):
    """``weight`` x the teacher-weighted CE of the student on the masked target (with HRDA,
    ``weight`` scales the fused term only, as MIC's ``mask_lambda``)."""
    cfg = method.options["mic"]
    images, draws = masked_target(ctx["keys"]["mic"], ctx["batch"]["target_image"], method.st, cfg)
    loss, _ = base.labelled_term(
        method, params, ctx, images, ctx["pseudo_labels"], ctx["keys"]["dropout_mic"],
        ctx["pseudo_pixel_weight"], fused_scale=cfg.weight,
    )  # fmt: skip
    ctx["mic_image"], ctx["mic_draws"] = images, draws
    return loss, ctx
