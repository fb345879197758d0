"""HRDA's self-training (DAFormer's DACS with HRDA's student and teacher, the ImageNet feature
distance, MIC and HRDA's pseudo-label margins) against a PyTorch transcription of MIC's
``DACS.forward_train`` (torch_ref/hrda_step.py), in float64; and the detail box's law and
loss.

The step runs DAFormer's switches as tests/test_daformer.py sets them (EMA 0.999, class-mix
classes from the batch, coins per batch, the 2-D blur, no weight decay on 'norm', the
feature distance with its weight raised to 0.5) with HRDA's: no pseudo-label row crop but
a 'target_valid' map with zero margins (different per image, as crops at the periphery
give), MIC on (blocks of 12 pixels: a 5 x 5 grid resized by torch's nearest rule), the
detail loss weight 0.1. The network is HRDA around the parity tests' tiny ResNet-18
(base width 16) and DAFormer's DLV2Head ('dlv2_sum', output stride 8) on 2 x 64 x 64
images with a 32 x 32 detail crop: the context is 32 x 32 (a 4 x 4 backbone map), the
detail boxes lie on multiples of 8 in [0, 24] (HRDA's ``crop_coord_divisible=8``), so the
attention's mask on the 16-pixel context cells floors at half cells (8, 24), and the
teacher's slide inference runs 3 x 3 windows. Each student forward (source, mixed, MIC)
draws its own box; the torch side gets the boxes our step returns, in that order, and the
masks and augmentation draws it took. The frozen ImageNet model is another random HRDA
(its backbone only), run on the half-size image in inference mode, as HRDA's
``feature_scale=0.5`` does.

Bounds (float64) are the other step tests': REL64 = 2^-33 of the values' scale through the
network, AUG64 = 2^-40 of the image scale through the augmentation, DRAW32
(tests/test_mic.py) for an image rebuilt from the draws a step returns. The measured
errors are ~1e-15 (run with -s to print them).

The step is run as ``single_tree_update`` composes it (loss_and_grads, the AdamW update, the
EMA in ``finish``) in one program that also returns the gradients: one compile instead of
the step-and-gradients pair of tests/test_daformer.py (~10 s of CPU less).
"""

from __future__ import annotations

import copy
import types

import jax
import ml_collections
import numpy as np
import pytest
import torch

from ddb_jax import methods, models
from ddb_jax.convert import hrda as convert_hrda
from ddb_jax.convert import resnet as convert_resnet
from ddb_jax.methods import base, feature_distance, multires, optim
from ddb_jax.methods.state import MODEL, apply_updates, as_optimizers
from ddb_jax.uda import losses
from tests.parity_support import (
    EPS64,
    REL64,
    assert_argmax_agrees,
    assert_self_training_update,
    assert_within,
    initial_state,
    load_into_torch,
    make_config,
    to_flax,
    torch_threads,
)
from tests.test_daformer import blocky_batch, daformer_switches
from torch_ref import hrda as torch_hrda
from torch_ref import mic as torch_mic
from torch_ref import resnet_dlv2
from torch_ref.common import nchw, numpy_state_dict
from torch_ref.daformer import as_numpy_draws
from torch_ref.hrda_step import hrda_dacs_step
from torch_ref.losses import resize
from torch_ref.paramwise import DAFORMER_KEYS, set_learning_rates
from torch_ref.paramwise import adamw as torch_adamw

AUG64 = 2.0**-40
DRAW32 = 2.0**-15  # a step's returned draws vs the used ones (derived in tests/test_mic.py)
SIZE, CROP, DIVISIBLE, BASE_WIDTH = (64, 64), (32, 32), 8, 16
# Pseudo-label margins (top, bottom, left, right) of each target image: its crop touches
# the original image's top-left corner, the other's its bottom-right one.
MARGINS = ((3, 0, 2, 0), (0, 5, 0, 1))
# This key gives, over the two iterations: three different boxes per step, offsets that are
# odd multiples of 8 (the attention mask floors there), the DACS coins (jitter, blur)
# (False, False) then (True, True) and MIC's (True, False) then (False, True).
KEY_SEED = 39
BOX_KEYS = ("dropout_source", "dropout_target", "dropout_mic")  # the forwards, in order
HRDA_NAMES = convert_hrda.torch_name(convert_resnet.torch_name)


