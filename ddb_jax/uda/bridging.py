"""Domain bridging (docs/method.md §1.3): cut-mix, class-mix and the all-zero mask, and the
bridged (mixed, strongly augmented) image, label and pixel weight.

A mask is a boolean (H, W) array per sample, True where the bridged image takes the
*source* pixel. Everything is drawn from a JAX key with fixed shapes so it runs inside the
jitted train step; the reference draws the same quantities with numpy on the host
(``STDataset.get_cut_mask`` / ``get_class_mask``).

DAFormer's DACS differs in three draws, each a switch of ``config.st`` (off in DDB):
``classes_from_batch`` (class-mix chooses among the values of the whole batch's labels,
``get_class_masks``' ``torch.unique(labels)``), ``coins_per_batch`` (one jitter coin and
one blur coin for the batch) and ``blur_2d`` (the 2-D blur kernel).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from ddb_jax.labels import IGNORE_LABEL
from ddb_jax.uda import augment

MASK_MODES = ("cut", "class", "zero")


def cut_box(uniforms: jax.Array, shape: tuple[int, int], area_ratio: float = 0.4) -> jax.Array:
    """Box (y0, x0, y1, x1) of the reference's cut-mix from three U(0, 1) draws.

    ``uniforms[0]`` sets the aspect: ``y_prop = area_ratio ** u`` so ``x_prop = area_ratio /
    y_prop`` keeps the area at ``area_ratio``; sizes are rounded (half to even, as
    ``np.round``), and ``uniforms[1:]`` place the top-left corner at ``round((H, W) - size) *
    u``, so the box always lies inside the image.
    """
    h, w = shape
    hw = jnp.asarray([h, w], jnp.float32)
    y_prop = jnp.exp(uniforms[0] * jnp.log(jnp.float32(area_ratio)))
    props = jnp.stack([y_prop, area_ratio / y_prop])
    sizes = jnp.round(props * hw)
    starts = jnp.round((hw - sizes) * uniforms[1:3])
    return jnp.concatenate([starts, starts + sizes]).astype(jnp.int32)


def box_mask(box: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Boolean (H, W) mask that is True inside ``box`` = (y0, x0, y1, x1), end exclusive."""
    rows = jnp.arange(shape[0])[:, None]
    cols = jnp.arange(shape[1])[None, :]
    return (rows >= box[0]) & (rows < box[2]) & (cols >= box[1]) & (cols < box[3])


def cut_mask(key: jax.Array, shape: tuple[int, int], area_ratio: float = 0.4) -> jax.Array:
    """One cut-mix mask (H, W): a box of area ~``area_ratio`` of the image."""
    return box_mask(cut_box(jax.random.uniform(key, (3,), jnp.float32), shape, area_ratio), shape)


def class_slots(labels: jax.Array, num_classes: int) -> jax.Array:
    """Label -> slot in a presence vector of size num_classes + 1 (255 takes the last slot)."""
    return jnp.where(labels == IGNORE_LABEL, num_classes, labels).astype(jnp.int32)


def class_presence(labels: jax.Array, num_classes: int) -> jax.Array:
    """Boolean (num_classes + 1,) vector: which label values occur in ``labels`` (H, W).

    Fixed-size replacement for ``torch.unique``; the ignore value 255 is a value like any
    other (the reference's class-mix may pick it).
    """
    slots = class_slots(labels, num_classes).reshape(-1)
    counts = jnp.zeros((num_classes + 1,), jnp.int32).at[slots].add(1)
    return counts > 0


def choose_half(key: jax.Array, present: jax.Array) -> jax.Array:
    """Uniformly chooses ceil(n/2) of the n True entries of ``present``, without replacement.

    Random scores on present slots, absent slots pushed last; the ceil(n/2) lowest-scoring
    present slots are a uniform random subset of that size.
    """
    scores = jnp.where(present, jax.random.uniform(key, present.shape, jnp.float32), 2.0)
    ranks = jnp.argsort(jnp.argsort(scores))
    num_chosen = (jnp.sum(present) + 1) // 2
    return present & (ranks < num_chosen)


def class_mask(
    key: jax.Array, labels: jax.Array, num_classes: int = 19, present: jax.Array | None = None
) -> jax.Array:
    """One class-mix mask (H, W): source pixels whose label value is among ceil(n/2) drawn
    from ``present`` (default: the values of ``labels`` itself)."""
    if present is None:
        present = class_presence(labels, num_classes)
    chosen = choose_half(key, present)
    return chosen[class_slots(labels, num_classes)]


