"""DAFormer's recipe as switches of self-training: the DACS step with the ImageNet feature
distance against a PyTorch transcription (float64), the feature-distance ops, the frozen
ImageNet model from a DAFormer checkpoint's ``imnet_model.``, and the configs.

The step runs with every DAFormer switch on: EMA 0.999, class-mix classes from the batch,
one jitter and one blur coin per batch, the 2-D blur, the pseudo-label crop (scaled to the
image: 3 top, 5 bottom rows), no weight decay on 'norm'/'pos_block' parameters, and the
feature distance (its weight raised to 0.5 so that its gradient is not lost in the bound
of the others'). The network is the parity tests' tiny ResNet-18 DLV2 on 2 x 32 x 40
images (the step does not depend on the architecture, and a float64 MiT step costs a
minute of CPU here); the frozen ImageNet model is another random ResNet, run in inference
mode (BN running statistics). The MiT side of the recipe is tested without a step: its
backbone maps and drop-path draws (below), its 'norm' groups (tests/test_optim.py). The
torch side (torch_ref/daformer.py) gets the masks and augmentation draws our step took.

Bounds (float64) are tests/test_self_training.py's: REL64 = 2^-33 of the values' scale
through the network, AUG64 = 2^-40 of the image scale through the augmentation (the 2-D
blur adds one pass of 3 taps); DRAW32 (tests/test_mic.py) for an image rebuilt from the
draws a step returns. The measured errors are ~1e-15.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from ddb_jax import checkpoints, methods, models
from ddb_jax.convert import convert_torch_checkpoint
from ddb_jax.convert import mit as convert_mit
from ddb_jax.convert.common import path_to_str
from ddb_jax.methods import base, feature_distance, optim, registry
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
    torch_segmentor,
    torch_threads,
)
from torch_ref import daformer_ops
from torch_ref import mit_heads as ref
from torch_ref.common import nchw, numpy_state_dict
from torch_ref.daformer import as_numpy_draws, dacs_step
from torch_ref.losses import resize
from torch_ref.paramwise import DAFORMER_KEYS, set_learning_rates
from torch_ref.paramwise import adamw as torch_adamw

AUG64 = 2.0**-40
DRAW32 = 2.0**-15  # a step's returned draws vs the used ones (derived in tests/test_mic.py)
SIZE = (32, 40)
MIT_SIZE = (64, 96)
THINGS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
# With the jitter and blur probabilities at 0.5, this key gives the two iterations' batch
# coins (jitter, blur) = (False, False) and (True, True): both states of both coins.
KEY_SEED = 3


def daformer_switches(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DAFormer's switches on a test config (its crop and coins scaled for the tests)."""
    config.optim.no_decay_keys = ("norm", "pos_block")
    st = config.st
    st.mask, st.ema_alpha = "class", 0.999
    st.coins_per_batch = st.blur_2d = st.classes_from_batch = True
    st.color_jitter_p = st.blur_p = 0.5
    st.pseudo_weight_ignore_top, st.pseudo_weight_ignore_bottom = 3, 5
    config.fdist.enabled = True
    config.fdist.weight = 0.5
    config.fdist.imnet_from = "unused: the test passes the frozen model itself"
    return config