def hrda_config() -> ml_collections.ConfigDict:
    config = daformer_switches(make_config())
    config.st.pseudo_weight_ignore_top = config.st.pseudo_weight_ignore_bottom = 0
    config.model.head = "dlv2_sum"
    config.model.hrda.update(enabled=True, detail_crop=CROP, crop_divisible=DIVISIBLE)
    config.data.crop_size = SIZE
    # What makes the input pipeline add 'target_valid' (here hrda_batch's, made by hand).
    config.data.target_pseudo_margins = (1, 1, 1, 1)
    config.mic.enabled = True
    config.mic.block_size = 12
    # Not 1: with HRDA, MIC's weight scales the fused term only (the reference's mask_lambda
    # multiplies 'decode.loss_seg', not the detail loss 'decode.hr.loss_seg').
    config.mic.weight = 0.5
    return config


def torch_hrda_model(seed: int) -> torch_hrda.HRDASegmentor:
    """A random HRDA (ResNet-18 + DLV2Head, both heads) with non-trivial BN statistics."""
    model = torch_hrda.dlv2_hrda(18, BASE_WIDTH, 19, detail_crop=CROP)
    return resnet_dlv2.randomize(model, seed).double()


def hrda_batch(seed: int) -> dict[str, np.ndarray]:
    """Blocky labels on the 16-pixel cells of the context's last map, and 'target_valid'."""
    batch = blocky_batch(seed, size=SIZE, cell=16)
    valid = np.ones((2, *SIZE))
    for image, (top, bottom, left, right) in zip(valid, MARGINS, strict=True):
        image[:top], image[SIZE[0] - bottom :] = 0, 0
        image[:, :left], image[:, SIZE[1] - right :] = 0, 0
    return {**batch, "target_valid": valid}


def threshold_between_confidences(model, batch, quantile: float) -> float:
    """Halfway between two neighbouring confidences of iteration 0's teacher (the student's
    slide inference in training mode) at ``quantile``: no pixel at the threshold."""
    with torch.no_grad():
        logits = copy.deepcopy(model).train().encode_decode(nchw(batch["target_image"]))
        probs = torch.softmax(resize(logits, SIZE), 1)
    conf = probs.max(1)[0].numpy().ravel()
    values = np.unique(conf)  # upsampling repeats values at the edges: distinct neighbours
    at = np.searchsorted(values, np.quantile(conf, quantile))
    return float(0.5 * (values[at] + values[at + 1]))


def expected_boxes(state, method) -> np.ndarray:
    """The detail boxes of the step's three forwards: each forward's dropout key folded with
    multires.BOX_SALT (the step's keys, drawn before the step runs)."""
    keys = base.StepKeys(types.SimpleNamespace(key=state.key, step=state.step), method.key_names)
    return np.stack([
        multires.draw_box(jax.random.fold_in(keys[name], multires.BOX_SALT), SIZE, CROP, DIVISIBLE)
        for name in BOX_KEYS
    ])  # fmt: skip


