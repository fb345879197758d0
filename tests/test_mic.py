"""MIC (masked image consistency) as a term of DDB's self-training: the step against a
PyTorch transcription (float64), its block mask against torch's nearest resize, the law of
its draws, and its settings.

The step is DDB's (class-mix path, DDB's own draws and horizontal blur) with MIC on, on the
parity tests' tiny ResNet-18 DLV2 and 2 x 32 x 40 images: blocks of 12 pixels, so the 3 x 3
block grid is resized to the image by torch's float32 nearest rule, not by a whole factor;
the pseudo-label crop (2 top, 3 bottom rows) shows that MIC takes the host's cropped
weight. The torch side (torch_ref/daformer.py with torch_ref/mic.py) gets our step's draws.
Bounds are tests/test_self_training.py's (REL64 = 2^-33 of the values' scale through the
network, AUG64 = 2^-40 of the image scale through the augmentation, whose 2-D blur adds
one pass of 3 taps); the measured errors are ~1e-15.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import default
from ddb_jax import methods, models
from ddb_jax.methods import base, optim
from ddb_jax.methods import mic as mic_method
from ddb_jax.uda import augment, bridging
from tests.parity_support import (
    REL64,
    assert_argmax_agrees,
    assert_self_training_update,
    assert_within,
    initial_state,
    load_into_torch,
    make_batch,
    make_config,
    to_flax,
    torch_segmentor,
    torch_threads,
)
from torch_ref import mic as torch_mic
from torch_ref.common import nchw, numpy_state_dict
from torch_ref.daformer import as_numpy_draws, dacs_step
from torch_ref.losses import resize
from torch_ref.optim import make_optimizer, set_learning_rates

AUG64 = 2.0**-40
# The draws a step returns may be a few float32 ulps off the ones it used: XLA's CPU code,
# at the tests' LLVM optimisation level 0, computes a cheap draw inside each fusion that
# reads it, and rounds 'low + (high - low) * u' with an FMA in some and not in others (a
# hue drawn as 0.008443162 was used as 0.008443165). Bound: 2^2 ulps of a draw below 2
# (2^-21) times the image's sensitivity to a draw (<= 2^6 per unit: 255 / std < 5 per
# unit of brightness, contrast or saturation, 6 x that for the hue in turns, a Gaussian's
# derivative in sigma over sigma >= 0.15), relative to max(1, the image's scale).
DRAW32 = 2.0**-15
# MIC's batch coins (jitter, blur) of the two iterations with this key, jitter and blur at
# probability 0.5: (False, True) then (True, False), both states of both coins.
KEY_SEED = 5


def mic_config():
    config = make_config()
    config.st.color_jitter_p = config.st.blur_p = 0.5
    config.st.pseudo_weight_ignore_top, config.st.pseudo_weight_ignore_bottom = 2, 3
    config.mic.enabled = True
    config.mic.block_size = 12
    return config


def threshold_between_confidences(model, batch) -> float:
    """Halfway between two neighbouring teacher confidences near the median."""
    with torch.no_grad():
        logits = copy.deepcopy(model).train()(nchw(batch["target_image"]))[0]
        probs = torch.softmax(resize(logits, batch["source_label"].shape[1:]), 1)
    conf = np.sort(probs.max(1)[0].numpy().ravel())
    mid = len(conf) // 2
    return float(0.5 * (conf[mid] + conf[mid + 1]))


def test_step_with_mic_matches_pytorch():
    """Two iterations of DDB's self-training step with MIC, both sides in float64."""
    config = mic_config()
    student_t = torch_segmentor(seed=3)
    teacher_t = copy.deepcopy(student_t)
    config.st.pseudo_threshold = threshold_between_confidences(student_t, make_batch(10))
    opt = make_optimizer(student_t, config.optim)
    coins = []
    with jax.enable_x64(True), torch_threads(1):
        model = models.build_model(config.model)
        method = methods.create(config, model.apply)
        assert [name for name, _ in method.terms] == ["source", "mixed", "mic"]
        tx, _ = optim.make_optimizer(config.optim, config.num_steps)
        state = initial_state(method, tx, to_flax(student_t, model), jax.random.PRNGKey(KEY_SEED))
        step = base.make_train_step(method, tx)
        run = jax.jit(lambda s, b: (base.loss_and_grads(method, s, b), step(s, b)))
        before = None
        for it in range(2):
            batch = make_batch(10 + it)
            # MIC moves no draw of the host: its bridging is the plain draw of its key.
            host_key = base.StepKeys(state, method.key_names)["bridging"]
            host_draws = jax.jit(lambda k, y: bridging.draw(k, y, config.st))(
                host_key, batch["source_label"]
            )
            (_, out, grads), (state, metrics) = run(state, batch)
            jax.tree_util.tree_map(np.testing.assert_array_equal, out["draws"], host_draws)
            mic_draws = out["mic_draws"]
            aug = as_numpy_draws(mic_draws["aug"])
            for field in augment.MIC_SHARED:  # one kornia call on the batch
                assert all(np.array_equal(d[field], aug[0][field]) for d in aug)
            assert aug[0]["brightness"] != aug[1]["brightness"]
            coins.append((bool(aug[0]["jitter"]), bool(aug[0]["blur"])))
            grid = np.asarray(mic_draws["grid"])
            assert grid.shape == (2, 3, 3) and 0 < grid.mean() < 1
            ours_pseudo = np.asarray(out["pseudo_labels"])
            set_learning_rates(opt, it, config.optim, config.num_steps)
            ref_losses, ref_grads, ref_weight, extra = dacs_step(
                student_t, teacher_t, opt, it, batch, np.asarray(out["draws"]["masks"]),
                as_numpy_draws(out["draws"]["aug"]), config, blur_2d=False,
                mic_draws={"aug": aug, "grid": grid}, use_pseudo=ours_pseudo,
                inputs={"mixed": out["mixed_image"], "mic": out["mic_image"]},
            )  # fmt: skip
            ref_student, ref_teacher = numpy_state_dict(student_t), numpy_state_dict(teacher_t)

            # MIC's mask: torch's nearest resize of the same grid.
            keep = torch_mic.block_mask(grid, (32, 40))[:, 0].numpy().astype(bool)
            np.testing.assert_array_equal(np.asarray(mic_draws["keep"]), keep)
            # The host's labels and cropped weight.
            assert 0.0 < ref_weight < 1.0
            assert np.min(np.abs(extra["confidence"] - config.st.pseudo_threshold)) > REL64
            weight = np.asarray(out["pseudo_pixel_weight"])
            assert np.abs(weight - extra["pixel_weight"]).max() <= 2.0**-40
            assert not weight[:, [0, 1, -3, -1]].any() and weight[:, 2:-3].all()
            assert_argmax_agrees(ours_pseudo, extra["probs"], 1, REL64, f"pseudo-labels {it}")

            # The images from the returned draws, within their float32 rounding (DRAW32);
            # the losses below are compared on the same inputs (exact images from given
            # draws: test_mic_input_matches_pytorch).
            for what in ("mixed", "mic_image"):
                ours = np.asarray(out["mixed_image" if what == "mixed" else what])
                scale = (AUG64 + DRAW32) * max(1.0, np.abs(extra[what]).max())
                assert_within([(what, ours, extra[what])], scale, f"{what} {it}")
            assert not np.asarray(out["mic_image"])[~keep].any()
            for name in ("source", "mixed", "mic"):
                ours, ref_value = float(out[f"loss_{name}"]), ref_losses[name]
                assert abs(ours - ref_value) <= REL64 * abs(ref_value), (it, name, ours, ref_value)
            total = sum(ref_losses.values())
            assert abs(float(metrics["loss"]) - total) <= REL64 * total
            assert float(metrics["loss_mic"]) == float(out["loss_mic"])

            # Gradients, AdamW, BN statistics (after the source, mixed and MIC forwards), EMA.
            before = assert_self_training_update(
                config, it, state, grads, ref_grads, ref_student, ref_teacher, before
            )
            if it == 0:
                load_into_torch(student_t, state.params)
    assert coins == [(False, True), (True, False)], coins


