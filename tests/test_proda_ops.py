"""ProDA's array ops (ddb_jax/uda/proda_ops.py, proda_strong.py) against closed forms and the
float64 PyTorch transcription of the reference (torch_ref/proda_step.py).

Values computed the same way on both sides (the strong-view resampling, a gather) must be
equal; the others are within REL of their scale (float64: a few roundings per value, far
below 1e-12 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddb_jax.methods import optim
from ddb_jax.uda import proda_ops, proda_strong
from tests.parity_support import torch_threads
from torch_ref import proda_step as ref
from torch_ref.common import nchw, nhwc

REL = 1e-12
IGNORE = 255


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True), torch_threads(1):
        yield


def close(ours, theirs, rel: float = REL) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=rel * max(np.abs(theirs).max(), 1e-300))


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


# --- prototypes -------------------------------------------------------------------------


def test_prototype_distances_and_weights_closed_form():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 3, 4, 6))
    table = rng.normal(size=(5, 6))
    features[0, 0, 0] = table[2]  # a feature on a prototype: distance 0, finite gradient
    direct = np.linalg.norm(features[..., None, :] - table, axis=-1)
    distances = proda_ops.prototype_distances(jnp.asarray(features), jnp.asarray(table))
    close(distances, direct)
    for temperature in (1.0, 2.5):
        expected = softmax(-(direct - direct.min(-1, keepdims=True)) * temperature)
        close(proda_ops.prototype_weights(distances, temperature), expected)
    grad = jax.grad(lambda f: proda_ops.prototype_distances(f, jnp.asarray(table)).sum())(
        jnp.asarray(features)
    )
    assert np.all(np.isfinite(grad))


def test_denoised_labels_closed_form():
    rng = np.random.default_rng(1)
    soft = rng.dirichlet(np.ones(4), (2, 5, 6))
    weights = rng.dirichlet(np.ones(4), (2, 5, 6))
    labels = np.asarray(proda_ops.denoised_labels(jnp.asarray(soft), jnp.asarray(weights), 0.4))
    rectified = soft * weights
    top = (rectified / rectified.sum(-1, keepdims=True)).max(-1)
    expected = np.where(top < 0.4, IGNORE, rectified.argmax(-1))
    assert 0 < np.mean(expected == IGNORE) < 1
    np.testing.assert_array_equal(labels, expected)


def test_prototype_update_matches_the_reference():
    """Per image and predicted class with >= 10 pixels, its mean feature; classes updated
    image after image by momentum; a class under 10 pixels, absent, or with a mean feature
    summing to 0 is skipped."""
    rng = np.random.default_rng(2)
    n, h, w, c, k = 3, 6, 8, 4, 5
    features = rng.normal(size=(n, h, w, c))
    predicted = np.broadcast_to(np.arange(h * w).reshape(h, w) % 3, (n, h, w)).copy()
    predicted[0, :2, :4] = 3  # 8 pixels of class 3: skipped
    predicted[1, :3, :4] = 3  # 12: kept
    predicted[2, 3:, 4:] = 4  # 12 pixels of class 4 with features summing to 0: skipped
    features[2, 3:, 4:] = np.array([1.0, -1.0, 2.0, -2.0])
    logits = np.eye(k)[predicted] * 3.0 + rng.normal(size=(n, h, w, k)) * 0.1
    table = rng.normal(size=(k, c))
    momentum = 0.3  # large, so that the order and the repeated updates show
    vectors, valid = proda_ops.class_mean_features(jnp.asarray(features), jnp.asarray(logits))
    ours = proda_ops.momentum_update(jnp.asarray(table), vectors, valid, momentum)
    expected_valid = np.ones((n, k), bool)
    expected_valid[:, 3:] = False
    expected_valid[1, 3] = True
    np.testing.assert_array_equal(np.asarray(valid), expected_valid)

    theirs = torch.from_numpy(table.copy())
    ref_vectors, ids = ref.calculate_mean_vector(nchw(features), nchw(logits), k)
    for vector, i in zip(ref_vectors, ids, strict=True):
        ref.update_objective_single_vector(theirs, i, vector, momentum)
    assert sorted(set(ids)) == [0, 1, 2, 3, 4]  # class 4's zero-sum vector skipped inside
    close(ours, theirs.numpy())


# --- losses -----------------------------------------------------------------------------


def logits_and_labels(seed: int, k: int = 5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 4, 6, k)) * 4.0  # some probabilities below 1e-7... rarely
    logits[0, 0, 0] = [30.0, -30.0, 0.0, 0.0, 0.0][:k]  # ... and here surely
    labels = rng.integers(0, k, (2, 4, 6)).astype(np.int32)
    labels[1, :2] = IGNORE
    return logits, labels


def test_reverse_cross_entropy_closed_form_and_reference():
    logits, labels = logits_and_labels(3)
    ours = float(proda_ops.reverse_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    # The floor's log is float32's, as the reference's one-hot is float32.
    floor = torch.log(torch.tensor(1e-4, dtype=torch.float32)).item()
    assert proda_ops.RCE_LOG_FLOOR == floor
    p = np.clip(softmax(logits), 1e-7, 1.0)
    valid = labels != IGNORE
    others = p.sum(-1) - np.take_along_axis(p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    expected = -(others * floor)[valid].sum() / (valid.sum() + 1e-6)
    close(ours, expected)
    opt = ref.Options(n_class=5, ignore_index=IGNORE)
    close(ours, ref.rce(nchw(logits), torch.from_numpy(labels).long(), opt).item())


@pytest.mark.parametrize("kind", ["mrkld", "mrent"])
def test_regulariser_matches_the_reference(kind):
    logits, _ = logits_and_labels(4)
    ours = proda_ops.regulariser(jnp.asarray(logits), kind)
    close(ours, ref.regular_loss(nchw(logits), kind.upper()).item())


def test_structure_kl_matches_the_reference():
    """Reduced over the (pixel, class) entries whose teacher distance is not the padding."""
    rng = np.random.default_rng(5)
    student = rng.uniform(0, 6, (2, 4, 6, 5))
    teacher = rng.uniform(0, 6, (2, 4, 6, 5))
    teacher[0, 1] = 250.0  # padded pixels
    teacher[1, 2, 3, 0] = 200.0  # a probability that underflows to 0
    ours = proda_ops.structure_kl(jnp.asarray(student), jnp.asarray(teacher), 1.5, 250.0)
    s, t = nchw(student), nchw(teacher)
    mask = (t != 250).double()
    kl = F.kl_div(F.log_softmax(-s * 1.5, 1), F.softmax(-t * 1.5, 1), reduction="none")
    close(ours, ((kl * mask).sum() / mask.sum()).item())


def test_distillation_kl_quirk_and_textbook():
    """Default: the reference's kl_div(softmax(student), softmax(teacher)), value and
    gradient; textbook: KL(teacher || student) summed over classes, averaged over pixels."""
    rng = np.random.default_rng(6)
    student, teacher = rng.normal(size=(2, 2, 4, 6, 5)) * 2.0

    def quirk(s):
        return proda_ops.distillation_kl(s, jnp.asarray(teacher))

    value, grad = jax.value_and_grad(quirk)(jnp.asarray(student))
    s = nchw(student).requires_grad_(True)
    t = F.softmax(nchw(teacher), 1)
    kd = F.kl_div(F.softmax(s, 1), t, reduction="none")
    mask = (t != 250).double()
    theirs = (kd * mask).sum() / mask.sum()
    theirs.backward()
    close(value, theirs.item())
    close(grad, nhwc(s.grad))
    textbook = proda_ops.distillation_kl(jnp.asarray(student), jnp.asarray(teacher), True)
    pt = softmax(teacher)
    expected = np.mean(np.sum(pt * (np.log(pt) - np.log(softmax(student))), -1))
    close(textbook, expected)
    assert abs(float(textbook) - float(value)) > 0.01


# --- geometry ---------------------------------------------------------------------------


def quarter_maps(seed: int, size=(8, 12), channels: int = 3):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 5, (3, *size, channels)), rng.integers(0, 5, (3, *size)).astype(np.int32)


def none_applied(batch: int = 3) -> dict:
    off = np.full(batch, 1e4, np.float32)
    return {
        "hflip": np.zeros(batch, bool), "shear_x": off.copy(), "shear_y": off.copy(),
        "translate_x": off.copy(), "translate_y": off.copy(), "rotate": off.copy(),
        "cutout": np.zeros((batch, 4), np.int32),
    }  # fmt: skip


# Per op, three images' values (1e4: not applied). Chosen away from half-pixel ties of the
# nearest resampling on 8 x 12 maps at both align_corners (shears: v (i + 1/2) and the
# quirk's TranslateX shift of (v // 4) W / H pixels never end in .5), where float32
# rounding, which differs between platforms, picks the side.
OPS = {
    "hflip": np.array([True, False, True]),
    "shear_x": np.array([0.137, -0.27, 1e4], np.float32),
    "shear_y": np.array([0.13, -0.23, 0.29], np.float32),
    "translate_x": np.array([8, -9, 21], np.float32),
    "translate_y": np.array([5, -9, 1e4], np.float32),
    "rotate": np.array([17, -29, 3], np.float32),
    "cutout": np.array([[4, 4, 20, 16], [0, 0, 7, 9], [30, 10, 48, 32]], np.int32),
}


def reference_moved(maps, params, fill, align_corners: bool):
    """label_strong_T on NHWC maps (labels (B, H, W) through float32, as the reference)."""
    if maps.ndim == 3:
        labels = torch.from_numpy(maps[:, None].astype(np.float32))
        moved = ref.label_strong_T(labels, ref.strong_params(params), fill, 4, align_corners)
        return moved.to(torch.int64).numpy()[:, 0]
    moved = ref.label_strong_T(nchw(maps), ref.strong_params(params), fill, 4, align_corners)
    return nhwc(moved)


@pytest.mark.parametrize("align_corners", [False, True])
def test_transform_like_strong_matches_the_reference(align_corners):
    """Each op alone, then all of them, on soft (float) maps and label maps: equal."""
    maps, labels = quarter_maps(7)
    move = jax.jit(
        lambda m, p, fill: proda_strong.transform_like_strong(m, p, fill, 4, align_corners),
        static_argnums=2,
    )
    cases = {op: {**none_applied(), op: value} for op, value in OPS.items()}
    cases["all"] = {**OPS, "shear_y": np.array([1e4, 0.29, 1e4], np.float32)}
    for name, params in cases.items():
        for data, fill in ((maps, 250.0), (labels, IGNORE)):
            ours = np.asarray(move(jnp.asarray(data), params, fill))
            theirs = reference_moved(data, params, fill, align_corners)
            assert ours.dtype == data.dtype
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} {data.dtype}")
            padded = np.mean((ours == fill) if data.ndim == 3 else (ours == fill).all(-1))
            assert (padded == 0) == (name == "hflip"), (name, padded)


def test_translations_and_cutout_closed_form():
    """TranslateY by t pixels of the strong image moves a quarter map by t // 4 rows; the
    reference's TranslateX by (t // 4) W / H columns (here W = 2 H: twice that), the
    switch's by t // 4; the cutout box is divided by 4 (floored); padding is the fill."""
    labels = np.arange(8 * 16, dtype=np.int32).reshape(1, 8, 16) % 200
    params = {k: v[:1] for k, v in none_applied().items()}

    move = jax.jit(proda_strong.transform_like_strong, static_argnums=(2, 3, 4, 5))

    def moved(translate_x_by_width=False, **change):
        p = {**params, **{k: np.array(v) for k, v in change.items()}}
        return np.asarray(move(jnp.asarray(labels), p, IGNORE, 4, False, translate_x_by_width))[0]

    def shifted(rows: int, cols: int):
        out = np.full((8, 16), IGNORE)
        src = labels[0]
        h, w = src.shape
        for i in range(h):
            for j in range(w):
                if 0 <= i + rows < h and 0 <= j + cols < w:
                    out[i, j] = src[i + rows, j + cols]
        return out

    np.testing.assert_array_equal(moved(translate_y=[13.0]), shifted(3, 0))
    np.testing.assert_array_equal(moved(translate_y=[-13.0]), shifted(-4, 0))
    np.testing.assert_array_equal(moved(translate_x=[9.0]), shifted(0, 4))
    np.testing.assert_array_equal(moved(translate_x=[9.0], translate_x_by_width=True),
                                  shifted(0, 2))  # fmt: skip
    np.testing.assert_array_equal(moved(hflip=[True]), labels[0, :, ::-1])
    cut = labels[0].copy()
    cut[1:5, 2:4] = IGNORE
    np.testing.assert_array_equal(moved(cutout=[[9, 7, 17, 21]]), cut)


