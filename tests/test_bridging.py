"""Bridging masks: the reference's cut-mix formula, class-mix subset law, mixing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddb_jax.uda import bridging
from torch_ref.bridging import cut_mask as reference_cut_mask

H, W = 24, 40


def test_cut_mask_matches_reference_formula_and_area():
    keys = jax.random.split(jax.random.key(0), 200)
    uniforms = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (3,)))(keys), np.float64)
    masks = np.asarray(jax.jit(jax.vmap(lambda k: bridging.cut_mask(k, (H, W))))(keys))
    for u, mask in zip(uniforms, masks, strict=True):
        np.testing.assert_array_equal(mask, reference_cut_mask(u, (H, W)))
    # Area ~0.4 of the image for every box (rounding of each side costs at most a line).
    areas = masks.reshape(len(masks), -1).mean(1)
    assert np.all(np.abs(areas - 0.4) < (H + W) / (H * W) + 0.01)
    # Aspect: the box height fraction is 0.4**u with u ~ U(0, 1).
    heights = masks.any(2).sum(1) / H
    u_hat = np.log(heights) / np.log(0.4)
    assert abs(u_hat.mean() - 0.5) < 0.06
    assert abs(np.mean(u_hat < 0.25) - 0.25) < 0.08


def test_class_mask_picks_half_of_present_values_including_ignore():
    num_classes = 5
    rng = np.random.default_rng(0)
    values = np.array([0, 2, 3, 255])  # 4 present values, 255 among them
    labels = rng.choice(values, size=(300, 6, 7)).astype(np.int32)
    labels[:, 0, :4] = values  # every value present in every sample
    labels[150:] = np.where(labels[150:] == 3, 2, labels[150:])  # second half: 3 values
    keys = jax.random.split(jax.random.key(1), 300)
    masks = np.asarray(
        jax.jit(jax.vmap(lambda k, lab: bridging.class_mask(k, lab, num_classes)))(
            keys, jnp.asarray(labels)
        )
    )
    picks = np.zeros(len(values))
    for lab, mask in zip(labels, masks, strict=True):
        present = np.unique(lab)
        chosen = np.unique(lab[mask])
        assert len(chosen) == math.ceil(len(present) / 2)
        assert set(chosen) <= set(present)
        np.testing.assert_array_equal(mask, np.isin(lab, chosen))
        picks += np.isin(values, chosen)
    # Uniform choice: 0 and 255 are picked 2/4 of the time in the first half, 2/3 in the second.
    expected = 150 * 0.5 + 150 * (2 / 3)
    assert abs(picks[0] - expected) < 25 and abs(picks[3] - expected) < 25


def test_make_masks_modes_determinism_and_errors():
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 19, (3, H, W)), jnp.int32)
    key = jax.random.key(3)
    make = jax.jit(bridging.make_masks, static_argnums=2)
    for mode in ("cut", "class"):
        a = make(key, labels, mode)
        np.testing.assert_array_equal(a, make(key, labels, mode))
        assert not np.array_equal(a, make(jax.random.key(4), labels, mode))
        assert not np.array_equal(a[0], a[1])  # an independent draw per sample
    assert not np.asarray(bridging.make_masks(key, labels, "zero")).any()
    with pytest.raises(ValueError, match="'cutmix'"):
        bridging.make_masks(key, labels, "cutmix")


def test_make_masks_traces_once():
    traces = []

    @jax.jit
    def masks(key, labels):
        traces.append(1)
        return bridging.make_masks(key, labels, "class")

    labels = jnp.zeros((2, H, W), jnp.int32)
    masks(jax.random.key(0), labels)
    masks(jax.random.key(1), labels + 1)
    assert len(traces) == 1


def test_mix_matches_reference_arithmetic():
    rng = np.random.default_rng(5)
    mask = rng.integers(0, 2, (2, H, W))
    src_img, tgt_img = rng.normal(size=(2, 2, H, W, 3)).astype(np.float32)
    src_lbl, tgt_lbl = rng.integers(0, 19, (2, 2, H, W))
    weight = np.full((2, H, W), 0.37, np.float32)
    m = torch.from_numpy(mask)
    ref_img = m[..., None] * torch.from_numpy(src_img) + (1 - m[..., None]) * torch.from_numpy(
        tgt_img
    )
    ref_lbl = m * torch.from_numpy(src_lbl) + (1 - m) * torch.from_numpy(tgt_lbl)
    ref_w = m * 1.0 + (1 - m) * torch.from_numpy(weight)
    np.testing.assert_array_equal(bridging.mix(mask, src_img, tgt_img), ref_img.numpy())
    mixed_lbl = bridging.mix(mask, jnp.asarray(src_lbl), jnp.asarray(tgt_lbl))
    assert mixed_lbl.dtype == jnp.int32 or mixed_lbl.dtype == jnp.int64
    np.testing.assert_array_equal(mixed_lbl, ref_lbl.numpy())
    np.testing.assert_allclose(
        bridging.mix(mask, jnp.ones((2, H, W)), weight), ref_w.numpy(), rtol=0, atol=1e-7
    )


# --- DAFormer's DACS draws ---------------------------------------------------------------------


def test_class_mix_from_the_batch_labels_as_dacs():
    """get_class_masks: each image takes ceil(n/2) of the n values of the whole batch (255
    included), uniformly, so a chosen value may be absent from it; the mask is its pixels of
    the chosen values (torch_ref.daformer_ops.class_masks with the same choices)."""
    from torch_ref.daformer_ops import class_masks

    labels = np.zeros((2, H, W), np.int32)
    labels[0, :, : W // 2], labels[0, :, W // 2 :] = 0, 2
    labels[1, : H // 2], labels[1, H // 2 :] = 3, 255
    values = np.array([0, 2, 3, 255])  # torch.unique(labels): sorted, 255 last
    make = jax.jit(lambda k: bridging.make_masks(k, labels, "class", classes_from_batch=True))
    present = bridging.class_presence(jnp.asarray(labels), 19)
    picks, absent_only = np.zeros(4), 0
    for seed in range(300):
        key = jax.random.key(seed)
        masks = np.asarray(make(key))
        keys = jax.random.split(key, 2)  # make_masks: one key per image
        chosen = [np.asarray(bridging.choose_half(k, present)) for k in keys]
        choices = [np.flatnonzero(c[values.clip(max=19)]) for c in chosen]
        assert all(len(c) == 2 for c in choices)
        expected = class_masks(torch.from_numpy(labels), choices).numpy()
        np.testing.assert_array_equal(masks, expected)
        picks += sum(np.isin(np.arange(4), c) for c in choices)
        absent_only += sum(not m.any() for m in masks)
    assert np.all(np.abs(picks - 300) < 4 * np.sqrt(600 * 0.25))  # each value: 1/2 per image
    assert absent_only > 0  # e.g. image 0 drew {3, 255}: nothing of it is pasted


def test_coins_per_batch_move_no_other_draw():
    """One jitter and one blur coin per batch from the extra key; masks and every other
    augmentation draw are those of the same key without the switch."""
    from configs import default

    st = default.get_config().st
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 19, (3, H, W)), jnp.int32)
    plain = bridging.draw(jax.random.key(0), labels, st)
    st.coins_per_batch = True
    with pytest.raises(ValueError, match="batch_key"):
        bridging.draw(jax.random.key(0), labels, st)
    shared = bridging.draw(jax.random.key(0), labels, st, batch_key=jax.random.key(7))
    np.testing.assert_array_equal(shared["masks"], plain["masks"])
    for name, value in shared["aug"].items():
        if name in ("jitter", "blur"):
            assert len(set(np.asarray(value).tolist())) == 1
        else:
            np.testing.assert_array_equal(value, plain["aug"][name])