# Sizes where float32 rounding of in / out decides an index (7 -> 10: 0.7f < 0.7) and MIC's.
RESIZES = [(3, 7), (7, 10), (3, 32), (3, 40), (8, 512), (16, 1024), (5, 13), (11, 64), (9, 9)]


@pytest.mark.parametrize("grid,size", RESIZES)
def test_block_upsampling_is_torch_nearest(grid, size):
    rows = mic_method.nearest_indices(grid, size)
    probe = torch.arange(grid, dtype=torch.float32).view(1, 1, grid, 1)
    expected = F.interpolate(probe, size=(size, 1), mode="nearest")[0, 0, :, 0].long().numpy()
    np.testing.assert_array_equal(rows, expected)


def test_block_mask_law():
    """Blocks kept with probability 1 - ratio, independently per block and image, constant
    over each block; the grid is MIC's round(H / block) x round(W / block)."""
    assert mic_method.block_grid_shape((512, 512), 64) == (8, 8)
    assert mic_method.block_grid_shape((1024, 2048), 64) == (16, 32)
    assert mic_method.block_grid_shape((96, 160), 64) == (2, 2)  # round(1.5) = 2, round(2.5) = 2
    with pytest.raises(ValueError, match="do not fit"):
        mic_method.block_grid_shape((16, 64), 64)
    keep = jax.jit(lambda k: mic_method.block_keep_mask(k, (400, 64, 64), 16, 0.7))(
        jax.random.key(0)
    )
    keep = np.asarray(keep)
    blocks = keep.reshape(400, 4, 16, 4, 16)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    kept = blocks[:, :, 0, :, 0].ravel()
    assert abs(kept.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / kept.size)  # 4 sigma
    assert abs(np.corrcoef(kept[:-1], kept[1:])[0, 1]) < 0.05


