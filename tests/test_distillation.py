"""The CKD step against a PyTorch reference step, CKD's input checks, and a toy stage run.

The reference step (torch_ref/ckd.py) follows DDB's ``CKD.forward_train``: source
CE backward; both teachers in eval mode on the clean target, logits and features resized
to the image size; prototype weights and the rectified ensemble (on probabilities or on
logits) or the soft KL target; target loss backward; one AdamW step with the head at 10x.
Both sides get the same strong-augmentation draws.
"""

import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from configs import default
from ddb_jax import checkpoints, models, prototype_io
from ddb_jax.convert import resnet as resnet_names
from ddb_jax.convert.common import convert_state_dict
from ddb_jax.train import distillation as ckd
from ddb_jax.train import loop, optim
from ddb_jax.train.state import create_train_state
from input_pipeline import toy
from tests.test_self_training import LR, STEPS, assert_mostly_close, flat_with_names
from torch_ref import ckd as torch_ckd
from torch_ref.augment import random_draw as fixed_params
from torch_ref.augment import strong as torch_strong
from torch_ref.common import nchw, numpy_state_dict
from torch_ref.optim import mmcv_lr
from torch_ref.resnet_dlv2 import (
    Segmentor,
    center_classifier,
    randomize,
)

H, W = 32, 40


def make_config(**ckd_overrides):
    config = default.get_config()
    config.stage = "ckd"
    config.model.backbone = "resnet18_v1c"
    config.model.dropout_ratio = 0.0
    config.optim.lr = LR
    config.optim.warmup_iters = 0
    config.num_steps = STEPS
    config.st.mask = "zero"
    config.ckd.update(ckd_overrides)
    return config


def make_batch(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, size=(2, H, W)).astype(np.int32)
    labels[:, :3] = 255
    return {
        "source_image": rng.normal(size=(2, H, W, 3)).astype(np.float32),
        "source_label": labels,
        "target_image": rng.normal(size=(2, H, W, 3)).astype(np.float32),
    }


def make_draws(seed):
    augs = [fixed_params(seed, jitter=True, blur=True), fixed_params(seed + 1, blur=False)]
    stacked = {k: jnp.asarray(np.stack([np.asarray(a[k]) for a in augs])) for k in augs[0]}
    return {"masks": jnp.zeros((2, H, W), bool), "aug": stacked}, augs


def to_flax(torch_model, shapes):
    variables = convert_state_dict(numpy_state_dict(torch_model), shapes, resnet_names.torch_name)
    return jax.tree_util.tree_map(jnp.asarray, variables)


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread():
    """The reference step is tiny: torch's thread pool only costs time on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """Random student and two distinct random teachers (non-trivial BN statistics), torch and
    Flax, and prototype tables that change some of the ensemble's labels."""
    torch.manual_seed(0)
    batch = make_batch(10)
    xt = nchw(batch["target_image"])
    student_t = randomize(Segmentor(18, num_classes=19, dropout=0.0), seed=3)
    cu_t = center_classifier(randomize(Segmentor(18, num_classes=19, dropout=0.0), seed=4), xt)
    ca_t = center_classifier(randomize(Segmentor(18, num_classes=19, dropout=0.0), seed=5), xt)
    config = make_config()
    shapes = models.variable_shapes(models.build_model(config.model))
    # Prototypes: features of random pixels of each teacher, moved by noise, so no pixel
    # sits at distance 0 and the weights are neither one-hot nor flat.
    rng = np.random.default_rng(7)
    vectors, teachers = {}, {}
    for name, model in (("cu", cu_t), ("ca", ca_t)):
        with torch.no_grad():
            _, feat = torch_ckd.encode_decode(model.eval(), xt, True)
        flat = feat.numpy().transpose(0, 2, 3, 1).reshape(-1, feat.shape[1])
        picks = flat[rng.choice(len(flat), 19, replace=False)]
        table = picks + rng.normal(size=picks.shape).astype(np.float32) * flat.std()
        vectors[name] = torch.from_numpy(table.astype(np.float32))
        teachers[name] = {
            "variables": to_flax(model, shapes),
            "prototypes": jnp.asarray(table, jnp.float32),
        }
    return batch, student_t, cu_t, ca_t, vectors, teachers, shapes