def blocky_batch(seed: int, n: int = 2, size=SIZE, cell: int = 8) -> dict[str, np.ndarray]:
    """Labels of ``cell`` x ``cell`` blocks, the cells of the last backbone map (things and
    stuff; some split by stripes of class 13 over 3/8 of their columns, so below the 0.75
    ratio; ignored top rows)."""
    rng = np.random.default_rng(seed)
    h, w = size
    values = np.array([0, 2, 6, 8, 11, 13, 255])
    grid = (n, h // cell, w // cell)
    labels = rng.choice(values, size=grid).repeat(cell, 1).repeat(cell, 2)
    split = (rng.random(grid) < 0.3).repeat(cell, 1).repeat(cell, 2)
    labels = np.where(split & (np.arange(w) % cell < 3 * cell // 8), 13, labels)
    labels = labels.astype(np.int32)
    labels[:, :2] = 255
    return {
        "source_image": rng.normal(size=(n, h, w, 3)),
        "source_label": labels,
        "target_image": rng.normal(size=(n, h, w, 3)),
    }


def threshold_between_confidences(model, batch) -> float:
    """Halfway between two neighbouring teacher confidences near the median (iteration 0's
    teacher is the student in training mode): 0 < weight < 1, no pixel at the threshold."""
    with torch.no_grad():
        logits = copy.deepcopy(model).train()(nchw(batch["target_image"]))[0]
        probs = torch.softmax(resize(logits, batch["source_label"].shape[1:]), 1)
    conf = np.sort(probs.max(1)[0].numpy().ravel())
    mid = len(conf) // 2
    return float(0.5 * (conf[mid] + conf[mid + 1]))


def mit_config() -> ml_collections.ConfigDict:
    """MiT-B0 + the DAFormer head (16 channels), float32, DAFormer's switches."""
    config = daformer_switches(make_config(dtype="float32"))
    config.model.backbone, config.model.head = "mit_b0", "daformer"
    config.model.head_channels = 16
    config.model.drop_path_rate = 0.0
    return config


def torch_mit(seed: int) -> ref.EncoderDecoder:
    """A random MiT-B0 + DAFormer head with the reference's names (float32)."""
    head = ref.DAFormerHead(ref.MIT_B0["embed_dims"], 16)
    return ref.randomize_(ref.EncoderDecoder(ref.NVMiT(**ref.MIT_B0), head), seed)


def mit_paired(tree, collection: str, torch_dict: dict[str, np.ndarray]):
    """[(name, ours, reference in our layout)] for every leaf of a MiT variable tree."""
    out = []
    for path, ours in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = (collection, *path_to_str(path).split("/"))
        source = convert_mit.torch_name(name)
        out.append(("/".join(name), np.asarray(ours), source.transform(torch_dict[source.key])))
    return out


# --- the step ----------------------------------------------------------------------------------


def test_dacs_step_with_feature_distance_matches_pytorch():
    """Two iterations of DAFormer's DACS step, both sides in float64."""
    config = daformer_switches(make_config())
    student_t, imnet_t = torch_segmentor(seed=3), torch_segmentor(seed=4)
    teacher_t = copy.deepcopy(student_t)
    config.st.pseudo_threshold = threshold_between_confidences(student_t, blocky_batch(10))
    keys = dict(DAFORMER_KEYS, head={"lr_mult": config.optim.head_lr_mult})
    opt = torch_adamw(student_t, config.optim, keys)
    coins = []
    with jax.enable_x64(True), torch_threads(1):
        model = models.build_model(config.model)
        method = methods.create(config, model.apply)
        assert [name for name, _ in method.terms] == ["source", "mixed", "fdist"]
        tx, _ = optim.make_optimizer(config.optim, config.num_steps)
        state = initial_state(method, tx, to_flax(student_t, model), jax.random.PRNGKey(KEY_SEED))
        frozen = {"fdist": feature_distance.backbone_only(to_flax(imnet_t, model))}
        assert set(frozen["fdist"]) == {"params", "batch_stats"}  # BN in inference mode
        step = base.make_train_step(method, tx)
        run = jax.jit(lambda s, b, f: (base.loss_and_grads(method, s, b, f), step(s, b, f)))
        before = None
        for it in range(2):
            batch = blocky_batch(10 + it)
            (_, out, grads), (state, metrics) = run(state, batch, frozen)
            draws = as_numpy_draws(out["draws"]["aug"])
            masks = np.asarray(out["draws"]["masks"])
            # One coin pair per batch; the class-mix mask mixes both domains.
            assert len({(bool(d["jitter"]), bool(d["blur"])) for d in draws}) == 1
            coins.append((bool(draws[0]["jitter"]), bool(draws[0]["blur"])))
            assert 0 < masks.mean() < 1
            ours_pseudo = np.asarray(out["pseudo_labels"])
            set_learning_rates(opt, it, config.optim, config.num_steps)
            ref_losses, ref_grads, ref_weight, extra = dacs_step(
                student_t, teacher_t, opt, it, batch, masks, draws, config,
                blur_2d=True, imnet=imnet_t, use_pseudo=ours_pseudo,
                inputs={"mixed": out["mixed_image"]},
            )  # fmt: skip
            ref_student, ref_teacher = numpy_state_dict(student_t), numpy_state_dict(teacher_t)
            mask = np.asarray(out["fdist_mask"])
            np.testing.assert_array_equal(mask, extra["fdist_mask"])
            assert 0 < mask.sum() < mask.size, mask.sum()

            # Pseudo-labels, their weight and the crop of its top and bottom rows.
            assert 0.0 < ref_weight < 1.0
            assert np.min(np.abs(extra["confidence"] - config.st.pseudo_threshold)) > REL64
            weight = np.asarray(out["pseudo_pixel_weight"])
            assert abs(weight.max() - ref_weight) <= 2.0**-40
            assert np.abs(weight - extra["pixel_weight"]).max() <= 2.0**-40
            assert not weight[:, [0, 1, 2, -5, -1]].any() and weight[:, 3:-5].all()
            assert_argmax_agrees(ours_pseudo, extra["probs"], 1, REL64, f"pseudo-labels {it}")

            for name in ("source", "mixed", "fdist"):
                ours, ref_value = float(out[f"loss_{name}"]), ref_losses[name]
                assert abs(ours - ref_value) <= REL64 * abs(ref_value), (it, name, ours, ref_value)
            total = sum(ref_losses.values())
            assert abs(float(metrics["loss"]) - total) <= REL64 * total
            # The bridged image from the returned draws, within their float32 rounding (see
            # DRAW32); the losses are compared on the same input (the exact augmentation
            # from given draws: tests/test_augment.py).
            mixed = [("mixed_image", np.asarray(out["mixed_image"]), extra["mixed"])]
            scale = (AUG64 + DRAW32) * max(1.0, np.abs(extra["mixed"]).max())
            assert_within(mixed, scale, f"mixed image {it}")

            before = assert_self_training_update(
                config, it, state, grads, ref_grads, ref_student, ref_teacher, before
            )
            if it == 0:
                load_into_torch(student_t, state.params)
    assert coins == [(False, False), (True, True)], coins


# --- feature-distance ops ------------------------------------------------------------------------


@pytest.mark.parametrize("scale,min_ratio", [(4, 0.75), (3, 0.5), (8, 0.0)])
def test_downscale_label_ratio_matches_daformer(scale, min_ratio):
    """Ties, the ignore value as a class, sizes not divisible by the scale."""
    rng = np.random.default_rng(scale)
    labels = rng.choice([0, 5, 18, 255], size=(2, 8, 8)).repeat(4, 1).repeat(4, 2)
    labels = np.where(rng.random(labels.shape) < 0.2, 7, labels)[:, :30, :29].astype(np.int32)
    ours = np.asarray(losses.downscale_label_ratio(jnp.asarray(labels), scale, min_ratio))
    expected = daformer_ops.downscale_label_ratio(
        torch.from_numpy(labels)[:, None].long(), scale, min_ratio, 19
    )[:, 0].numpy()
    np.testing.assert_array_equal(ours, expected)
    assert ours.shape == (2, 30 // scale, 29 // scale)
    if min_ratio > 0.5:
        assert (ours == 255).any() and (ours != 255).any()


def test_masked_feature_distance_values_and_gradients():
    """Against torch's masked mean of norms; an empty mask gives 0 where torch gives NaN, with
    the same (zero) gradients; coinciding features give torch's zero subgradient."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 2, 3, 4, 5))
    a[0, 0, 0] = b[0, 0, 0]  # a zero distance inside the mask
    mask = rng.random((2, 3, 4)) < 0.5
    mask[0, 0, 0] = True
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(losses.masked_feature_distance)(
            jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask)
        )
        empty_value, empty_grad = jax.value_and_grad(losses.masked_feature_distance)(
            jnp.asarray(a), jnp.asarray(b), jnp.zeros((2, 3, 4), bool)
        )
    ta = torch.tensor(a.transpose(0, 3, 1, 2), requires_grad=True)
    expected = daformer_ops.masked_feat_dist(
        ta, torch.tensor(b.transpose(0, 3, 1, 2)), torch.tensor(mask)
    )
    expected.backward()
    assert abs(float(value) - float(expected)) <= 8 * EPS64 * float(expected)
    np.testing.assert_allclose(grad, ta.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-15)
    assert np.all(np.isfinite(grad)) and not np.asarray(grad)[0, 0, 0].any()
    ta.grad = None
    nan = daformer_ops.masked_feat_dist(
        ta, torch.tensor(b.transpose(0, 3, 1, 2)), torch.zeros(2, 3, 4, dtype=bool)
    )
    nan.backward()
    assert np.isnan(float(nan)) and not ta.grad.any()
    assert float(empty_value) == 0.0 and not np.asarray(empty_grad).any()


# --- the frozen ImageNet model -----------------------------------------------------------------


def test_imnet_model_of_a_daformer_checkpoint_is_the_frozen_backbone(tmp_path):
    """A DAFormer checkpoint (model., ema_model., imnet_model.) converts with
    --which=imnet_model; fdist's loader keeps its backbone and refuses a wrong one."""
    config = mit_config()
    parts = {"model": torch_mit(1), "ema_model": torch_mit(2), "imnet_model": torch_mit(3)}
    state = {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "daformer.pth")
    variables, model_cfg, provenance = convert_torch_checkpoint(
        str(tmp_path / "daformer.pth"), config.model, which="imnet_model"
    )
    assert provenance["prefix"] == "imnet_model"
    checkpoints.save_model_dir(str(tmp_path / "imnet"), variables, model_cfg, provenance)
    config.fdist.imnet_from = str(tmp_path / "imnet")
    frozen = methods.load_frozen(config)
    assert set(frozen) == {"fdist"} and set(frozen["fdist"]["params"]) == {"backbone"}
    # The compile-only check's abstract copy, with or without the directory.
    assert methods.frozen_shapes(config) == registry.shapes_of(frozen)
    config.fdist.imnet_from = str(tmp_path / "missing")
    assert methods.frozen_shapes(config) == registry.shapes_of(frozen)
    config.fdist.imnet_from = str(tmp_path / "imnet")
    expected = numpy_state_dict(parts["imnet_model"])
    for name, ours, r in mit_paired(frozen["fdist"]["params"], "params", expected):
        np.testing.assert_array_equal(ours, r, err_msg=name)
    config.model.backbone = "mit_b1"
    with pytest.raises(checkpoints.CheckpointError, match="mit_b0"):
        methods.load_frozen(config)
    config.fdist.imnet_from = ""
    with pytest.raises(feature_distance.FeatureDistanceConfigError, match="imnet_from"):
        methods.check_config(config)


def test_source_forward_keeps_its_draws_with_backbone_maps():
    """Asking the source forward for its backbone maps changes nothing it computes (same
    dropout and drop-path draws, bitwise), and the maps are the backbone's own."""
    config = mit_config()
    config.model.drop_path_rate = 0.3
    config.model.dropout_ratio = 0.2
    model = models.build_model(config.model)
    variables = models.init_variables(model, jax.random.key(0), MIT_SIZE)
    images = jnp.asarray(blocky_batch(1, size=MIT_SIZE, cell=32)["source_image"], jnp.float32)
    key = jax.random.key(5)

    @jax.jit
    def both(v):
        stats = v["batch_stats"]
        plain = base.student_forward(model.apply, v["params"], stats, images, key)
        kept = base.student_forward(model.apply, v["params"], stats, images, key, True)
        frozen = model.apply(v, images, train=False, method="extract_feat")
        return plain, kept, frozen

    (plain, stats), (kept, kept_stats), frozen = both(variables)
    assert set(plain) == {"logits", "feature"}
    expected = jax.tree_util.tree_leaves((plain, stats))
    same_outputs = {k: kept[k] for k in plain}
    for a, b in zip(expected, jax.tree_util.tree_leaves((same_outputs, kept_stats)), strict=True):
        np.testing.assert_array_equal(a, b)
    maps = kept["backbone"]
    assert [m.shape[1:3] for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert not np.allclose(maps[-1], frozen[-1])  # drop path on in training mode only


# --- configs -------------------------------------------------------------------------------------


def test_daformer_config_is_its_reference_recipe():
    from configs import daformer_gta2cs, default, gta2cs, gta2cs_ddb_daformer

    config = daformer_gta2cs.get_config()
    assert config.stage == "self_training" and config.st.mask == "class"
    assert (config.model.backbone, config.model.head) == ("mit_b5", "daformer")
    assert config.batch_size == 2 and config.st.ema_alpha == 0.999
    assert config.data.rare_class_sampling
    assert (config.data.rcs_temperature, config.data.rcs_min_pixels) == (0.01, 3000)
    assert config.data.rcs_min_crop_ratio == 0.5
    assert config.fdist.enabled and tuple(config.fdist.classes) == THINGS
    assert (config.fdist.weight, config.fdist.min_ratio) == (0.005, 0.75)
    assert config.fdist.imnet_from == config.init_from == "pretrained/mit_b5"
    assert (config.st.pseudo_weight_ignore_top, config.st.pseudo_weight_ignore_bottom) == (15, 120)
    assert set(config.optim.no_decay_keys) == {"norm", "pos_block"}
    assert config.st.coins_per_batch and config.st.blur_2d and config.st.classes_from_batch
    assert (config.optim.lr, config.optim.head_lr_mult, config.num_steps) == (6e-5, 10.0, 40000)
    assert not config.mic.enabled
    # DDB's MiT paths take DAFormer's settings; DDB's own configs keep DDB's.
    path = gta2cs_ddb_daformer.get_config("r1_cu")
    assert path.st.mask == "cut" and path.fdist.enabled and path.st.coins_per_batch
    assert path.batch_size == 2 and path.st.ema_alpha == 0.999
    for ddb in (default.get_config(), gta2cs.get_config("r1_ca")):
        assert not (ddb.fdist.enabled or ddb.mic.enabled or ddb.st.coins_per_batch)
        assert not (ddb.st.blur_2d or ddb.st.classes_from_batch or ddb.optim.no_decay_keys)
        assert ddb.st.ema_alpha == 0.99 and ddb.batch_size == 4
