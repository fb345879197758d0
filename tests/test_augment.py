"""Strong augmentation vs a PyTorch transcription of kornia 0.5.8 and DDB's STDataset."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from ddb_jax import augment
from ddb_jax.ops import IMAGE_MEAN, IMAGE_STD

H, W = 48, 40  # blur length 5 for 48 rows

# --- PyTorch reference (kornia 0.5.8 semantics, written from its source) --------------------


def torch_rgb_to_hsv(image, eps=1e-6):
    maxc, _ = image.max(-3)
    maxc_mask = image == maxc.unsqueeze(-3)
    _, max_indices = ((maxc_mask.cumsum(-3) == 1) & maxc_mask).max(-3)
    minc = image.min(-3)[0]
    deltac = maxc - minc
    s = deltac / (maxc + eps)
    deltac = torch.where(deltac == 0, torch.ones_like(deltac), deltac)
    maxc_tmp = maxc.unsqueeze(-3) - image
    rc, gc, bc = maxc_tmp[..., 0, :, :], maxc_tmp[..., 1, :, :], maxc_tmp[..., 2, :, :]
    h = torch.stack([bc - gc, 2.0 * deltac + rc - bc, 4.0 * deltac + gc - rc], dim=-3)
    h = torch.gather(h, dim=-3, index=max_indices[..., None, :, :]).squeeze(-3)
    h = ((h / deltac) / 6.0) % 1.0
    return torch.stack([2 * math.pi * h, s, maxc], dim=-3)


def torch_hsv_to_rgb(image):
    h = image[..., 0, :, :] / (2 * math.pi)
    s, v = image[..., 1, :, :], image[..., 2, :, :]
    hi = torch.floor(h * 6) % 6
    f = ((h * 6) % 6) - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.long()
    indices = torch.stack([hi, hi + 6, hi + 12], dim=-3)
    out = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), dim=-3)
    return torch.gather(out, -3, indices)


def torch_color_jitter(img, p):
    """kornia 0.5.8 ColorJitter.apply_transform on a (1, 3, H, W) tensor."""

    def saturation(x):
        hsv = torch_rgb_to_hsv(x)
        h, s, v = torch.chunk(hsv, 3, dim=-3)
        return torch_hsv_to_rgb(torch.cat([h, torch.clamp(s * p["saturation"], 0, 1), v], -3))

    def hue(x):
        hsv = torch_rgb_to_hsv(x)
        h, s, v = torch.chunk(hsv, 3, dim=-3)
        h = torch.fmod(h + p["hue"] * 2 * math.pi, 2 * math.pi)
        return torch_hsv_to_rgb(torch.cat([h, s, v], -3))

    ops = [
        lambda x: torch.clamp(x + (p["brightness"] - 1), 0, 1),
        lambda x: torch.clamp(x * p["contrast"], 0, 1),
        saturation,
        hue,
    ]
    for idx in p["order"]:
        img = ops[idx](img)
    return img


def torch_blur(img, sigma):
    """STDataset.gaussian_blur: GaussianBlur2d with the (quirky) kernel sizes, on (3, H, W)."""
    data = img.unsqueeze(0)
    sizes = [
        int(np.floor(np.ceil(0.1 * data.shape[d]) - 0.5 + np.ceil(0.1 * data.shape[d]) % 2))
        for d in (1, 2)
    ]

    def gauss(size):
        x = torch.arange(size, dtype=torch.float32) - size // 2
        g = torch.exp(-(x**2) / (2 * sigma**2))
        return g / g.sum()

    kernel = torch.matmul(gauss(sizes[0]).unsqueeze(-1), gauss(sizes[1]).unsqueeze(-1).t())
    kh, kw = kernel.shape
    padded = F.pad(data, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    weight = kernel.expand(3, 1, kh, kw)
    return F.conv2d(padded, weight, groups=3)[0]


def torch_strong(img_hwc, p):
    """STDataset.post_process on one normalised image (given coin flips and factors)."""
    img = torch.from_numpy(np.ascontiguousarray(img_hwc.transpose(2, 0, 1)))
    mean = torch.as_tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.as_tensor(IMAGE_STD).view(3, 1, 1)
    if p["jitter"]:
        img = img * std + mean
        img = img / 255.0
        img = torch_color_jitter(img.unsqueeze(0), p).squeeze(0)
        img = (img * 255.0 - mean) / std
    if p["blur"]:
        img = torch_blur(img.float(), float(p["sigma"]))
    return img.numpy().transpose(1, 2, 0)


# --- tests -----------------------------------------------------------------------------------


def random_rgb(seed, shape=(H, W)):
    """[0,1] image with grey pixels, saturated pixels and ties between channels."""
    rng = np.random.default_rng(seed)
    rgb = rng.uniform(0, 1, (*shape, 3)).astype(np.float32)
    rgb[0, :5] = rgb[0, :5, :1]  # grey (delta = 0)
    rgb[1, :5, 1] = rgb[1, :5, 0]  # max tie between R and G
    rgb[2, :5] = [1.0, 0.0, 0.5]
    return rgb


def fixed_params(seed, jitter=True, blur=True):
    rng = np.random.default_rng(seed)
    return dict(
        jitter=jitter,
        brightness=np.float32(rng.uniform(0.8, 1.2)),
        contrast=np.float32(rng.uniform(0.8, 1.2)),
        saturation=np.float32(rng.uniform(0.8, 1.2)),
        hue=np.float32(rng.uniform(-0.2, 0.2)),
        order=rng.permutation(4),
        blur=blur,
        sigma=np.float32(rng.uniform(0.15, 1.15)),
    )


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