def torch_optimizer(student):
    head = [p for n, p in student.named_parameters() if n.startswith("decode_head")]
    body = [p for n, p in student.named_parameters() if not n.startswith("decode_head")]
    opt = torch.optim.AdamW(
        [{"params": body}, {"params": head}], lr=LR, betas=(0.9, 0.999), weight_decay=0.01
    )
    for group, mult in zip(opt.param_groups, (1.0, 10.0), strict=True):
        group["lr"] = mmcv_lr(0, LR * mult, STEPS, 0, 1e-6)
    return opt


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


def threshold_between_confidences(reference, config):
    """A pseudo threshold halfway between two neighbouring ensemble confidences near the
    median, so 0 < weight < 1 and no pixel sits at the threshold."""
    batch, _, cu_t, ca_t, vectors, _, _ = reference
    cfg = dict(reference_cfg(config), use_pl_weight=False)
    probe = copy.deepcopy(cu_t)  # any model: only the teachers' ensemble is used
    opt = torch_optimizer(probe)
    xs, xt = nchw(batch["source_image"]), nchw(batch["target_image"])
    ys = torch.from_numpy(batch["source_label"])
    extra = torch_ckd.ckd_step(probe, cu_t, ca_t, vectors, opt, xs, ys, xt, xt, cfg)[3]
    conf = np.sort(extra["ensemble"].max(1).ravel())
    mid = len(conf) // 2
    return float(0.5 * (conf[mid] + conf[mid + 1]))


MODES = {
    "rectify_on_prob": dict(proto_rectify=True, rectify_on_prob=True),
    "rectify_on_logits_pl_weight": dict(
        proto_rectify=True, rectify_on_prob=False, use_pl_weight=True
    ),
    "soft_distill": dict(proto_rectify=True, soft_distill=True, temperature=2.0),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_step_matches_pytorch_reference(reference, mode):
    batch, student_t0, cu_t, ca_t, vectors, teachers, shapes = reference
    config = make_config(**MODES[mode])
    if config.ckd.use_pl_weight:
        config.st.pseudo_threshold = threshold_between_confidences(reference, config)
    student_t = copy.deepcopy(student_t0)
    opt = torch_optimizer(student_t)
    model = models.build_model(config.model)
    teacher = models.build_model(ckd.teacher_model_config(config))
    tx, _ = optim.make_optimizer(config.optim, config.num_steps)
    state = create_train_state(to_flax(student_t, shapes), tx, jax.random.PRNGKey(0))
    state = state.replace(ema_params={}, ema_batch_stats={})
    kwargs = dict(
        student_apply=model.apply, teacher_apply=teacher.apply, ckd_cfg=config.ckd, st_cfg=config.st
    )
    draws, augs = make_draws(seed=20)

    grads, aux = jax.jit(functools.partial(ckd.distillation_grads, **kwargs))(
        state, batch, teachers, draws=draws
    )
    ours_pseudo = np.asarray(aux["pseudo_labels"])
    xs, xt = nchw(batch["source_image"]), nchw(batch["target_image"])
    ys = torch.from_numpy(batch["source_label"])
    stu_tgt = torch.stack(
        [
            torch.from_numpy(torch_strong(batch["target_image"][i], augs[i]).transpose(2, 0, 1))
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(
        np.asarray(aux["student_image"]), stu_tgt.numpy().transpose(0, 2, 3, 1), atol=1e-4
    )
    ref_src, ref_tgt, ref_grads, extra = torch_ckd.ckd_step(
        student_t, cu_t, ca_t, vectors, opt, xs, ys, xt, stu_tgt, reference_cfg(config),
        use_pseudo=None if config.ckd.soft_distill else ours_pseudo,
    )  # fmt: skip

    # Labels equal except at near-ties of the reference ensemble (or soft target).
    ensemble = extra["target"] if config.ckd.soft_distill else extra["ensemble"]
    ref_pseudo = ensemble.argmax(1)
    top2 = np.sort(ensemble, axis=1)[:, -2:]
    differ = ours_pseudo != ref_pseudo
    assert np.all((top2[:, 1] - top2[:, 0])[differ] < 1e-5)
    assert np.mean(differ) < 0.01
    if not config.ckd.soft_distill:
        np.testing.assert_array_equal(ref_pseudo, extra["pseudo"])
        # The prototypes matter: rectification changes some labels, and not all.
        changed = np.mean(extra["plain_labels"] != ref_pseudo)
        assert 0.02 < changed < 0.98, changed
        np.testing.assert_allclose(float(aux["rectify_changed"]), changed, atol=0.01)
        np.testing.assert_allclose(float(aux["pseudo_weight"]), extra["weight"], rtol=1e-6)
        if config.ckd.use_pl_weight:
            assert 0.0 < extra["weight"] < 1.0
    assert 0.0 < float(aux["teacher_agreement"]) < 1.0
    np.testing.assert_allclose(float(aux["loss_source"]), ref_src, rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss_target"]), ref_tgt, rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss"]), ref_src + ref_tgt, rtol=1e-5)
    metrics = ckd.step_metrics(aux, grads)
    assert set(metrics) == set(ckd.METRICS) | {"grad_norm"}
    ref_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in ref_grads.values()))
    np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norm, rtol=1e-3)

    pairs = []
    for path, ours in flat_with_names(grads, "params"):
        src = resnet_names.torch_name(path)
        pairs.append((path, ours, src.transform(ref_grads[src.key])))
    scale = max(np.abs(ref).max() for _, _, ref in pairs)
    for path, ours, ref in pairs:
        assert np.abs(ours - ref).max() <= 1e-3 * scale, path

    if mode != "rectify_on_prob":
        return
    # The update: one AdamW step and the student's BN statistics (the stage test runs the
    # composed distillation_step; compiling it here again would double this test's time).
    new_state = jax.jit(functools.partial(ckd.apply_gradients, tx=tx))(
        state, grads, aux["batch_stats"]
    )
    assert int(new_state.step) == 1 and new_state.ema_params == {}
    ref_state = numpy_state_dict(student_t)

    def ref_value(path):
        src = resnet_names.torch_name(path)
        return src.transform(ref_state[src.key])

    assert_mostly_close(
        [(v, ref_value(p)) for p, v in flat_with_names(new_state.params, "params")],
        tight=1e-2 * LR,
    )
    for path, ours in flat_with_names(new_state.batch_stats, "batch_stats"):
        np.testing.assert_allclose(ours, ref_value(path), rtol=1e-4, atol=1e-5)