def test_full_to_weak_matches_the_reference():
    rng = np.random.default_rng(8)
    features = rng.normal(size=(3, 10, 16, 3))
    resized = np.array([[44, 72], [40, 64], [57, 90]], np.int32)
    origin = np.array([[7, 21], [5, 13], [23, 41]], np.int32)
    flip = np.array([True, False, True])
    size = (8, 12)  # a crop of 32 x 48
    move = jax.jit(proda_ops.full_to_weak, static_argnums=4)
    ours = move(jnp.asarray(features), resized, origin, flip, size)
    theirs = ref.full2weak(nchw(features), ref.weak_params(resized, origin, flip, (32, 48)))
    close(ours, nhwc(theirs))


@pytest.mark.parametrize("size", [(32, 48), (30, 46)])
def test_quarter_size_inputs_match_the_reference(size):
    """The soft label (bilinear, align_corners=True) and the hard one (nearest) taken at a
    quarter of the crop as the reference's interpolate(scale_factor=0.25); as they are
    when they come at that size."""
    rng = np.random.default_rng(9)
    soft = rng.dirichlet(np.ones(4), (2, *size))
    labels = rng.integers(0, 4, (2, *size)).astype(np.int32)
    quarter = proda_ops.quarter_size(size)
    ours = proda_ops.soft_label_at(jnp.asarray(soft), quarter)
    theirs = F.interpolate(nchw(soft), scale_factor=0.25, mode="bilinear", align_corners=True)
    close(ours, nhwc(theirs))
    ours = np.asarray(proda_ops.labels_at(jnp.asarray(labels), quarter))
    theirs = F.interpolate(torch.from_numpy(labels[:, None]).float(), scale_factor=0.25)
    np.testing.assert_array_equal(ours, theirs.long().numpy()[:, 0])
    assert proda_ops.labels_at(jnp.asarray(labels[:, ::4, ::4]), (8, 12)).shape[1:] == (8, 12)


