"""The CKD step against a PyTorch reference step (float64), CKD's input checks, and a toy
stage run.

The reference step (torch_ref/ckd.py) follows DDB's ``CKD.forward_train``: source CE
backward; both teachers in eval mode on the clean target, logits and features resized to
the image size; prototype weights and the rectified ensemble (on probabilities or on
logits) or the soft KL target; target loss backward; one AdamW step with the head at 10x.
Both sides get the strong-augmentation draws our step took from its key.

Bounds as in tests/test_self_training.py: REL64 = 2^-33 of the values' scale for what
passes through a network (~2^6 layers of reductions of <= 2^13 terms, 2^-52 each), AUG64 =
2^-40 for the ~2^12 elementwise operations of the strong augmentation, 2^-40 for a mean
of <= 2^12 zeros and ones (a pixel fraction).
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import default
from ddb_jax import checkpoints, models
from ddb_jax.methods import base, ckd, optim, teachers
from ddb_jax.methods.state import TrainState
from ddb_jax.offline import prototype_io
from ddb_jax.train import checkpointing, loop
from ddb_jax.train import workdir as workdir_lib
from ddb_jax.uda import ensemble
from input_pipeline import toy
from tests.parity_support import (
    adam_param_bound,
    assert_argmax_agrees,
    assert_within,
    group_lr,
    initial_state,
    make_batch,
    make_config,
    paired,
    per_image_draws,
    to_flax,
    top2_margin,
    torch_segmentor,
    torch_threads,
)
from torch_ref import ckd as torch_ckd
from torch_ref.augment import strong as torch_strong
from torch_ref.common import nchw, numpy_state_dict, to_torch
from torch_ref.optim import make_optimizer, set_learning_rates
from torch_ref.prototypes import prototype_weight, rectified_ensemble
from torch_ref.resnet_dlv2 import center_classifier

REL64 = 2.0**-33
AUG64 = 2.0**-40
FRACTION64 = 2.0**-40
# With color_jitter_p = blur_p = 0.5, the key of seed 0 draws both values of both coins
# across the two target images: both branches of both ops are compared (asserted below).
KEY_SEED = 0

MODES = {
    "rectify_on_prob": dict(proto_rectify=True, rectify_on_prob=True),
    "rectify_on_logits_pl_weight": dict(
        proto_rectify=True, rectify_on_prob=False, use_pl_weight=True
    ),
    "soft_distill": dict(proto_rectify=True, soft_distill=True, temperature=2.0),
}


def ckd_method(config, model) -> ckd.CKD:
    """CKD with float64 teachers. ``methods.create`` cannot build it:
    teachers.teacher_model_config sets the teachers' compute dtype to
    config.ckd.teacher_dtype, float32 or bfloat16 only."""
    teacher_cfg = teachers.teacher_model_config(config)
    teacher_cfg.dtype = config.model.dtype
    return ckd.CKD(
        student_apply=model.apply,
        teacher_apply=models.build_model(teacher_cfg).apply,
        ckd=config.ckd,
        st=config.st,
    )


@pytest.fixture(scope="module")
def reference():
    """float64: a random student and two distinct random teachers (non-trivial BN statistics,
    informative argmax), torch and Flax, and prototype tables that change some of the
    ensemble's labels."""
    batch = make_batch(10)
    xt = nchw(batch["target_image"])
    student_t = torch_segmentor(seed=3)
    cu_t = center_classifier(torch_segmentor(seed=4), xt)
    ca_t = center_classifier(torch_segmentor(seed=5), xt)
    config = make_config("ckd")
    # Prototypes: features of random pixels of each teacher, moved by noise, so no pixel
    # sits at distance 0 and the weights are neither one-hot nor flat.
    rng = np.random.default_rng(7)
    vectors, frozen, features = {}, {}, {}
    with jax.enable_x64(True):
        model = models.build_model(config.model)
        for name, teacher in (("cu", cu_t), ("ca", ca_t)):
            with torch.no_grad():
                logits, feat = torch_ckd.encode_decode(teacher.eval(), xt, True)
            flat = feat.numpy().transpose(0, 2, 3, 1).reshape(-1, feat.shape[1])
            picks = flat[rng.choice(len(flat), 19, replace=False)]
            table = picks + rng.normal(size=picks.shape) * flat.std()
            vectors[name] = to_torch(table)
            features[name] = (logits, feat)
            frozen[name] = {"variables": to_flax(teacher, model), "prototypes": jnp.asarray(table)}
    # A threshold for the confidence-weighted mode (rectified on logits): halfway between two
    # neighbouring ensemble confidences near the median, so 0 < weight < 1.
    with torch.no_grad():
        (cu_l, cu_f), (ca_l, ca_f) = features["cu"], features["ca"]
        conf, _ = rectified_ensemble(
            cu_l, prototype_weight(cu_f, vectors["cu"]), ca_l,
            prototype_weight(ca_f, vectors["ca"]), on_prob=False,
        )  # fmt: skip
    conf = np.sort(conf.numpy().ravel())
    mid = len(conf) // 2
    threshold = float(0.5 * (conf[mid] + conf[mid + 1]))
    return dict(
        batch=batch, student=student_t, cu=cu_t, ca=ca_t, vectors=vectors, frozen=frozen,
        threshold=threshold,
    )  # fmt: skip