def test_hrda_dacs_step_matches_pytorch():
    """Two iterations of DACS with HRDA, the feature distance, MIC and the pseudo-label
    margins, both sides in float64."""
    config = hrda_config()
    student_t, imnet_t = torch_hrda_model(seed=3), torch_hrda_model(seed=4)
    teacher_t = copy.deepcopy(student_t)
    # The teacher's confidences rise by the second iteration (one Adam step of 1e-2 on the
    # head): near the top of the first iteration's, the threshold leaves both weights in (0, 1).
    config.st.pseudo_threshold = threshold_between_confidences(student_t, hrda_batch(10), 0.97)
    keys = dict(DAFORMER_KEYS, head={"lr_mult": config.optim.head_lr_mult})
    opt = torch_adamw(student_t, config.optim, keys)
    coins, all_boxes = [], []
    with jax.enable_x64(True), torch_threads(1):
        model = models.build_model(config.model)
        assert models.is_multi_resolution(model)
        method = methods.create(config, model.apply)
        assert [name for name, _ in method.terms] == ["source", "mixed", "fdist", "mic"]
        tx, _ = optim.make_optimizer(config.optim, config.num_steps)
        state = initial_state(
            method, tx, to_flax(student_t, model, names=HRDA_NAMES), jax.random.PRNGKey(KEY_SEED)
        )
        frozen = {
            "fdist": feature_distance.backbone_only(to_flax(imnet_t, model, names=HRDA_NAMES))
        }
        assert set(frozen["fdist"]) == {"params", "batch_stats"}  # BN in inference mode
        # single_tree_update's parts, returning the gradients too (see the docstring).
        assert type(method).update is base.OneTree.update
        txs = as_optimizers(tx)

        @jax.jit
        def run(s, b, f):
            loss, out, grads = base.loss_and_grads(method, s, b, f)
            new = apply_updates(s, {MODEL: grads}, out["batch_stats"], txs)
            return loss, out, grads, method.finish(new, out)

        before = None
        for it in range(2):
            batch = hrda_batch(10 + it)
            drawn = expected_boxes(state, method)
            loss, out, grads, state = run(state, batch, frozen)

            # Three boxes a step, in forward order, each its forward's own draw: multiples of
            # 8 that keep the crop inside the image, different between the forwards.
            boxes = np.asarray(out["detail_boxes"])
            np.testing.assert_array_equal(boxes, drawn)
            assert boxes.shape == (3, 2) and boxes.dtype == np.int32
            assert not (boxes % DIVISIBLE).any()
            assert (boxes >= 0).all() and (boxes <= SIZE[0] - CROP[0]).all()
            assert len({tuple(b) for b in boxes}) == 3, boxes
            all_boxes.append(boxes)

            draws = as_numpy_draws(out["draws"]["aug"])
            masks = np.asarray(out["draws"]["masks"])
            assert len({(bool(d["jitter"]), bool(d["blur"])) for d in draws}) == 1
            assert 0 < masks.mean() < 1
            mic_aug = as_numpy_draws(out["mic_draws"]["aug"])
            grid = np.asarray(out["mic_draws"]["grid"])
            assert grid.shape == (2, 5, 5) and 0 < grid.mean() < 1
            coins.append(
                tuple((bool(d[0]["jitter"]), bool(d[0]["blur"])) for d in (draws, mic_aug))
            )
            ours_pseudo = np.asarray(out["pseudo_labels"])
            set_learning_rates(opt, it, config.optim, config.num_steps)
            ref_losses, ref_grads, ref_weight, extra = hrda_dacs_step(
                student_t, teacher_t, opt, it, batch, masks, draws, boxes, config,
                imnet=imnet_t, mic_draws={"aug": mic_aug, "grid": grid}, use_pseudo=ours_pseudo,
                inputs={"mixed": out["mixed_image"], "mic": out["mic_image"]},
            )  # fmt: skip
            ref_student, ref_teacher = numpy_state_dict(student_t), numpy_state_dict(teacher_t)

            # The feature distance's cells (the context map's 4 x 4 of 16 pixels).
            mask = np.asarray(out["fdist_mask"])
            assert mask.shape == (2, 4, 4)
            np.testing.assert_array_equal(mask, extra["fdist_mask"])
            assert 0 < mask.sum() < mask.size, mask.sum()

            # Pseudo-labels, one weight for the batch, zero exactly in the margins.
            assert 0.0 < ref_weight < 1.0, ref_weight
            print(f"pseudo weight {it}: {ref_weight:.4g}")
            assert np.min(np.abs(extra["confidence"] - config.st.pseudo_threshold)) > REL64
            weight = np.asarray(out["pseudo_pixel_weight"])
            assert abs(weight.max() - ref_weight) <= 2.0**-40
            assert np.abs(weight - extra["pixel_weight"]).max() <= 2.0**-40
            np.testing.assert_array_equal(weight == 0, batch["target_valid"] == 0)
            assert_argmax_agrees(ours_pseudo, extra["probs"], 1, REL64, f"pseudo-labels {it}")
            keep = torch_mic.block_mask(grid, SIZE)[:, 0].numpy().astype(bool)
            np.testing.assert_array_equal(np.asarray(out["mic_draws"]["keep"]), keep)

            for name in ("source", "fdist", "mixed", "mic"):
                ours, ref_value = float(out[f"loss_{name}"]), ref_losses[name]
                error = abs(ours - ref_value)
                assert error <= REL64 * abs(ref_value), (it, name, ours, ref_value)
                print(f"loss {name} {it}: {ref_value:.6g}, error {error:.3g} "
                      f"(bound {REL64 * abs(ref_value):.3g})")  # fmt: skip
            total = sum(ref_losses.values())
            assert abs(float(loss) - total) <= REL64 * total
            # The images from the returned draws, within their float32 rounding (DRAW32);
            # the losses are compared on the same inputs.
            for what, ours in (("mixed", out["mixed_image"]), ("mic_image", out["mic_image"])):
                scale = (AUG64 + DRAW32) * max(1.0, np.abs(extra[what]).max())
                assert_within([(what, np.asarray(ours), extra[what])], scale, f"{what} {it}")

            before = assert_self_training_update(
                config, it, state, grads, ref_grads, ref_student, ref_teacher, before,
                names=HRDA_NAMES,
            )  # fmt: skip
            if it == 0:
                load_into_torch(student_t, state.params, HRDA_NAMES)
    assert coins == [((False, False), (True, False)), ((True, True), (False, True))], coins
    offsets = np.concatenate(all_boxes)
    assert (offsets % 16 == 8).any() and (offsets % 16 == 0).any(), offsets