def test_plain_ensemble_without_rectification():
    """proto_rectify off: 0.5/0.5 softmax ensemble (rectify_on_prob has no effect), and the
    soft target is the plain logit average; closed forms in numpy."""
    rng = np.random.default_rng(0)
    l_cu, l_ca = (rng.normal(size=(2, 6, 7, 19)).astype(np.float32) * 3 for _ in range(2))
    preds = {"cu": {"logits": jnp.asarray(l_cu)}, "ca": {"logits": jnp.asarray(l_ca)}}

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    ensemble = 0.5 * softmax(l_cu) + 0.5 * softmax(l_ca)
    for on_prob in (True, False):
        cfg = make_config(proto_rectify=False, rectify_on_prob=on_prob, use_pl_weight=True).ckd
        threshold = float(np.median(ensemble.max(-1)))
        out = ckd.ensemble_targets(preds, cfg, threshold)
        np.testing.assert_array_equal(np.asarray(out["pseudo_labels"]), ensemble.argmax(-1))
        weight = np.mean(ensemble.max(-1) >= threshold)
        np.testing.assert_allclose(np.asarray(out["pseudo_weight"]), weight, rtol=1e-6)
        assert "rectify_changed" not in out
        agree = np.mean(l_cu.argmax(-1) == l_ca.argmax(-1))
        np.testing.assert_allclose(float(out["teacher_agreement"]), agree, rtol=1e-6)
    cfg = make_config(proto_rectify=False, soft_distill=True).ckd
    out = ckd.ensemble_targets(preds, cfg, 0.968)
    np.testing.assert_allclose(np.asarray(out["soft_target"]), 0.5 * (l_cu + l_ca), rtol=1e-6)


# --- inputs: teachers and prototype files -------------------------------------------------


def tiny_model_config():
    model_cfg = default.get_model_config()
    model_cfg.backbone = "resnet18_v1c"
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
    config = make_config()
    config.model = tiny_model_config()
    for key in ("teacher_cu", "teacher_ca", "prototypes_cu", "prototypes_ca"):
        config.ckd[key] = paths[key]
    config.ckd.update(overrides)
    return config


def test_missing_teacher_names_key_and_producing_stage(exported, tmp_path):
    _, paths = exported
    config = ckd_config(paths, teacher_cu=str(tmp_path / "runs" / "r1_cu" / "export"))
    with pytest.raises(checkpoints.CheckpointError, match="config.ckd.teacher_cu") as err:
        ckd.load_teachers(config)
    assert "r1_cu" in str(err.value) and "self-training" in str(err.value)
    config = ckd_config(paths, teacher_ca="")
    with pytest.raises(checkpoints.CheckpointError, match="config.ckd.teacher_ca.*not set"):
        ckd.load_teachers(config)