def reference_cfg(config):
    return dict(
        proto_rectify=config.ckd.proto_rectify,
        rectify_on_prob=config.ckd.rectify_on_prob,
        use_pl_weight=config.ckd.use_pl_weight,
        pseudo_threshold=config.st.pseudo_threshold,
        soft_distill=config.ckd.soft_distill,
        soft_distill_w=config.ckd.soft_distill_weight,
        temp=config.ckd.temperature,
    )


def argmax_fraction_bound(*scores: np.ndarray) -> float:
    """How far a fraction of pixels defined by argmaxes of ``scores`` (N, K, H, W) can move
    between the two sides: its near-ties (top-2 gap <= REL64 of the scores' scale) over the
    pixel count, plus the fraction's own (float64) rounding."""
    near = np.zeros(scores[0][:, 0].shape, bool)
    for s in scores:
        near |= top2_margin(s, 1) <= REL64 * np.abs(s).max()
    return np.sum(near) / near.size + FRACTION64


def mode_config(mode: str, threshold: float):
    config = make_config("ckd")
    config.ckd.update(MODES[mode])
    config.st.color_jitter_p = 0.5
    config.st.blur_p = 0.5
    if config.ckd.use_pl_weight:
        config.st.pseudo_threshold = threshold
    return config


@pytest.fixture(scope="module")
def ours(reference):
    """Our step in the three modes from one state, in one float64 program (XLA shares the
    teachers' and the source term's work between them): {mode: (config, method, loss,
    outputs, gradients, new state, metrics)}."""
    configs = {mode: mode_config(mode, reference["threshold"]) for mode in MODES}
    config = configs["rectify_on_prob"]
    with jax.enable_x64(True):
        model = models.build_model(config.model)
        methods = {mode: ckd_method(cfg, model) for mode, cfg in configs.items()}
        tx, _ = optim.make_optimizer(config.optim, config.num_steps)
        variables = to_flax(reference["student"], model)
        # CKD keeps the base state (no EMA teacher): one state for the three modes.
        state = initial_state(
            methods["rectify_on_prob"], tx, variables, jax.random.PRNGKey(KEY_SEED)
        )
        steps = {mode: base.make_train_step(m, tx) for mode, m in methods.items()}

        def run(state, batch, frozen):
            return {
                mode: (
                    base.loss_and_grads(m, state, batch, frozen),
                    steps[mode](state, batch, frozen),
                )
                for mode, m in methods.items()
            }

        results = jax.device_get(jax.jit(run)(state, reference["batch"], reference["frozen"]))
    return {
        mode: (configs[mode], methods[mode], *lg, *after) for mode, (lg, after) in results.items()
    }


