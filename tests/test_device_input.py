"""Training images cross to the device as uint8 (config.data.image_transfer): the batch
normalised there (ddb_jax.methods.device_input) is the host-normalised batch bit for bit on
the CPU, padding included; float32 batches and photometrically distorted source images stay
as they were; the compile-only check's abstract batch is the stream's."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf

from configs.default import get_config
from ddb_jax.methods import base, device_input, previews
from ddb_jax.runtime import aot
from input_pipeline import train, transforms
from tests.support import data_config

SIZE = device_input.SIZE_SUFFIX
# Crops taller than the toy images (128x256): every toy crop is padded below, the HR toy's
# (256x512) never.
CROP = (160, 200)


def _batches(cfg, transfer: str, n: int = 2, batch: int = 4) -> list[dict[str, np.ndarray]]:
    cfg = cfg.copy_and_resolve_references()
    cfg.image_transfer = transfer
    it = train.make_train_dataset(cfg, batch, seed=7).as_numpy_iterator()
    return [next(it) for _ in range(n)]


def _assert_bitwise_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(
            np.asarray(got[key]).view(np.uint8), value.view(np.uint8), err_msg=key
        )


def test_normalise_is_the_hosts_float32_bit_for_bit():
    """Every uint8 value of every channel, and the padding of a crop smaller than the batch's
    images: the host's Normalize then Pad, to the last bit (under jit, as in the step)."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = np.stack([values, values[::-1], values.T], -1)  # each channel sees all 256
    sizes = np.array([[16, 16], [9, 13]], np.int32)
    images = np.stack([image, image[::-1]])
    device = jax.jit(device_input.normalise)(images, sizes)
    for i, (h, w) in enumerate(sizes):
        normalised = transforms.normalize(tf.constant(images[i, :h, :w]))
        host, _ = transforms.pad_to(normalised, None, (16, 16))
        np.testing.assert_array_equal(
            np.asarray(device[i]).view(np.int32), host.numpy().view(np.int32)
        )


@pytest.mark.parametrize(
    "overrides",
    [
        # one stream over both targets (images of two sizes), rare class sampling's re-crops,
        # HRDA's margin mask
        dict(target=("toy_target", "toy_hr_target"), rare_class_sampling=True,
             rcs_min_pixels=20, target_pseudo_margins=(4, 4, 4, 4)),
        dict(target=("toy_target", "toy_hr_target"), per_target_streams=True),  # MTAF's
    ],
    ids=["union", "per_target"],
)  # fmt: skip
def test_uint8_stream_normalised_on_the_device_is_the_float32_stream(toy_root, overrides):
    cfg = data_config(toy_root, source=("toy_source",), crop_size=CROP, **overrides)
    sent = _batches(cfg, "uint8")
    floats = _batches(cfg, "float32")
    image_keys = ("source_image", *train.target_stream_keys(cfg))
    assert train.uint8_image_keys(cfg) == image_keys
    heights = set()
    for batch, want in zip(sent, floats, strict=True):
        for key in image_keys:
            assert batch[key].dtype == np.uint8 and batch[key].shape == (4, *CROP, 3)
            assert batch[key + SIZE].dtype == np.int32 and batch[key + SIZE].shape == (4, 2)
            heights |= set(batch[key + SIZE][:, 0].tolist())
            # Outside its size an image is padding: 0 as uint8, 0.0 once normalised.
            for image, (h, w) in zip(batch[key], batch[key + SIZE], strict=True):
                assert not image[h:].any() and not image[:, w:].any()
        assert "source_image" + SIZE not in want and want["source_image"].dtype == np.float32
        # The label crosses as uint8 (its ignore index 255 included) and is int32 on the device.
        assert batch["source_label"].dtype == np.uint8 and want["source_label"].dtype == np.int32
        _assert_bitwise_equal(jax.jit(device_input.network_input)(batch), want)
    assert heights == {128, 160}  # crops smaller than the crop size, and full ones

    config = get_config()
    config.data, config.batch_size = cfg, 4
    shapes = aot.batch_shapes(config)
    assert sorted(shapes) == sorted(sent[0])
    for key, value in sent[0].items():
        assert (shapes[key].shape, shapes[key].dtype) == (value.shape, value.dtype), key


def test_float32_batches_pass_through(toy_root):
    cfg = data_config(toy_root, source=("toy_source",), target=("toy_target",), crop_size=CROP,
                      image_transfer="float32")  # fmt: skip
    (batch,) = _batches(cfg, "float32", n=1)
    assert not [k for k in batch if k.endswith(SIZE)]
    assert batch["source_image"].dtype == batch["target_image"].dtype == np.float32
    assert device_input.network_input(batch) is batch
    config = get_config()
    config.data, config.batch_size = cfg, 4
    assert {k: v.dtype for k, v in aot.batch_shapes(config).items()} == {
        k: v.dtype for k, v in batch.items()
    }


def test_photometrically_distorted_source_images_stay_float32(toy_root):
    """The CKD stages' distorted pixels are not integers: their source images are normalised
    on the host, the target images still cross as uint8."""
    cfg = data_config(toy_root, source=("toy_source",), target=("toy_target",), crop_size=CROP,
                      photometric_distortion=True)  # fmt: skip
    (batch,) = _batches(cfg, "uint8", n=1)
    (want,) = _batches(cfg, "float32", n=1)
    assert train.uint8_image_keys(cfg) == ("target_image",)
    assert batch["source_image"].dtype == np.float32 and "source_image" + SIZE not in batch
    assert batch["target_image"].dtype == np.uint8 and "target_image" + SIZE in batch
    _assert_bitwise_equal(jax.jit(device_input.network_input)(batch), want)
    config = get_config()
    config.data, config.batch_size = cfg, 4
    shapes = aot.batch_shapes(config)
    assert shapes["source_image"].dtype == np.float32 and "source_image" + SIZE not in shapes
    assert shapes["target_image"].dtype == np.uint8


def test_the_step_gives_every_method_and_its_preview_the_float_batch(toy_root):
    """``base.train_step`` normalises first: a method's update and its preview see what the
    'float32' transfer gives."""

    class Recorder:
        preview_tag = "seen"

        def update(self, txs, state, batch, frozen):
            return state, {}, dict(batch)

        def preview(self, batch, outputs):
            return [previews.denormalize(batch["source_image"])]

    cfg = data_config(toy_root, source=("toy_source",), target=("toy_target",), crop_size=CROP)
    (batch,) = _batches(cfg, "uint8", n=1)
    (want,) = _batches(cfg, "float32", n=1)
    _, seen, panels = base.train_step(Recorder(), optax.sgd(0.1), 0, batch, with_preview=True)
    _assert_bitwise_equal(seen, want)
    expected = previews.panel_rows([previews.denormalize(want["source_image"])])
    np.testing.assert_array_equal(panels["seen"], expected)
