"""Image summaries: palette, de-normalisation, panel layout, and the self-training preview
showing the bridging of the very step that returns it."""

import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax import labels, methods, models, ops
from ddb_jax.methods import base, optim, previews
from tests.parity_support import (
    initial_state,
    make_batch,
    make_config,
    to_flax,
    top2_margin,
    torch_segmentor,
)


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


# Float64 step (tests/test_self_training.py's REL64: 2^-33 of the values' scale for what
# passes through the network): the step's program and loss_and_grads' differ by far less
# than any label's top-2 gap here, and than the preview's own float32 rounding.
REL64 = 2.0**-33
# denormalize rounds x to float32 and computes x * std + mean in float32 (|x * std| and
# the result <= 2^8): three roundings of <= 2^-24 * 2^8 each, fused or not, so the two
# programs' float32 values are within 3 * 2^-16 < 2^-14 of the float64 value; one that
# close to k + 0.5 may round either way. The window allows twice that.
HALF_WINDOW = 2.0**-13


def assert_image_panel(panel: np.ndarray, images: np.ndarray, what: str) -> None:
    """``panel`` is denormalize(images), but within HALF_WINDOW of a rounding boundary where
    the two programs' float32 arithmetic may round one level apart."""
    expected = np.asarray(previews.denormalize(images)).astype(int)
    rgb = np.asarray(images, np.float64) * ops.IMAGE_STD + ops.IMAGE_MEAN
    near_half = (np.abs(rgb - np.floor(rgb) - 0.5) < HALF_WINDOW) & (rgb > 0) & (rgb < 255)
    diff = np.abs(panel.astype(int) - expected)
    assert np.all(diff[~near_half] == 0) and np.all(diff <= 1), what


def assert_label_panel(panel, ids, margin, tie: float, what: str) -> None:
    """``panel`` is colorize(ids), but where the scores behind ``ids`` have a top-2 gap
    ``margin`` <= tie (a provable near-tie between the two programs)."""
    same = np.all(panel == np.asarray(previews.colorize(ids)), axis=-1)
    assert np.all(margin[~same] <= tie), (what, np.sum(~same))
    print(f"{what}: {np.sum(~same)} pixels differ, {np.sum(margin <= tie)} near-ties")


def test_self_training_preview_shows_the_steps_bridging():
    """The preview returned by the step (``with_preview=True``) shows that step's own
    bridging: its panels are colorize/denormalize of what the step computed, taken from
    loss_and_grads on the same state and batch (same key and step, so the same draws), and
    there is one panel per name in ``method.preview_panels``."""
    config = make_config()
    size = (32, 32)
    batch = make_batch(0, size=size)
    with jax.enable_x64(True):
        model = models.build_model(config.model)
        method = methods.create(config, model.apply)
        tx, _ = optim.make_optimizer(config.optim, config.num_steps)
        variables = to_flax(torch_segmentor(seed=0), model)  # no init program to compile
        state = initial_state(method, tx, variables, jax.random.PRNGKey(1))
        state = state.replace(step=jnp.asarray(3, jnp.int32))
        step = base.make_train_step(method, tx, with_preview=True)

        def run(state, batch):
            _, out, _ = base.loss_and_grads(method, state, batch)
            # The scores behind the label panels, for their near-ties: the teacher's
            # probabilities and the student's logits on the mixed image (training-mode BN:
            # batch statistics, as in the step), at image size.
            named_outputs, _ = model.apply(
                state.variables(), out["mixed_image"], train=True, mutable=["batch_stats"]
            )
            mixed_logits = named_outputs["logits"]
            scores = (
                jax.nn.softmax(ops.resize_bilinear(out["teacher_logits"], size), -1),
                ops.resize_bilinear(mixed_logits, size),
            )
            return out, scores, step(state, batch)

        out, (teacher_probs, mixed_logits), (after, _, images) = jax.jit(run)(state, batch)
        assert int(after.step) == 4
        out, teacher_probs, mixed_logits = jax.device_get((out, teacher_probs, mixed_logits))

    assert set(images) == {method.preview_tag}
    row = np.asarray(images[method.preview_tag])
    k, (h, w), gap = len(method.preview_panels), size, 2
    assert len(method.preview(batch, out)) == k
    assert row.shape == (2, h, k * w + (k - 1) * gap, 3) and row.dtype == np.uint8
    panel = {
        name: row[:, :, i * (w + gap) : i * (w + gap) + w]
        for i, name in enumerate(method.preview_panels)
    }
    np.testing.assert_array_equal(row[:, :, w : w + gap], previews.SEPARATOR)

    assert_image_panel(panel["source image"], batch["source_image"], "source image")
    np.testing.assert_array_equal(panel["source label"], previews.colorize(batch["source_label"]))
    assert_image_panel(panel["target image"], batch["target_image"], "target image")
    assert_image_panel(panel["mixed image"], out["mixed_image"], "mixed image")
    tie = REL64  # probabilities: scale 1
    margin = top2_margin(teacher_probs, -1)
    assert_label_panel(panel["pseudo-label"], out["pseudo_labels"], margin, tie, "pseudo-label")
    # The mixed label: the source label where the mask is set (exact), else the pseudo-label.
    masks = np.asarray(out["draws"]["masks"])
    margin = np.where(masks, np.inf, margin)
    assert_label_panel(panel["mixed label"], out["mixed_label"], margin, tie, "mixed label")
    assert_label_panel(
        panel["student prediction on the mixed image"], out["mixed_prediction"],
        top2_margin(mixed_logits, -1), REL64 * np.abs(mixed_logits).max(), "student prediction",
    )  # fmt: skip
    # The bridging really happened: both domains in the mask, the mixed image is neither.
    assert 0 < masks.mean() < 1
    assert not np.array_equal(panel["mixed image"], panel["source image"])
    assert not np.array_equal(panel["mixed image"], panel["target image"])