# --- the detail box: its loss and its law ----------------------------------------------------


@pytest.fixture(scope="module")
def segmentor():
    """The step's HRDA (float64), built only (the loss reads its crop and detail weight)."""
    with jax.enable_x64(True):
        yield models.build_model(hrda_config().model)


def test_detail_loss_sees_only_its_crop(segmentor):
    """HRDA's loss on fixed outputs: (1 - 0.1) CE(fused, y, w) + 0.1 CE(detail, y[box],
    w[box]) with the box traced; labels and weights changed outside the box change the fused
    term and leave the detail term as it was, bitwise."""
    assert segmentor.detail_loss_weight == 0.1 and segmentor.detail_crop == CROP
    rng = np.random.default_rng(0)
    fused = rng.normal(size=(2, 8, 8, 19))  # stride 8 on 64 x 64
    detail = rng.normal(size=(2, 4, 4, 19))  # stride 8 on the 32 x 32 crop
    labels = rng.integers(0, 19, size=(2, *SIZE)).astype(np.int32)
    labels[:, :3] = 255
    weight = rng.uniform(0.2, 1.0, size=(2, *SIZE))
    box = np.array([24, 8], np.int32)
    inside = np.zeros(SIZE, bool)
    inside[24:56, 8:40] = True
    other_labels = np.where(inside, labels, (labels + 5) % 19).astype(np.int32)
    other_weight = np.where(inside, weight, 0.5 * weight)

    def pieces(y, w, b):
        outputs = {"logits": fused, "detail_logits": detail, "detail_box": b}
        total = multires.segmentation_loss(segmentor.apply, outputs, y, w)
        detail_term = losses.cross_entropy(detail, multires.crop_box(y, b, CROP),
                                           multires.crop_box(w, b, CROP))  # fmt: skip
        return total, losses.cross_entropy(fused, y, w), detail_term

    with jax.enable_x64(True):
        pieces = jax.jit(pieces)
        total, fused_ce, detail_ce = (float(v) for v in pieces(labels, weight, box))
        total2, fused_ce2, detail_ce2 = (float(v) for v in pieces(other_labels, other_weight, box))
        sliced = float(losses.cross_entropy(detail, labels[:, 24:56, 8:40], weight[:, 24:56, 8:40]))
    assert abs(detail_ce - sliced) <= 4 * EPS64 * sliced  # the traced crop is the box's slice
    assert abs(total - (0.9 * fused_ce + 0.1 * detail_ce)) <= 4 * EPS64 * total
    assert detail_ce2 == detail_ce and fused_ce2 != fused_ce
    assert abs((total2 - total) - 0.9 * (fused_ce2 - fused_ce)) <= 8 * EPS64 * total


@pytest.mark.parametrize(
    "size,allowed",
    [
        ((64, 64), ((0, 8, 16, 24), (0, 8, 16, 24))),  # margins 32: never 32 itself
        ((48, 71), ((0, 8), (0, 8, 16, 24, 32))),  # margins 16 and 39
        ((40, 47), ((0,), (0, 8))),  # margins 8 and 15
    ],
)
def test_draw_box_is_uniform_over_the_references_offsets(size, allowed):
    """``draw_box``: each coordinate uniform over HRDA's ``get_crop_bbox`` offsets,
    ``randint(0, (margin + 1) // 8) * 8`` with ``margin = size - crop`` (numpy's bound
    excluded: a margin that is a multiple of 8 is never drawn itself, as in the reference),
    all inside ``[0, margin]``; with 4000 keys every such offset appears and none other, each
    about as often (5 sigma)."""
    n = 4000
    draw = jax.jit(jax.vmap(lambda k: multires.draw_box(k, size, CROP, DIVISIBLE)))
    boxes = np.asarray(draw(jax.random.split(jax.random.key(1), n)))
    for axis, offsets in enumerate(allowed):
        values, counts = np.unique(boxes[:, axis], return_counts=True)
        np.testing.assert_array_equal(values, offsets)
        assert values.max() <= size[axis] - CROP[axis]
        p = 1 / len(offsets)
        assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n)), counts  # 5 sigma
