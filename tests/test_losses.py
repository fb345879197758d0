"""Losses and pseudo-labels vs PyTorch written with mmseg / DDB semantics."""

import jax
import numpy as np
import torch
import torch.nn.functional as F

from ddb_jax.uda import losses
from torch_ref.common import nchw

N, K, h, w, H, W = 2, 5, 4, 6, 16, 24


def up(logits_nhwc):
    return F.interpolate(nchw(logits_nhwc), size=(H, W), mode="bilinear", align_corners=False)


def make_inputs(seed, ignore_share=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(N, h, w, K)).astype(np.float32)
    labels = rng.integers(0, K, (N, H, W)).astype(np.int32)
    labels[rng.uniform(size=labels.shape) < ignore_share] = 255
    weight = rng.uniform(0, 1, (N, H, W)).astype(np.float32)
    return logits, labels, weight


def test_cross_entropy_matches_mmseg():
    ce = jax.jit(losses.cross_entropy)
    for seed in range(3):
        logits, labels, weight = make_inputs(seed)
        raw = F.cross_entropy(
            up(logits), torch.from_numpy(labels).long(), reduction="none", ignore_index=255
        )
        np.testing.assert_allclose(
            ce(logits, labels, weight), (raw * torch.from_numpy(weight)).mean(), rtol=1e-5
        )
        np.testing.assert_allclose(ce(logits, labels), raw.mean(), rtol=1e-5)
    # Ignored pixels stay in the denominator: ignoring half the pixels halves the loss.
    full = np.where(labels == 255, 0, labels)
    left_ignored, right_ignored = full.copy(), full.copy()
    left_ignored[:, :, : W // 2] = 255
    right_ignored[:, :, W // 2 :] = 255
    total = ce(logits, full)
    parts = ce(logits, left_ignored) + ce(logits, right_ignored)
    np.testing.assert_allclose(parts, total, rtol=1e-5)
    assert float(ce(logits, np.full_like(labels, 255))) == 0.0


def test_pixel_accuracy():
    logits, labels, _ = make_inputs(4)
    pred = up(logits).argmax(1).numpy()
    valid = labels != 255
    np.testing.assert_allclose(
        losses.pixel_accuracy(logits, labels), 100 * (pred == labels)[valid].mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        losses.pixel_accuracy(logits, labels, ignore_index=None),
        100 * (pred == labels).mean(),
        rtol=1e-5,
    )


def test_distillation_kl_matches_reference():
    rng = np.random.default_rng(5)
    student, teacher = rng.normal(scale=3.0, size=(2, N, H, W, K)).astype(np.float32)
    for temp in (1.0, 2.0):
        s = torch.log_softmax(nchw(student) / temp, dim=1)
        t = torch.softmax(nchw(teacher) / temp, dim=1)
        ref = F.kl_div(s, t, reduction="batchmean") / (H * W) * temp**2
        np.testing.assert_allclose(
            losses.distillation_kl(student, teacher, temp), ref.numpy(), rtol=1e-5
        )
    assert abs(float(losses.distillation_kl(teacher, teacher, 2.0))) < 1e-6


def test_pseudo_labels_match_reference():
    rng = np.random.default_rng(6)
    logits = rng.normal(scale=4.0, size=(N, h, w, K)).astype(np.float32)
    for top, bottom in ((0, 0), (3, 2)):
        labels, weight = jax.jit(losses.pseudo_labels, static_argnums=(1, 2, 3, 4))(
            logits, (H, W), 0.9, top, bottom
        )
        prob, ref_labels = torch.max(torch.softmax(up(logits), dim=1), dim=1)
        ref_w = torch.sum(prob.ge(0.9).long() == 1).item() / ref_labels.numel()
        ref_weight = ref_w * torch.ones(prob.shape)
        if top:
            ref_weight[:, :top, :] = 0
        if bottom:
            ref_weight[:, -bottom:, :] = 0
        assert 0.05 < ref_w < 0.95  # the threshold actually splits the pixels
        np.testing.assert_array_equal(labels, ref_labels.numpy())
        np.testing.assert_allclose(weight, ref_weight.numpy(), rtol=1e-6)


def test_cross_entropy_gradient_is_finite_under_vmap():
    logits, labels, weight = make_inputs(7)
    grads = jax.vmap(jax.grad(losses.cross_entropy), in_axes=(0, 0, 0))(
        logits[:, None], labels[:, None], weight[:, None]
    )
    assert np.isfinite(np.asarray(grads)).all() and np.abs(np.asarray(grads)).sum() > 0