# --- the optimiser of stages 2/3 ---------------------------------------------------------


def test_listed_sgd_steps_repeated_listings_as_torch_1x():
    """--finetune's 1x group lists a block's parameters 3 times and a shortcut's 4 times;
    PyTorch 1.x steps each listing through one momentum buffer, weight decay added to the
    gradient afresh each time (0.4.1, ADVENT's, accumulated it: ``decay_in_place``)."""
    rng = np.random.default_rng(10)
    times = {"stem": 1, "block": 3, "shortcut": 4}
    params = {name: rng.normal(size=(3, 2)) for name in times}
    tx = optim.listed_sgd(lambda count: 0.1, 0.9, 0.05, lambda path: times[path[0].key],
                          decay_in_place=False)  # fmt: skip
    state = tx.init(params)
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    listed = [tensors[name] for name, count in times.items() for _ in range(count)]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        reference = ref.SGD1x(listed, lr=0.1, momentum=0.9, weight_decay=0.05)
    for _ in range(2):
        grads = {name: rng.normal(size=(3, 2)) for name in times}
        updates, state = tx.update(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        for name, grad in grads.items():
            tensors[name].grad = torch.from_numpy(grad)
        reference.step()
        for name in times:
            close(params[name], tensors[name].detach().numpy())
    from ddb_jax.models import proda_deeplabv2

    assert optim.listing("proda_1x") is proda_deeplabv2.listed_times
    assert not optim.DECAY_IN_PLACE["proda_1x"] and optim.DECAY_IN_PLACE["advent_1x"]
