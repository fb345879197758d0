"""Image summaries: palette, de-normalisation, panel layout, and the self-training preview
reproducing the bridging of the step it follows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax import labels, models, ops
from ddb_jax.train import optim, previews
from ddb_jax.train import self_training as st
from ddb_jax.train.state import create_train_state
from tests.test_self_training import make_config


def test_palette_colours_and_ignore_is_black():
    train_ids = np.array([[0, 10, 13], [18, 255, 19]], np.int32)
    rgb = np.asarray(previews.colorize(train_ids))  # road, sky, car / bicycle, ignore, 19
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    np.testing.assert_array_equal(rgb[0], [(128, 64, 128), (70, 130, 180), (0, 0, 142)])
    np.testing.assert_array_equal(rgb[1, 0], (119, 11, 32))  # bicycle
    np.testing.assert_array_equal(rgb[1, 1:], 0)  # ignore 255 and an unknown id: black
    assert len({tuple(c) for c in labels.CITYSCAPES_PALETTE}) == 19


def test_denormalize_inverts_normalize_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(2, 5, 7, 3)).astype(np.uint8)
    image[0, 0, 0] = (0, 255, 0)
    back = np.asarray(previews.denormalize(ops.normalize_image(jnp.asarray(image))))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, image)
    # Out of range after augmentation: clipped, not wrapped.
    far = jnp.full((1, 1, 1, 3), 10.0)
    np.testing.assert_array_equal(np.asarray(previews.denormalize(far))[0, 0, 0], 255)
    np.testing.assert_array_equal(np.asarray(previews.denormalize(-far))[0, 0, 0], 0)


def test_panel_rows_layout():
    panels = [jnp.full((5, 8, 6, 3), v, jnp.uint8) for v in (10, 20, 30)]
    rows = np.asarray(previews.panel_rows(panels, max_samples=4, gap=2))
    assert rows.shape == (4, 8, 3 * 6 + 2 * 2, 3)
    np.testing.assert_array_equal(rows[:, :, 0:6], 10)
    np.testing.assert_array_equal(rows[:, :, 6:8], previews.SEPARATOR)
    np.testing.assert_array_equal(rows[:, :, 8:14], 20)
    np.testing.assert_array_equal(rows[:, :, 16:22], 30)
    # Large panels are subsampled (nearest) to at most max_side.
    big = jnp.arange(2 * 512 * 512 * 3, dtype=jnp.uint32).reshape(2, 512, 512, 3)
    small = np.asarray(previews.panel_rows([big.astype(jnp.uint8)] * 2, max_side=256, gap=0))
    assert small.shape == (2, 256, 512, 3)
    np.testing.assert_array_equal(small[:, :, :256], np.asarray(big.astype(jnp.uint8))[:, ::2, ::2])


def test_self_training_preview_shows_the_steps_bridging():
    """The preview after a step equals the step's own mixed image, mixed label and
    pseudo-labels (recomputed from the state's key), and the student's inference argmax."""
    config = make_config()
    config.model.head_channels = 16
    config.st.pseudo_threshold = 0.0
    model = models.build_model(config.model)
    teacher = models.build_model(st.no_dropout(config.model))
    tx, _ = optim.make_optimizer(config.optim, config.num_steps)
    state = create_train_state(
        models.init_variables(model, jax.random.key(0), (32, 32)), tx, jax.random.key(1)
    )
    state = state.replace(step=jnp.asarray(3, jnp.int32))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(2, 32, 32)).astype(np.int32)
    labels[:, :4] = 255
    batch = {
        "source_image": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
        "source_label": labels,
        "target_image": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
    }
    kwargs = dict(student_apply=model.apply, teacher_apply=teacher.apply, st_cfg=config.st)
    _, aux = jax.jit(functools.partial(st.self_training_grads, **kwargs))(state, batch)
    # The state the step leaves behind, as far as the preview reads it.
    after = state.replace(step=state.step + 1, ema_params=aux["ema_params"])
    images = jax.jit(functools.partial(st.preview_images, **kwargs))(after, batch)
    row = np.asarray(images["bridging"])
    assert row.shape == (2, 32, 7 * 32 + 6 * 2, 3) and row.dtype == np.uint8
    panel = {name: row[:, :, i * 34 : i * 34 + 32] for i, name in enumerate(st.PREVIEW_PANELS)}

    def same_colour(a, b):
        return np.mean(np.all(a == b, axis=-1))

    np.testing.assert_array_equal(
        panel["source image"], previews.denormalize(batch["source_image"])
    )
    np.testing.assert_array_equal(panel["source label"], previews.colorize(labels))
    np.testing.assert_array_equal(
        panel["target image"], previews.denormalize(batch["target_image"])
    )
    mixed = np.asarray(previews.denormalize(aux["mixed_image"])).astype(int)
    assert np.abs(panel["mixed image"].astype(int) - mixed).max() <= 1
    assert same_colour(panel["mixed label"], previews.colorize(aux["mixed_label"])) >= 0.99
    assert same_colour(panel["pseudo-label"], previews.colorize(aux["pseudo_labels"])) >= 0.99
    # The mix really happened: the mixed image is neither input.
    assert not np.array_equal(panel["mixed image"], panel["source image"])
    assert not np.array_equal(panel["mixed image"], panel["target image"])
    logits, _ = model.apply(after.variables(), batch["target_image"], train=False)
    prediction = jnp.argmax(ops.resize_bilinear(logits, (32, 32)), -1)
    assert same_colour(panel["student prediction on target"], previews.colorize(prediction)) >= 0.99