def make_masks(
    key: jax.Array,
    source_labels: jax.Array,
    mode: str,
    area_ratio: float = 0.4,
    num_classes: int = 19,
    classes_from_batch: bool = False,
) -> jax.Array:
    """Boolean (N, H, W) bridging masks for a batch of source labels, one key per sample.

    ``mode``: 'cut' (coarse region path), 'class' (fine class path) or 'zero' (no source
    pixel: CKD's student sees the target image itself). ``classes_from_batch``: class-mix
    draws each sample's ceil(n/2) among the n values of the *batch's* labels (DACS), so a
    chosen class may be absent from the sample.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown bridging mask mode {mode!r}; use one of {MASK_MODES}")
    n, h, w = source_labels.shape
    if mode == "zero":
        return jnp.zeros((n, h, w), bool)
    keys = jax.random.split(key, n)
    if mode == "cut":
        return jax.vmap(lambda k: cut_mask(k, (h, w), area_ratio))(keys)
    if classes_from_batch:
        present = class_presence(source_labels, num_classes)
        return jax.vmap(lambda k, lab: class_mask(k, lab, num_classes, present))(
            keys, source_labels
        )
    return jax.vmap(lambda k, lab: class_mask(k, lab, num_classes))(keys, source_labels)


def mix(mask: jax.Array, source: jax.Array, target: jax.Array) -> jax.Array:
    """``mask ? source : target`` for images (N, H, W, C), labels or pixel weights (N, H, W).

    Same values as the reference's ``m * src + (1 - m) * tgt`` with a 0/1 mask; a select
    keeps the dtype (integer labels stay integers).
    """
    mask = jnp.asarray(mask, bool)
    while mask.ndim < source.ndim:
        mask = mask[..., None]
    return jnp.where(mask, source, target)


def needs_batch_key(st_cfg) -> bool:
    """Whether :func:`draw` takes a second key (draws shared by the batch)."""
    return bool(st_cfg.get("coins_per_batch", False))


def draw(
    key: jax.Array, source_labels: jax.Array, st_cfg, batch_key: jax.Array | None = None
) -> dict:
    """The random part of a bridging: masks ('masks', (N, H, W) bool) and each image's strong
    augmentation parameters ('aug', a dict of (N, ...) arrays), from ``config.st``.

    With ``st.coins_per_batch`` the jitter and blur coins are drawn once from ``batch_key``
    (a key of its own, so every other draw stays what it is without the switch).
    """
    mask_key, aug_key = jax.random.split(key)
    masks = make_masks(
        mask_key, source_labels, st_cfg.mask, area_ratio=st_cfg.cut_area_ratio,
        classes_from_batch=st_cfg.get("classes_from_batch", False),
    )  # fmt: skip
    aug = jax.vmap(
        lambda k: augment.draw_strong_params(
            k, st_cfg.color_jitter_p, st_cfg.color_jitter_strength, st_cfg.blur_p
        )
    )(jax.random.split(aug_key, source_labels.shape[0]))
    if needs_batch_key(st_cfg):
        if batch_key is None:
            raise ValueError("config.st.coins_per_batch needs draw(..., batch_key=...)")
        aug = augment.share_over_batch(
            aug, batch_key, augment.DACS_SHARED,
            st_cfg.color_jitter_p, st_cfg.color_jitter_strength, st_cfg.blur_p,
        )  # fmt: skip
    return {"masks": masks, "aug": aug}


def bridge_images(
    draws: dict, source: jax.Array, target: jax.Array, blur_2d: bool = False
) -> jax.Array:
    """The bridged images: source where the mask is set, target elsewhere, then each image
    strongly augmented with its own draw (``blur_2d``: DACS's 2-D blur kernel)."""
    mixed = mix(draws["masks"], source, target)
    return jax.vmap(lambda x, p: augment.apply_strong(x, p, blur_2d=blur_2d))(mixed, draws["aug"])


def bridged_input(
    keys: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], st_cfg
) -> tuple[dict, jax.Array]:
    """(draws, bridged images) of a step, from ``config.st``: :func:`draw` from the step keys
    'bridging' (and 'bridging_batch', with ``st.coins_per_batch``) on the batch's source
    labels, then :func:`bridge_images` of its 'source_image' and 'target_image'."""
    batch_key = keys["bridging_batch"] if needs_batch_key(st_cfg) else None
    draws = draw(keys["bridging"], batch["source_label"], st_cfg, batch_key)
    images = bridge_images(
        draws, batch["source_image"], batch["target_image"], blur_2d=st_cfg.get("blur_2d", False)
    )
    return draws, images
