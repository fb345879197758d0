"""The shared resize ops against torch.nn.functional.interpolate (the reference's resize)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddb_jax import ops


@pytest.mark.parametrize(
    ("src", "dst"), [((9, 13), (65, 97)), ((65, 97), (17, 23)), ((8, 8), (8, 8))]
)
def test_resize_bilinear_matches_torch_align_corners_false(src, dst):
    x = np.random.default_rng(0).normal(size=(2, *src, 5)).astype(np.float32)
    ours = np.asarray(ops.resize_bilinear(x, dst))
    ref = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="bilinear", align_corners=False
    ).permute(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_resize_nearest_matches_torch():
    labels = np.random.default_rng(1).integers(0, 19, size=(1, 13, 21)).astype(np.int32)
    ours = np.asarray(ops.resize_nearest(labels, (40, 33)))
    ref = F.interpolate(torch.from_numpy(labels[:, None]).float(), size=(40, 33), mode="nearest")
    np.testing.assert_array_equal(ours, ref[:, 0].numpy().astype(np.int32))


def test_normalize_roundtrip_and_values():
    image = np.array([[[[123.675, 116.28, 103.53], [0.0, 255.0, 0.0]]]], np.float32)
    normalised = np.asarray(ops.normalize_image(image))
    np.testing.assert_allclose(normalised[0, 0, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(normalised[0, 0, 1, 1], (255.0 - 116.28) / 57.12, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ops.denormalize_image(normalised)), image, atol=1e-4)
