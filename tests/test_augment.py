"""Strong augmentation vs a PyTorch transcription of kornia 0.5.8 and DDB's STDataset."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD
from ddb_jax.uda import augment
from torch_ref.augment import blur as torch_blur
from torch_ref.augment import color_jitter as torch_color_jitter
from torch_ref.augment import random_draw as fixed_params
from torch_ref.augment import rgb_to_hsv as torch_rgb_to_hsv
from torch_ref.augment import strong as torch_strong

H, W = 48, 40  # blur length 5 for 48 rows

# --- tests -----------------------------------------------------------------------------------


def random_rgb(seed, shape=(H, W)):
    """[0,1] image with grey pixels, saturated pixels and ties between channels."""
    rng = np.random.default_rng(seed)
    rgb = rng.uniform(0, 1, (*shape, 3)).astype(np.float32)
    rgb[0, :5] = rgb[0, :5, :1]  # grey (delta = 0)
    rgb[1, :5, 1] = rgb[1, :5, 0]  # max tie between R and G
    rgb[2, :5] = [1.0, 0.0, 0.5]
    return rgb


def to_jax(params):
    return {k: jnp.asarray(v) for k, v in params.items()}


def test_hsv_round_trip_matches_kornia():
    rgb = random_rgb(0)
    ours = np.asarray(augment.rgb_to_hsv(jnp.asarray(rgb)))
    ref = torch_rgb_to_hsv(torch.from_numpy(rgb.transpose(2, 0, 1))).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    back = np.asarray(augment.hsv_to_rgb(jnp.asarray(ours)))
    np.testing.assert_allclose(back, rgb, atol=2e-5)


def test_color_jitter_matches_kornia_for_fixed_draws():
    jitter = jax.jit(augment.color_jitter)
    for seed in range(6):
        rgb = random_rgb(seed)
        params = fixed_params(seed)
        ours = np.asarray(jitter(jnp.asarray(rgb), to_jax(params)))
        ref = torch_color_jitter(torch.from_numpy(rgb.transpose(2, 0, 1))[None], params)
        np.testing.assert_allclose(ours, ref[0].numpy().transpose(1, 2, 0), atol=5e-5)


def test_blur_matches_reference_kernel_and_padding():
    assert [augment.blur_kernel_size(h) for h in (16, 32, 48, 64, 512, 1024)] == [
        1, 3, 5, 7, 51, 103,
    ]  # fmt: skip
    image = np.random.default_rng(1).normal(size=(H, W, 3)).astype(np.float32)
    for sigma in (0.15, 0.7, 1.15):
        ours = np.asarray(augment.gaussian_blur(jnp.asarray(image), jnp.float32(sigma)))
        ref = torch_blur(torch.from_numpy(image.transpose(2, 0, 1)), sigma)
        np.testing.assert_allclose(ours, ref.numpy().transpose(1, 2, 0), atol=1e-5)
        # Horizontal only: a constant-per-row image is left unchanged.
        rows = np.repeat(image[:, :1], W, axis=1)
        np.testing.assert_allclose(augment.gaussian_blur(jnp.asarray(rows), sigma), rows, atol=1e-5)


def test_apply_strong_matches_reference_post_process():
    apply = jax.jit(augment.apply_strong)
    mean, std = np.asarray(IMAGE_MEAN), np.asarray(IMAGE_STD)
    for seed, (jit_on, blur_on) in enumerate([(True, True), (True, False), (False, True)] * 2):
        image = ((random_rgb(seed) * 255.0 - mean) / std).astype(np.float32)
        params = fixed_params(seed, jit_on, blur_on)
        ours = np.asarray(apply(jnp.asarray(image), to_jax(params)))
        np.testing.assert_allclose(ours, torch_strong(image, params), atol=2e-4)
    params = fixed_params(0, False, False)
    np.testing.assert_array_equal(apply(jnp.asarray(image), to_jax(params)), image)


def test_parameter_law():
    keys = jax.random.split(jax.random.key(0), 4000)
    p = jax.jit(jax.vmap(augment.draw_strong_params))(keys)
    p = {k: np.asarray(v) for k, v in p.items()}
    assert abs(p["jitter"].mean() - 0.8) < 0.025
    assert abs(p["blur"].mean() - 0.5) < 0.03
    for name, (lo, hi) in dict(
        brightness=(0.8, 1.2), contrast=(0.8, 1.2), saturation=(0.8, 1.2), hue=(-0.2, 0.2),
        sigma=(0.15, 1.15),
    ).items():  # fmt: skip
        assert p[name].min() >= lo and p[name].max() <= hi
        assert abs(p[name].mean() - (lo + hi) / 2) < 0.02 * (hi - lo) + 1e-3
    assert (np.sort(p["order"], axis=1) == np.arange(4)).all()
    assert len({tuple(o) for o in p["order"]}) == 24  # every permutation occurs
    assert abs(np.mean(p["order"][:, 0] == 3) - 0.25) < 0.03


def test_strong_augment_is_deterministic_per_key_and_vmapped():
    images = jnp.asarray(np.random.default_rng(3).normal(size=(4, H, W, 3)), jnp.float32)
    aug = jax.jit(augment.strong_augment)
    a = aug(jax.random.key(7), images)
    np.testing.assert_array_equal(a, aug(jax.random.key(7), images))
    assert not np.allclose(a, aug(jax.random.key(8), images))
    # Batched output = per-sample apply with the per-sample draws.
    keys = jax.random.split(jax.random.key(7), 4)
    apply, draw = jax.jit(augment.apply_strong), jax.jit(augment.draw_strong_params)
    for i in range(4):
        single = apply(images[i], draw(keys[i]))
        np.testing.assert_allclose(a[i], single, atol=1e-5)


# --- DAFormer's DACS (2-D blur, draws shared by the batch) ---------------------------------------


def test_blur_2d_matches_dacs_kernel():
    """DACS blurs with kornia's 2-D kernel, rows sized from H and columns from W (3 x 7 here),
    reflect padding; float64 on both sides, so only rounding separates them."""
    from torch_ref.daformer_ops import blur2d

    image = np.random.default_rng(2).normal(size=(32, 64, 3))
    with jax.enable_x64(True):
        blur = jax.jit(lambda x, s: augment.gaussian_blur(x, s, two_d=True))
        for sigma in (0.15, 0.7, 1.15):
            ours = np.asarray(blur(jnp.asarray(image), sigma))
            ref = blur2d(torch.from_numpy(image.transpose(2, 0, 1)), sigma).numpy()
            np.testing.assert_allclose(ours, ref.transpose(1, 2, 0), rtol=0, atol=1e-14)
        # Separable: on an image constant down each column only the 7 horizontal taps act.
        columns = np.repeat(image[:1], 32, axis=0)
        horizontal = augment._blur_axis(jnp.asarray(columns), 0.7, 7, axis=1)
        np.testing.assert_allclose(blur(jnp.asarray(columns), 0.7), horizontal, atol=1e-14)
        assert not np.allclose(blur(jnp.asarray(image), 0.7), augment.gaussian_blur(image, 0.7))


def test_dacs_strong_transform_matches_reference():
    """Jitter (kornia 0.5.8) then the 2-D blur on one mixed image, given draws, float64."""
    from torch_ref.daformer_ops import strong as dacs_strong

    apply = jax.jit(lambda x, p: augment.apply_strong(x, p, blur_2d=True))
    mean, std = np.asarray(IMAGE_MEAN), np.asarray(IMAGE_STD)
    with jax.enable_x64(True):
        for seed, (jit_on, blur_on) in enumerate([(True, True), (False, True), (True, False)]):
            image = (random_rgb(seed).astype(np.float64) * 255.0 - mean) / std
            params = fixed_params(seed, jit_on, blur_on)
            ours = np.asarray(apply(jnp.asarray(image), to_jax(params)))
            ref = dacs_strong(image, params)
            np.testing.assert_allclose(ours, ref, rtol=0, atol=2.0**-40 * np.abs(ref).max())


def test_shared_draws_keep_the_per_image_ones():
    """share_over_batch replaces only the shared fields, by one draw of the same law."""
    keys = jax.random.split(jax.random.key(3), 4)
    per_image = jax.vmap(augment.draw_strong_params)(keys)
    shared = augment.share_over_batch(per_image, jax.random.key(9), augment.DACS_SHARED)
    one = augment.draw_strong_params(jax.random.key(9))
    for name, value in shared.items():
        if name in augment.DACS_SHARED:
            np.testing.assert_array_equal(value, np.broadcast_to(one[name], value.shape))
        else:
            np.testing.assert_array_equal(value, per_image[name])
    draw = jax.jit(jax.vmap(lambda k: augment.draw_batch_params(k, 2, augment.DACS_SHARED)))
    coins = draw(jax.random.split(jax.random.key(4), 4000))
    assert (coins["jitter"][:, 0] == coins["jitter"][:, 1]).all()
    assert abs(float(coins["jitter"][:, 0].mean()) - 0.8) < 4 * np.sqrt(0.16 / 4000)
    assert abs(float(coins["blur"][:, 0].mean()) - 0.5) < 4 * np.sqrt(0.25 / 4000)
    assert not (coins["sigma"][:, 0] == coins["sigma"][:, 1]).all()  # DACS: sigma per image