@pytest.mark.parametrize("mode", list(MODES))
def test_step_matches_pytorch_reference(reference, ours, mode):
    batch, vectors = reference["batch"], reference["vectors"]
    config, method, loss, out, grads, new_state, metrics = ours[mode]
    student_t = copy.deepcopy(reference["student"])
    opt = make_optimizer(student_t, config.optim)
    set_learning_rates(opt, 0, config.optim, config.num_steps)
    with torch_threads(1):
        # The student's input: the strongly augmented target ('zero' mask), same draws.
        assert not np.asarray(out["draws"]["masks"]).any()
        draws = per_image_draws(out["draws"]["aug"])
        assert {bool(d["jitter"]) for d in draws} == {True, False}
        assert {bool(d["blur"]) for d in draws} == {True, False}
        stu_tgt = np.stack([torch_strong(batch["target_image"][i], d) for i, d in enumerate(draws)])
        student_image = [("student_image", np.asarray(out["student_image"]), stu_tgt)]
        assert_within(student_image, AUG64 * np.abs(stu_tgt).max(), "student image")

        ours_pseudo = np.asarray(out["pseudo_labels"])
        xs, xt = nchw(batch["source_image"]), nchw(batch["target_image"])
        ys = to_torch(batch["source_label"])
        ref_src, ref_tgt, ref_grads, extra = torch_ckd.ckd_step(
            student_t, reference["cu"], reference["ca"], vectors, opt, xs, ys, xt,
            nchw(stu_tgt), reference_cfg(config),
            use_pseudo=None if config.ckd.soft_distill else ours_pseudo,
        )  # fmt: skip

    # Labels: the argmax of the reference ensemble (or soft target) but at provable near-ties.
    scores = extra["target"] if config.ckd.soft_distill else extra["ensemble"]
    assert_argmax_agrees(ours_pseudo, scores, 1, REL64, f"{mode} pseudo-labels")
    cu_logits, ca_logits = extra["teacher_logits"]
    if config.ckd.soft_distill:
        plain = cu_logits + ca_logits
        assert float(out["pseudo_weight"]) == 1.0
    else:
        np.testing.assert_array_equal(scores.argmax(1), extra["pseudo"])
        plain = extra["plain"]
        np.testing.assert_array_equal(plain.argmax(1), extra["plain_labels"])
        weight = float(out["pseudo_weight"])
        assert abs(weight - extra["weight"]) <= FRACTION64, (weight, extra["weight"])
        if config.ckd.use_pl_weight:
            assert 0.0 < extra["weight"] < 1.0
            confidence = scores.max(1)
            assert np.min(np.abs(confidence - config.st.pseudo_threshold)) > REL64
        else:
            assert weight == 1.0
    # The prototypes matter: rectification changes some labels, and not all.
    changed = np.mean(plain.argmax(1) != scores.argmax(1))
    assert 0.02 < changed < 0.98, changed
    bound = argmax_fraction_bound(plain, scores)
    assert abs(float(out["rectify_changed"]) - changed) <= bound
    agreement = np.mean(cu_logits.argmax(1) == ca_logits.argmax(1))
    assert 0.0 < agreement < 1.0
    bound = argmax_fraction_bound(cu_logits, ca_logits)
    assert abs(float(out["teacher_agreement"]) - agreement) <= bound

    # Losses, metrics, gradients.
    ref_norm = np.sqrt(sum(np.sum(g**2) for g in ref_grads.values()))
    for name, value, ref in (
        ("loss_source", out["loss_source"], ref_src),
        ("loss_target", out["loss_target"], ref_tgt),
        ("loss", loss, ref_src + ref_tgt),
        ("metrics loss", metrics["loss"], ref_src + ref_tgt),
        ("grad_norm", metrics["grad_norm"], ref_norm),
    ):
        assert abs(float(value) - ref) <= REL64 * abs(ref), (mode, name, float(value), ref)
    assert set(metrics) == {"loss", "grad_norm", *method.metric_names}
    pairs = paired(grads, "params", ref_grads)
    grad_scale = max(np.abs(ref).max() for _, _, ref in pairs)
    assert_within(pairs, REL64 * grad_scale, f"{mode} gradients")

    # The update: one AdamW step (elementwise, see adam_param_bound) and the student's BN
    # statistics (source then target forward, as the reference). No EMA teacher in CKD.
    assert type(new_state) is TrainState and int(new_state.step) == 1
    ref_state = numpy_state_dict(student_t)
    grads_by_name = {name: ref for name, _, ref in pairs}
    worst = 0.0
    for name, value, ref in paired(new_state.params, "params", ref_state):
        lr = group_lr(name, config.optim, 0, config.num_steps)
        bound = adam_param_bound(lr, REL64 * grad_scale, grads_by_name[name], ref)
        assert np.all(np.abs(value - ref) <= bound), (mode, name)
        worst = max(worst, float(np.max(np.abs(value - ref))))
    print(f"{mode} parameters: max error {worst:.3g}")
    pairs = paired(new_state.batch_stats, "batch_stats", ref_state)
    scale = max(np.abs(ref).max() for _, _, ref in pairs)
    assert_within(pairs, REL64 * scale, f"{mode} BN statistics")


