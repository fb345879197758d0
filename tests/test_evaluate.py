"""mIoU against hand-computed confusion matrices; inference modes against each other."""

import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax.evaluation import evaluate


def test_confusion_and_iou_by_hand():
    # 3 classes; label 255 is ignored; class 2 never appears in labels or predictions.
    labels = np.array([[[0, 0, 1, 1, 255, 0]]], np.int32)
    preds = np.array([[[0, 1, 1, 1, 0, 0]]], np.int32)
    confusion = np.asarray(evaluate.confusion_matrix(preds, labels, num_classes=3))
    np.testing.assert_array_equal(confusion, [[2, 1, 0], [0, 2, 0], [0, 0, 0]])
    result = evaluate.iou_from_confusion(confusion)
    # class 0: I=2, U=3+2-2=3; class 1: I=2, U=2+3-2=3; class 2: 0/0 -> NaN, excluded.
    np.testing.assert_allclose(result["iou"][:2], [2 / 3, 2 / 3])
    assert np.isnan(result["iou"][2])
    assert result["miou"] == 2 / 3
    assert result["aacc"] == 4 / 5


def test_class_predicted_but_absent_from_labels_counts_as_zero():
    labels = np.zeros((1, 2, 2), np.int32)
    preds = np.array([[[0, 0], [0, 2]]], np.int32)
    result = evaluate.iou_from_confusion(evaluate.confusion_matrix(preds, labels, 3))
    np.testing.assert_allclose(result["iou"][0], 3 / 4)
    assert result["iou"][2] == 0.0  # union 1, intersection 0: in the mean
    assert np.isnan(result["iou"][1])
    np.testing.assert_allclose(result["miou"], (3 / 4 + 0.0) / 2)


def test_confusion_accumulates_over_batches():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(4, 7, 9)).astype(np.int32)
    labels[:, 0] = 255
    preds = rng.integers(0, 5, size=(4, 7, 9)).astype(np.int32)
    whole = np.asarray(evaluate.confusion_matrix(preds, labels, 5))
    parts = sum(
        np.asarray(evaluate.confusion_matrix(preds[i : i + 1], labels[i : i + 1], 5))
        for i in range(4)
    )
    np.testing.assert_array_equal(whole, parts)
    assert whole.sum() == (labels != 255).sum()


def test_window_starts_follow_mmseg_grid():
    # mmseg: grids = max(size - crop + stride - 1, 0) // stride + 1; last window flush.
    assert evaluate.window_starts(1024, 512, 341) == [0, 341, 512]
    assert evaluate.window_starts(512, 512, 341) == [0]
    assert evaluate.window_starts(300, 512, 341) == [0]


def _pointwise_logits_fn(kernel):
    """A 1x1 'model' at full resolution: slide and whole inference must agree exactly."""
    return lambda images: jnp.einsum("nhwc,ck->nhwk", images, kernel)


def test_slide_equals_whole_for_a_pointwise_model():
    kernel = jax.random.normal(jax.random.key(0), (3, 4))
    images = jax.random.normal(jax.random.key(1), (2, 37, 53, 3))
    fn = _pointwise_logits_fn(kernel)
    whole = evaluate.predict_probabilities(fn, images, (37, 53), mode="whole")
    slide = evaluate.predict_probabilities(fn, images, (37, 53), "slide", (16, 16), (11, 11))
    np.testing.assert_allclose(np.asarray(slide), np.asarray(whole), atol=1e-6)


def test_flip_average_matches_manual_and_resizes_to_label():
    kernel = jax.random.normal(jax.random.key(0), (3, 4))
    position = jnp.linspace(-1, 1, 20)[None, None, :, None]
    fn = lambda x: _pointwise_logits_fn(kernel)(x) + position * x[..., :1]  # not flip-symmetric
    images = jax.random.normal(jax.random.key(1), (1, 10, 20, 3))
    probs = evaluate.predict_probabilities(fn, images, (10, 20), flip=True)
    plain = jax.nn.softmax(fn(images), -1)
    flipped = jax.nn.softmax(fn(images[:, :, ::-1]), -1)[:, :, ::-1]
    np.testing.assert_allclose(np.asarray(probs), np.asarray(0.5 * (plain + flipped)), atol=1e-6)
    bigger = evaluate.predict_probabilities(fn, images, (20, 40))
    assert bigger.shape == (1, 20, 40, 4)
    np.testing.assert_allclose(np.asarray(bigger.sum(-1)), 1.0, atol=1e-5)


def test_evaluate_loop_and_table():
    kernel = jnp.eye(3)
    apply_fn = lambda variables, x, train: {"logits": x @ variables["k"]}
    images = np.eye(3, dtype=np.float32)[np.array([[0, 1], [2, 2]])][None]
    labels = np.array([[[0, 1], [2, 0]]], np.int32)
    result = evaluate.evaluate(apply_fn, {"k": kernel}, [{"image": images, "label": labels}], 3)
    np.testing.assert_allclose(result["iou"], [1 / 2, 1.0, 1 / 2])
    table = evaluate.format_iou_table(result, title="toy")
    assert "| road | 50.00 |" in table and "**66.67**" in table