def test_missing_prototypes_name_producing_stage(exported, tmp_path):
    _, paths = exported
    missing = str(tmp_path / "r1_proto_ca" / "prototypes.npz")
    config = ckd_config(paths, prototypes_ca=missing)
    with pytest.raises(prototype_io.PrototypeError, match="config.ckd.prototypes_ca") as err:
        ckd.load_teachers(config)
    assert missing in str(err.value) and "stage 'prototypes'" in str(err.value)
    assert "r1_proto_ca" in str(err.value)
    # Without rectification the prototype files are not needed (and not loaded).
    config = ckd_config(paths, prototypes_ca=missing, prototypes_cu="", proto_rectify=False)
    teachers = ckd.load_teachers(config)
    assert set(teachers) == {"cu", "ca"} and "prototypes" not in teachers["cu"]


def test_wrong_prototype_shape_is_refused(exported, tmp_path):
    _, paths = exported
    bad = str(tmp_path / "bad.npz")
    prototype_io.save_prototypes(bad, np.zeros((19, 32)), np.ones(19))
    with pytest.raises(prototype_io.PrototypeError, match="config.ckd.prototypes_cu.*16"):
        ckd.load_teachers(ckd_config(paths, prototypes_cu=bad))


def test_teacher_of_another_architecture_is_refused(exported):
    _, paths = exported
    config = ckd_config(paths, teacher_ca=paths["other"])
    with pytest.raises(checkpoints.CheckpointError, match="teacher_ca") as err:
        ckd.load_teachers(config)
    assert "head_channels" in str(err.value) and "8" in str(err.value)


def test_teacher_with_other_tensors_is_refused(exported, tmp_path):
    """model.json agrees but the tensors do not (a hand-edited or foreign directory)."""
    _, paths = exported
    variables, model_cfg = checkpoints.load_model_dir(paths["teacher_ca"])
    del variables["params"]["decode_head"]["conv_seg"]
    bad = str(tmp_path / "bad_teacher")
    checkpoints.save_model_dir(bad, variables, model_cfg)
    with pytest.raises(checkpoints.CheckpointError, match="config.ckd.teacher_ca") as err:
        ckd.load_teachers(ckd_config(paths, teacher_ca=bad))
    assert "missing tensors" in str(err.value) and "conv_seg" in str(err.value)


def test_bad_settings_are_refused(exported):
    _, paths = exported
    config = ckd_config(paths)
    config.st.mask = "cut"
    with pytest.raises(ckd.DistillationConfigError, match="config.st.mask"):
        ckd.check_config(config)
    with pytest.raises(ckd.DistillationConfigError, match="config.ckd.teacher_dtype"):
        ckd.check_config(ckd_config(paths, teacher_dtype="float16"))


def test_bfloat16_teachers_are_stored_in_bfloat16(exported):
    _, paths = exported
    teachers = ckd.load_teachers(ckd_config(paths, teacher_dtype="bfloat16"))
    for name in ("cu", "ca"):
        variables = teachers[name]["variables"]
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(variables["params"]))
        stats = jax.tree_util.tree_leaves(variables["batch_stats"])
        assert stats and all(x.dtype == np.float32 for x in stats)
        assert teachers[name]["prototypes"].dtype == np.float32


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
    state, _ = ckd.train_and_evaluate(config, workdir)
    assert int(state.step) == 3
    exported_vars, model_cfg = checkpoints.load_model_dir(os.path.join(workdir, loop.EXPORT_DIR))
    assert model_cfg.head_channels == 16
    with open(os.path.join(workdir, loop.RESULT_JSON)) as f:
        assert json.load(f)["step"] == 3
    assert loop.make_checkpoint_manager(workdir, 3).latest_step() == 3
    assert "ckd" in summary_tags(workdir)  # the preview image of step 3
    # The checkpoint (empty EMA fields included) restores to the final state.
    manager = loop.make_checkpoint_manager(workdir, 3)
    restored = manager.restore(3, args=ocp.args.StandardRestore(state))
    manager.close()
    assert restored.ema_params == {} and int(restored.step) == 3
    for a, b in zip(
        jax.tree_util.tree_leaves(exported_vars["params"]),
        jax.tree_util.tree_leaves(restored.params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, np.asarray(b))
