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
import ml_collections

from ddb_jax import augment, errors
from ddb_jax.methods import base, self_training


class MicConfigError(errors.UsageError, ValueError):
    """config.mic is not usable."""


def check_config(config: ml_collections.ConfigDict) -> None:
    cfg = config.mic
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise MicConfigError(f"config.mic.mask_ratio={cfg.mask_ratio}; use [0, 1)")
    try:
        augment.block_grid_shape(tuple(config.data.crop_size), cfg.block_size)
    except ValueError as err:
        raise MicConfigError(f"config.mic.block_size={cfg.block_size}: {err}") from err


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
    draws["grid"] = augment.block_keep_grid(mask_key, batch_shape, cfg.block_size, cfg.mask_ratio)
    return draws


def apply(images: jax.Array, draws: dict) -> tuple[jax.Array, jax.Array]:
    """(MIC's input, the kept pixels (N, H, W) bool) from the target batch and ``draws``:
    colour augmentation (when drawn), then the block mask."""
    if "aug" in draws:
        images = jax.vmap(lambda x, p: augment.apply_strong(x, p, blur_2d=True))(
            images, draws["aug"]
        )
    keep = augment.upsample_blocks(draws["grid"], images.shape[1:3])
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
    """``weight`` x the teacher-weighted CE of the student on the masked target."""
    cfg = method.options["mic"]
    images, draws = masked_target(ctx["keys"]["mic"], ctx["batch"]["target_image"], method.st, cfg)
    loss, _ = base.labelled_term(
        method, params, ctx, images, ctx["pseudo_labels"], ctx["keys"]["dropout_mic"],
        ctx["pseudo_pixel_weight"],
    )  # fmt: skip
    ctx["mic_image"], ctx["mic_draws"] = images, draws
    return cfg.weight * loss, ctx