def test_mic_draws_share_coins_order_and_sigma():
    """MIC's colour augmentation: coins, op order and sigma drawn once per batch with the
    per-image law (jitter 0.8, blur 0.5); factors per image."""
    n = 1500
    draw = jax.jit(jax.vmap(lambda k: augment.draw_batch_params(k, 3, augment.MIC_SHARED)))
    draws = {k: np.asarray(v) for k, v in draw(jax.random.split(jax.random.key(1), n)).items()}
    for field in augment.MIC_SHARED:
        assert (draws[field] == draws[field][:, :1]).all(), field
    assert (np.diff(np.sort(draws["contrast"], 1), axis=1) > 0).all()  # per image
    jitter, blur = draws["jitter"][:, 0].mean(), draws["blur"][:, 0].mean()
    assert abs(jitter - 0.8) < 4 * np.sqrt(0.16 / n) and abs(blur - 0.5) < 4 * np.sqrt(0.25 / n)
    assert len({tuple(o) for o in draws["order"][:, 0]}) == 24


def test_mic_settings():
    config = default.get_config()
    assert not config.mic.enabled
    # MIC's experiments.py for 512x512 crops of half-resolution images (DAFormer's setting).
    assert (config.mic.block_size, config.mic.mask_ratio, config.mic.weight) == (32, 0.7, 1.0)
    assert config.mic.color_augment
    config.mic.enabled = True
    methods.check_config(config)  # 512 x 512 crops: a 16 x 16 grid
    config.data.crop_size = (8, 8)
    with pytest.raises(mic_method.MicConfigError, match="block_size=32"):
        methods.check_config(config)
    config.data.crop_size = (512, 512)
    config.mic.mask_ratio = 1.0
    with pytest.raises(mic_method.MicConfigError, match="mask_ratio"):
        methods.check_config(config)


def test_mic_input_matches_pytorch():
    """MIC's input from given draws (float64; coins on, both drawn per batch) against the
    torch transcription: the batch's jitter with one op order, the 2-D blur with one sigma,
    the nearest-resized block mask."""
    cfg = default.get_config().mic
    cfg.block_size = 12
    st = default.get_config().st
    st.color_jitter_p = st.blur_p = 1.0
    images = np.random.default_rng(4).normal(size=(3, 32, 40, 3))
    with jax.enable_x64(True):
        for seed in range(3):
            draws = jax.device_get(mic_method.draw(jax.random.key(seed), (3, 32, 40), st, cfg))
            ours, keep = jax.jit(mic_method.apply)(jnp.asarray(images), draws)
            expected = (
                torch_mic.masked_input(nchw(images), as_numpy_draws(draws["aug"]), draws["grid"])
                .numpy()
                .transpose(0, 2, 3, 1)
            )
            bound = AUG64 * np.abs(expected).max()
            assert_within([("mic input", np.asarray(ours), expected)], bound, "MIC input")
            assert not np.asarray(ours)[~np.asarray(keep)].any()


def test_masked_target_without_colour_augmentation_is_the_masked_image():
    cfg = default.get_config().mic
    cfg.color_augment = False
    cfg.block_size = 8
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 24, 3)), jnp.float32)
    masked, draws = mic_method.masked_target(jax.random.key(3), images, None, cfg)
    assert set(draws) == {"grid", "keep"}
    np.testing.assert_array_equal(masked, np.where(draws["keep"][..., None], images, 0.0))
