"""The self-training step against a PyTorch reference step, and across device counts.

The reference step (torch_ref/self_training.py) is written from DDB's
``ST.forward_train`` semantics with the mmseg-named torch model of torch_ref;
the same bridging and augmentation draws are fed to both sides.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import default
from ddb_jax import bridging, models
from ddb_jax.convert import resnet as resnet_names
from ddb_jax.convert.common import convert_state_dict, path_to_str
from ddb_jax.train import optim
from ddb_jax.train import self_training as st
from ddb_jax.train.state import create_train_state
from torch_ref.augment import random_draw as fixed_params
from torch_ref.common import nchw, numpy_state_dict
from torch_ref.optim import make_optimizer
from torch_ref.resnet_dlv2 import Segmentor, randomize
from torch_ref.self_training import torch_reference_step

H, W = 32, 40
LR, STEPS = 1e-3, 10


def make_config():
    config = default.get_config()
    config.model.backbone = "resnet18_v1c"
    config.model.dropout_ratio = 0.0
    config.optim.lr = LR
    config.optim.warmup_iters = 0
    config.num_steps = STEPS
    config.st.mask = "class"
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


def make_draws(batch, seed):
    masks = np.asarray(
        bridging.make_masks(jax.random.PRNGKey(seed), batch["source_label"], "class")
    )
    augs = [
        fixed_params(seed, jitter=True, blur=True),
        fixed_params(seed + 1, jitter=True, blur=False),
    ]
    stacked = {k: jnp.asarray(np.stack([np.asarray(a[k]) for a in augs])) for k in augs[0]}
    return {"masks": jnp.asarray(masks), "aug": stacked}, masks, augs


def assert_mostly_close(ours_and_refs, tight: float):
    """Adam's first steps move each element by ~lr*sign(grad): where a gradient is ~0 its
    sign is float noise, so a handful of elements may differ by up to 2x the (head) rate.
    Nearly all elements must agree to ``tight``; none by more than the rate bound."""
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in ours_and_refs])
    assert np.mean(diffs <= tight) >= 0.999, np.mean(diffs <= tight)
    assert diffs.max() <= 4 * LR * 10


@torch.no_grad()
def load_into_torch(model, params):
    named = dict(model.named_parameters())
    for path, value in flat_with_names(params, "params"):
        key = resnet_names.torch_name(path).key
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        named[key].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def torch_value(state_dict, path):
    src = resnet_names.torch_name(path)
    return src.transform(state_dict[src.key])


def flat_with_names(tree, collection):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [((collection, *path_to_str(p).split("/")), np.asarray(v)) for p, v in leaves]


@pytest.fixture(scope="module")
def setup():
    config = make_config()
    torch.manual_seed(0)
    student_t = randomize(Segmentor(18, num_classes=19, dropout=0.0), seed=3)
    teacher_t = copy.deepcopy(student_t)
    # A threshold at the median confidence of this random teacher keeps 0 < w < 1.
    with torch.no_grad():
        logits = copy.deepcopy(teacher_t).train()(nchw(make_batch(10)["target_image"]))[0]
        config.st.pseudo_threshold = float(torch.softmax(logits, 1).max(1)[0].median())
    opt = make_optimizer(student_t, config.optim)
    model = models.build_model(config.model)
    shapes = models.variable_shapes(model)
    variables = convert_state_dict(numpy_state_dict(student_t), shapes, resnet_names.torch_name)
    tx, _ = optim.make_optimizer(config.optim, config.num_steps)
    state = create_train_state(
        jax.tree_util.tree_map(jnp.asarray, variables), tx, jax.random.PRNGKey(0)
    )
    teacher = models.build_model(st.no_dropout(config.model))
    kwargs = dict(student_apply=model.apply, teacher_apply=teacher.apply, st_cfg=config.st)
    return config, student_t, teacher_t, opt, state, tx, kwargs


def test_step_matches_pytorch_reference(setup):
    config, student_t, teacher_t, opt, state, tx, kwargs = setup
    step = jax.jit(functools.partial(st.self_training_step, tx=tx, **kwargs))
    grads_fn = jax.jit(functools.partial(st.self_training_grads, **kwargs))
    for it in range(2):
        batch = make_batch(seed=10 + it)
        draws, masks, augs = make_draws(batch, seed=20 + it)
        grads, aux = grads_fn(state, batch, draws=draws)
        ref_src, ref_mix, ref_grads, ref_weight, ref_extra = torch_reference_step(
            student_t, teacher_t, opt, it, batch, masks, augs, config,
            use_pseudo=np.asarray(aux["pseudo_labels"]),
        )  # fmt: skip
        ref_loss = ref_src + ref_mix
        assert 0.0 < ref_weight < 1.0
        np.testing.assert_allclose(float(aux["pseudo_weight"]), ref_weight, rtol=1e-6)
        np.testing.assert_allclose(float(aux["loss_source"]), ref_src, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(aux["mixed_image"]), ref_extra["mixed"], atol=1e-4)
        assert np.mean(np.asarray(aux["pseudo_labels"]) == ref_extra["pseudo"]) >= 0.995
        np.testing.assert_allclose(
            float(aux["loss_mixed"]), ref_mix, rtol=1e-4 if it == 0 else 1e-3
        )
        # Gradients at iteration 0 only: after one AdamW step the two students differ by ~lr
        # on the few elements whose gradient sign is float noise, which moves later
        # gradients by ~1e-3 relative.
        pairs = []
        for path, ours in flat_with_names(grads, "params") if it == 0 else []:
            src = resnet_names.torch_name(path)
            pairs.append((path, ours, src.transform(ref_grads[src.key])))
        scale = max((np.abs(ref).max() for _, _, ref in pairs), default=0.0)
        for path, ours, ref in pairs:
            assert np.abs(ours - ref).max() <= 1e-3 * scale, path
        state, metrics = step(state, batch, draws=draws)
        np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-4)
        if it == 0:
            assert_mostly_close(
                [
                    (v, torch_value(numpy_state_dict(student_t), p))
                    for p, v in flat_with_names(state.params, "params")
                ],
                tight=1e-2 * LR,
            )
            # Re-sync the torch student to ours, so the few lr-sized sign-noise elements do
            # not leak into iteration 1 (EMA ramp, teacher and student BN statistics).
            load_into_torch(student_t, state.params)

    ref_student = numpy_state_dict(student_t)
    ref_teacher = numpy_state_dict(teacher_t)
    # Teacher: EMA params and its own BN running statistics (train-mode forward on targets).
    assert_mostly_close(
        [
            (ours, torch_value(ref_teacher, p))
            for p, ours in flat_with_names(state.ema_params, "params")
        ],
        tight=1e-2 * LR,
    )
    for path, ours in flat_with_names(state.ema_params, "params"):
        np.testing.assert_allclose(ours, torch_value(ref_teacher, path), rtol=1e-4, atol=1e-6)
    for path, ours in flat_with_names(state.ema_batch_stats, "batch_stats"):
        np.testing.assert_allclose(ours, torch_value(ref_teacher, path), rtol=1e-4, atol=1e-5)
    for path, ours in flat_with_names(state.batch_stats, "batch_stats"):
        np.testing.assert_allclose(ours, torch_value(ref_student, path), rtol=1e-4, atol=1e-5)
    assert_mostly_close(
        [
            (ours, torch_value(ref_student, p))
            for p, ours in flat_with_names(state.params, "params")
        ],
        tight=1e-2 * LR,
    )


def test_step_is_independent_of_device_count(setup):
    config, _, _, _, state0, tx, kwargs = setup
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    rng = np.random.default_rng(5)
    batch = {
        "source_image": rng.normal(size=(8, 24, 24, 3)).astype(np.float32),
        "source_label": rng.integers(0, 19, size=(8, 24, 24)).astype(np.int32),
        "target_image": rng.normal(size=(8, 24, 24, 3)).astype(np.float32),
    }
    results = []
    for num_devices in (1, 8):
        mesh = Mesh(jax.devices()[:num_devices], ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        sharded = NamedSharding(mesh, PartitionSpec("data"))
        step = jax.jit(
            functools.partial(st.self_training_step, tx=tx, **kwargs),
            in_shardings=(replicated, sharded),
            out_shardings=(replicated, replicated),
        )
        state = jax.device_put(state0, replicated)
        state, metrics = step(state, jax.device_put(batch, sharded))
        results.append((jax.device_get(state), jax.device_get(metrics)))
    (state_1, metrics_1), (state_8, metrics_8) = results
    np.testing.assert_allclose(metrics_1["loss"], metrics_8["loss"], rtol=1e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves((state_1.batch_stats, state_1.ema_batch_stats)),
        jax.tree_util.tree_leaves((state_8.batch_stats, state_8.ema_batch_stats)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    pairs = zip(
        jax.tree_util.tree_leaves(state_1.params),
        jax.tree_util.tree_leaves(state_8.params),
        strict=True,
    )
    assert_mostly_close(list(pairs), tight=1e-5)