def test_plain_ensemble_without_rectification():
    """proto_rectify off: 0.5/0.5 softmax ensemble (rectify_on_prob has no effect), and the
    soft target is the plain logit average; closed forms in numpy, float64."""
    rng = np.random.default_rng(0)
    l_cu, l_ca = (rng.normal(size=(2, 6, 7, 19)) * 3 for _ in range(2))

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    probs = 0.5 * softmax(l_cu) + 0.5 * softmax(l_ca)
    confidence = np.sort(probs.max(-1).ravel())
    threshold = float(0.5 * (confidence[41] + confidence[42]))  # between the middle two of 84
    assert np.min(np.abs(confidence - threshold)) > 2.0**-40
    with jax.enable_x64(True):
        logits = (jnp.asarray(l_cu), jnp.asarray(l_ca))
        for on_prob in (True, False):
            out = ensemble.ensemble_targets(
                logits, None, soft=False, on_probabilities=on_prob,
                use_confidence_weight=True, threshold=threshold,
            )  # fmt: skip
            labels = np.asarray(out["pseudo_labels"])
            assert_argmax_agrees(labels, probs, -1, 2.0**-40, "plain ensemble")
            np.testing.assert_array_equal(labels, probs.argmax(-1))  # no near-tie here
            weight = np.mean(probs.max(-1) >= threshold)
            assert 0 < weight < 1
            np.testing.assert_allclose(np.asarray(out["pseudo_weight"]), weight, rtol=2.0**-40)
            assert "rectify_changed" not in out
            agree = np.mean(l_cu.argmax(-1) == l_ca.argmax(-1))
            np.testing.assert_allclose(float(out["teacher_agreement"]), agree, rtol=FRACTION64)
        out = ensemble.ensemble_targets(
            logits, None, soft=True, on_probabilities=True, use_confidence_weight=False,
            threshold=0.968,
        )  # fmt: skip
        target = np.asarray(out["soft_target"])
    assert target.dtype == np.float64
    np.testing.assert_allclose(target, 0.5 * (l_cu + l_ca), rtol=2.0**-50, atol=2.0**-50)


# --- inputs: teachers and prototype files -------------------------------------------------


def tiny_model_config():
    model_cfg = default.get_model_config()
    model_cfg.backbone = "resnet18_v1c"
    model_cfg.base_channels = 16
    model_cfg.head_channels = 16
    # 'lax', not 'im2col': for a few steps XLA's compile time dominates, and it is about
    # half with lax convolutions.
    model_cfg.conv_impl = "lax"
    return model_cfg


def random_variables(model_cfg, seed):
    """Variables of the model's shapes without running it (He-like params, unit BN stats)."""
    rng = np.random.default_rng(seed)
    shapes = models.variable_shapes(models.build_model(model_cfg))

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name or "scale" in name:
            return np.ones(s.shape, np.float32)
        if "mean" in name or "bias" in name:
            return rng.normal(size=s.shape).astype(np.float32) * 0.1
        fan_in = int(np.prod(s.shape[:-1]))
        return rng.normal(size=s.shape).astype(np.float32) * np.sqrt(2.0 / fan_in)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two teachers (random init, distinct) exported as model directories, their prototype
    files, and one teacher of another architecture."""
    root = tmp_path_factory.mktemp("ckd_inputs")
    model_cfg = tiny_model_config()
    paths = {}
    for i, name in enumerate(("cu", "ca")):
        variables = random_variables(model_cfg, i)
        paths[f"teacher_{name}"] = str(root / f"r1_{name}" / "export")
        checkpoints.save_model_dir(paths[f"teacher_{name}"], variables, model_cfg)
        paths[f"prototypes_{name}"] = str(root / f"r1_proto_{name}" / "prototypes.npz")
        table = np.random.default_rng(i).normal(size=(19, 16))
        prototype_io.save_prototypes(paths[f"prototypes_{name}"], table, np.full(19, 5.0))
    other_cfg = tiny_model_config()
    other_cfg.head_channels = 8
    paths["other"] = str(root / "other" / "export")
    checkpoints.save_model_dir(paths["other"], random_variables(other_cfg, 2), other_cfg)
    return root, paths


def ckd_config(paths, **overrides):
    config = make_config("ckd", dtype="float32")
    config.model = tiny_model_config()
    for key in ("teacher_cu", "teacher_ca", "prototypes_cu", "prototypes_ca"):
        config.ckd[key] = paths[key]
    config.ckd.update(overrides)
    return config


def test_missing_teacher_names_key_and_producing_stage(exported, tmp_path):
    _, paths = exported
    config = ckd_config(paths, teacher_cu=str(tmp_path / "runs" / "r1_cu" / "export"))
    with pytest.raises(checkpoints.CheckpointError, match="config.ckd.teacher_cu") as err:
        teachers.load_teachers(config)
    assert "r1_cu" in str(err.value) and "self-training" in str(err.value)
    config = ckd_config(paths, teacher_ca="")
    with pytest.raises(checkpoints.CheckpointError, match="config.ckd.teacher_ca.*not set"):
        teachers.load_teachers(config)


def test_missing_prototypes_name_producing_stage(exported, tmp_path):
    _, paths = exported
    missing = str(tmp_path / "r1_proto_ca" / "prototypes.npz")
    config = ckd_config(paths, prototypes_ca=missing)
    with pytest.raises(prototype_io.PrototypeError, match="config.ckd.prototypes_ca") as err:
        teachers.load_teachers(config)
    assert missing in str(err.value) and "stage 'prototypes'" in str(err.value)
    assert "r1_proto_ca" in str(err.value)
    # Without rectification the prototype files are not needed (and not loaded).
    config = ckd_config(paths, prototypes_ca=missing, prototypes_cu="", proto_rectify=False)
    loaded = teachers.load_teachers(config)
    assert set(loaded) == {"cu", "ca"} and "prototypes" not in loaded["cu"]


def test_wrong_prototype_shape_is_refused(exported, tmp_path):
    _, paths = exported
    bad = str(tmp_path / "bad.npz")
    prototype_io.save_prototypes(bad, np.zeros((19, 32)), np.ones(19))
    with pytest.raises(prototype_io.PrototypeError, match="config.ckd.prototypes_cu.*16"):
        teachers.load_teachers(ckd_config(paths, prototypes_cu=bad))


def test_teacher_of_another_architecture_is_refused(exported):
    _, paths = exported
    config = ckd_config(paths, teacher_ca=paths["other"])
    with pytest.raises(checkpoints.CheckpointError, match="teacher_ca") as err:
        teachers.load_teachers(config)
    assert "head_channels" in str(err.value) and "8" in str(err.value)


def test_teacher_with_other_tensors_is_refused(exported, tmp_path):
    """model.json agrees but the tensors do not (a hand-edited or foreign directory)."""
    _, paths = exported
    variables, model_cfg = checkpoints.load_model_dir(paths["teacher_ca"])
    del variables["params"]["decode_head"]["conv_seg"]
    bad = str(tmp_path / "bad_teacher")
    checkpoints.save_model_dir(bad, variables, model_cfg)
    with pytest.raises(checkpoints.CheckpointError, match="config.ckd.teacher_ca") as err:
        teachers.load_teachers(ckd_config(paths, teacher_ca=bad))
    assert "missing tensors" in str(err.value) and "conv_seg" in str(err.value)


def test_bad_settings_are_refused(exported):
    _, paths = exported
    config = ckd_config(paths)
    config.st.mask = "cut"
    with pytest.raises(teachers.DistillationConfigError, match="config.st.mask"):
        teachers.check_config(config)
    with pytest.raises(teachers.DistillationConfigError, match="config.ckd.teacher_dtype"):
        teachers.check_config(ckd_config(paths, teacher_dtype="float16"))


def test_bfloat16_teachers_are_stored_in_bfloat16(exported):
    _, paths = exported
    loaded = teachers.load_teachers(ckd_config(paths, teacher_dtype="bfloat16"))
    for name in ("cu", "ca"):
        variables = loaded[name]["variables"]
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(variables["params"]))
        stats = jax.tree_util.tree_leaves(variables["batch_stats"])
        assert stats and all(x.dtype == np.float32 for x in stats)
        assert loaded[name]["prototypes"].dtype == np.float32


def test_teacher_shapes_are_the_loaded_teachers(exported, tmp_path):
    """The compile-only check's abstract teachers (no file read) are what the stage loads:
    the same tree, shapes and dtypes, for both teacher dtypes, with and without prototypes."""
    from ddb_jax import methods
    from ddb_jax.methods import registry

    _, paths = exported
    for overrides in ({}, {"teacher_dtype": "bfloat16"}, {"proto_rectify": False}):
        config = ckd_config(paths, **overrides)
        loaded = registry.shapes_of(methods.load_frozen(config))
        assert methods.frozen_shapes(config) == loaded, overrides
        # ... and the shapes need none of the files.
        missing = {k: str(tmp_path / "missing" / k) for k in paths}
        assert methods.frozen_shapes(ckd_config(missing, **overrides)) == loaded
    with pytest.raises(teachers.DistillationConfigError, match="teacher_dtype"):
        methods.frozen_shapes(ckd_config(paths, teacher_dtype="float16"))


# --- the stage on toy data -----------------------------------------------------------------


def summary_tags(workdir):
    import tensorflow as tf

    tags = set()
    for name in os.listdir(workdir):
        if name.startswith("events.out"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                tags.update(v.tag for v in event.summary.value)
    return tags


def test_stage_runs_on_toy_data(exported, tmp_path):
    root, paths = exported
    toy.main(["--out", str(root / "data" / "toy"), "--num-train", "4", "--num-val", "2"])
    # bf16 teachers: the cast parameters go through the jitted, sharded step.
    config = ckd_config(paths, teacher_dtype="bfloat16")
    config.data.root = str(root / "data")
    config.data.source = ("toy_source",)
    config.data.target = ("toy_target",)
    config.data.crop_size = (64, 64)
    config.batch_size = 2
    config.mesh_devices = 1
    config.num_steps = 3
    config.checkpoint_every = 2
    config.log_every = 1
    config.eval_every = 0
    config.image_summary_every = 3  # the preview runs once (jitted, with the teachers)
    workdir = str(tmp_path / "ckd")
    state, _ = loop.train_and_evaluate(config, workdir)
    assert int(state.step) == 3
    exported_vars, model_cfg = checkpoints.load_model_dir(
        os.path.join(workdir, workdir_lib.EXPORT_DIR)
    )
    assert model_cfg.head_channels == 16
    with open(os.path.join(workdir, workdir_lib.RESULT_JSON)) as f:
        assert json.load(f)["step"] == 3
    assert "ckd" in summary_tags(workdir)  # the preview image of step 3
    # The latest checkpoint is step 3 and restores to the final state (CKD's state has no
    # EMA teacher).
    ckpt = checkpointing.Checkpoints(workdir, 3)
    try:
        assert checkpointing.latest_complete_step(ckpt.manager) == 3
        restored, step = ckpt.restore_latest(state)
    finally:
        ckpt.close()
    assert step == 3 and int(restored.step) == 3
    assert type(restored) is TrainState and not hasattr(restored, "ema_params")
    for a, b in zip(
        jax.tree_util.tree_leaves(exported_vars["params"]),
        jax.tree_util.tree_leaves(restored.params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, np.asarray(b))
