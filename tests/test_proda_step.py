"""ProDA's steps against a float64 PyTorch transcription of the reference's
(torch_ref/proda_step.py, microsoft/ProDA ``step`` and ``step_distillation``): one full
update of stage 1 and of stage 2, ResNet-18 DLV2 (tiny widths) on 2 images of 32 x 48 with
5 classes.

Compared: every loss, the denoised and the moved labels (exactly), the teacher's moved
distance maps, the gradients, the parameters after SGD, the BN statistics, and for stage 1
the EMA model and the prototype table. Bounds (REL64 = 2^-33 of each value's scale, as the
other float64 step tests): far above the rounding of the ~2^19 operations behind a value,
and the same on any x86-64 CPU. An SGD step is linear in the gradient, so the parameters
after it are within ``lr`` times the gradient's bound (plus a few ulps).

The strong-view parameters avoid half-pixel ties of the nearest resampling (where float32
rounding picks a side: see ddb_jax/uda/proda_strong.py).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddb_jax import checkpoints, methods, models
from ddb_jax.methods import optim, previews, registry
from ddb_jax.methods.state import TrainState, as_optimizers
from ddb_jax.offline import prototype_io
from tests.parity_support import (
    EPS64,
    REL64,
    assert_within,
    initial_state,
    make_config,
    paired,
    to_flax,
    torch_threads,
)
from torch_ref import proda_step as ref
from torch_ref.common import nchw, numpy_state_dict
from torch_ref.resnet_dlv2 import Segmentor, randomize

NUM_CLASSES = 5
WEAK = (32, 48)  # the weak / strong crop; its quarter is 8 x 12
FULL = (40, 64)  # the whole target image (the EMA's input); quarter 10 x 16
LR = 1e-2  # large enough that the step moves every parameter measurably


class ProDASegmentor(Segmentor):
    """The tiny DLV2 with the reference's output dict (classifier input and output)."""

    def forward(self, x):
        logits, feature = super().forward(x)
        return {"out": logits, "feat": feature}


def torch_model(seed: int) -> ProDASegmentor:
    model = ProDASegmentor(18, num_classes=NUM_CLASSES, dropout=0.0, base_channels=16,
                           channels=32)  # fmt: skip
    return randomize(model, seed=seed).double().train()


def proda_config(stage: str):
    config = make_config(stage)
    config.model.num_classes = NUM_CLASSES
    o = config.optim
    o.kind, o.lr, o.momentum, o.weight_decay, o.poly_power = "sgd", LR, 0.9, 2e-4, 0.9
    o.head_lr_mult = 10.0 if stage == "proda_distill" else 1.0
    config.proda.train_threshold = 0.3
    config.proda.distill_rce = False
    return config


def strong_params() -> dict:
    return {
        "hflip": np.array([True, False]),
        "shear_x": np.array([0.137, 1e4], np.float32),
        "shear_y": np.array([1e4, -0.173], np.float32),
        "translate_x": np.array([1e4, 18], np.float32),
        "translate_y": np.array([-9, 1e4], np.float32),
        "rotate": np.array([1e4, 13], np.float32),
        "cutout": np.array([[4, 8, 20, 20], [30, 0, 46, 12]], np.int32),
    }


def source_batch(rng) -> dict:
    labels = rng.integers(0, NUM_CLASSES, (2, *WEAK)).astype(np.int32)
    labels[:, :3] = 255
    return {"source_image": rng.normal(size=(2, *WEAK, 3)), "source_label": labels}


def stage1_batch(seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    return {
        **source_batch(rng),
        "target_image": rng.normal(size=(2, *WEAK, 3)),
        "target_strong": rng.normal(size=(2, *WEAK, 3)),
        "target_full": rng.normal(size=(2, *FULL, 3)),
        "target_soft_label": rng.dirichlet(np.ones(NUM_CLASSES), (2, *WEAK)),
        "target_resized": np.array([[44, 72], [40, 64]], np.int32),
        "target_crop": np.array([[7, 21], [5, 13]], np.int32),
        "target_flip": np.array([True, False]),
        "strong_params": strong_params(),
    }


def stage2_batch(seed: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, (2, *WEAK)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.2] = 255
    return {
        **source_batch(rng),
        "target_strong": rng.normal(size=(2, *WEAK, 3)),
        "target_label": labels,
        "strong_params": strong_params(),
    }


def jax_step(config, student_t, batch, frozen=None, prototypes=None):
    """(state before, state after, everything the step computed, metrics) of one float64
    update, the method's own (``method.update``, what the jitted train step runs)."""
    model = models.build_model(config.model)
    method = methods.create(config, model.apply)
    txs = as_optimizers(optim.make_optimizer(config.optim, config.num_steps)[0])
    state = initial_state(method, txs, to_flax(student_t, model), jax.random.PRNGKey(0))
    if prototypes is not None:
        state = state.replace(prototypes=jnp.asarray(prototypes))

    def update(s, b, f):  # the update and its preview panels, one program
        new_state, out, metrics = method.update(txs, s, b, f)
        return new_state, out, metrics, previews.panel_rows(method.preview(b, out))

    new_state, out, metrics, panels = jax.jit(update)(state, batch, frozen)
    count = len(method.preview_panels)
    assert panels.shape == (2, WEAK[0], count * WEAK[1] + (count - 1) * 2, 3)
    return state, new_state, out, metrics


def implied_gradients(before, after, config):
    """The gradient the SGD step used, ``(p0 - p1) / lr - wd p0`` (its first step: the
    momentum buffer is the decayed gradient), at each parameter's group rate."""
    groups = optim.param_groups(before.params)
    o = config.optim

    def grad(p0, p1, group):
        lr = o.lr * (o.head_lr_mult if group == "head" else 1.0)
        return (np.asarray(p0) - np.asarray(p1)) / lr - o.weight_decay * np.asarray(p0)

    return jax.tree_util.tree_map(grad, before.params, after.params, groups)


def assert_loss(ours, theirs, what: str) -> None:
    ours = float(ours)
    assert abs(ours - theirs) <= REL64 * abs(theirs), (what, ours, theirs)


def assert_sgd_update(before, state, record, student_t, config) -> None:
    """The parameters after SGD (within lr x the gradient's bound, + ulps), the gradient the
    step used (within the gradient's bound, + the ulps of the parameters over lr), the BN
    statistics."""
    ref_state = numpy_state_dict(student_t)
    ref_grads = {k: v.numpy() for k, v in record["grads"].items()}
    params = paired(state.params, "params", ref_state)
    grad_pairs = paired(implied_gradients(before, state, config), "params", ref_grads)
    grad_bound = REL64 * max(np.abs(r).max() for _, _, r in grad_pairs)
    scale = max(np.abs(r).max() for _, _, r in params)
    lr = config.optim.lr
    assert_within(grad_pairs, grad_bound + 8 * EPS64 * scale / lr, "gradients")
    bound = config.optim.head_lr_mult * lr * grad_bound + 8 * EPS64 * scale
    assert_within(params, bound, "parameters after SGD")
    assert all(np.abs(r).max() > 0 for _, _, r in grad_pairs), "a parameter got no gradient"
    stats = paired(state.batch_stats, "batch_stats", ref_state)
    assert_within(stats, REL64 * max(np.abs(r).max() for _, _, r in stats), "BN statistics")


def test_stage1_update_matches_the_reference():
    config = proda_config("proda")
    batch = stage1_batch()
    rng = np.random.default_rng(3)
    table = rng.normal(0.5, 0.5, (NUM_CLASSES, 32))
    with jax.enable_x64(True), torch_threads(1):
        student_t = torch_model(seed=5)
        ema_t = copy.deepcopy(student_t)  # never put in eval mode, as the reference's
        before, state, out, metrics = jax_step(config, student_t, batch, prototypes=table)

        opt = ref.Options(n_class=NUM_CLASSES, train_thred=config.proda.train_threshold,
                          ignore_index=255)  # fmt: skip
        run = ref.ProDAReference(
            student_t, ref.make_sgd([(student_t.parameters(), 1)], LR), opt,
            ema=ema_t, objective_vectors=torch.from_numpy(table.copy()),
        )  # fmt: skip
        record = {}
        losses = run.step(
            nchw(batch["source_image"]), torch.from_numpy(batch["source_label"]).long(),
            nchw(batch["target_image"]), nchw(batch["target_strong"]),
            ref.strong_params(batch["strong_params"]), nchw(batch["target_soft_label"]),
            nchw(batch["target_full"]),
            ref.weak_params(batch["target_resized"], batch["target_crop"],
                            batch["target_flip"], WEAK),
            record=record,
        )  # fmt: skip

        np.testing.assert_array_equal(np.asarray(out["labels"]), record["labels"])
        assert 0 < float(out["ignored"]) < 0.5 and float(out["denoise_changed"]) > 0
        teacher = record["teacher_distance"].transpose(0, 2, 3, 1)
        assert_within([("teacher distances", np.asarray(out["teacher_distances"]), teacher)],
                      REL64 * np.abs(teacher).max(), "teacher distances")  # fmt: skip
        assert np.any(teacher == 250) and np.any(teacher != 250)
        expected = {
            "loss_source": losses["loss_source"], "loss_target": losses["loss_target"],
            "loss_ce": losses["loss_ce"], "loss_rce": losses["loss_rce"],
            "loss_regular": losses["loss_regular"], "structure_kl": losses["loss_consistency"],
            "loss": losses["loss"] + losses["loss_source"],
        }  # fmt: skip
        for name, theirs in expected.items():
            assert_loss(metrics[name], theirs, name)
        assert_sgd_update(before, state, record, student_t, config)

        # The EMA: 0.999 of its parameters + 0.001 of the updated student's (one rounding
        # each), BN statistics copied from the student; the prototype table.
        ema_ref = numpy_state_dict(ema_t)
        ema = paired(state.ema_params, "params", ema_ref)
        assert_within(ema, REL64 * max(np.abs(r).max() for _, _, r in ema), "EMA parameters")
        stats = paired(state.ema_batch_stats, "batch_stats", ema_ref)
        assert_within(stats, REL64 * max(np.abs(r).max() for _, _, r in stats), "EMA BN")
        updated = sorted(set(record["prototype_ids"]))
        assert updated and np.all(np.asarray(state.prototypes)[updated] != table[updated])
        protos = [("prototypes", np.asarray(state.prototypes), run.objective_vectors.numpy())]
        assert_within(protos, REL64 * np.abs(table).max(), "prototype table")


def test_stage2_update_matches_the_reference():
    config = proda_config("proda_distill")
    batch = stage2_batch()
    with jax.enable_x64(True), torch_threads(1):
        student_t = torch_model(seed=5)
        teacher_t = torch_model(seed=6).eval()
        model = models.build_model(config.model)
        frozen = {"variables": to_flax(teacher_t, model)}
        before, state, out, metrics = jax_step(config, student_t, batch, frozen=frozen)

        opt = ref.Options(n_class=NUM_CLASSES, rce=False, ignore_index=255)
        groups = [(student_t.backbone.parameters(), 1), (student_t.decode_head.parameters(), 10)]
        run = ref.ProDAReference(student_t, ref.make_sgd(groups, LR), opt, teacher=teacher_t)
        record = {}
        losses = run.step_distillation(
            nchw(batch["source_image"]), torch.from_numpy(batch["source_label"]).long(), None,
            nchw(batch["target_strong"]), ref.strong_params(batch["strong_params"]),
            torch.from_numpy(batch["target_label"]).long(), record=record,
        )  # fmt: skip

        np.testing.assert_array_equal(np.asarray(out["labels"]), record["labels"])
        assert 0 < float(out["ignored"]) < 1
        assert_loss(metrics["loss_source"], losses["loss_source"], "loss_source")
        assert_loss(out["loss_ce"], losses["loss_ce"], "loss_ce")
        assert_loss(metrics["kd"], losses["loss_kd"], "kd")
        assert_loss(metrics["loss_target"] + metrics["loss_distill"], losses["loss"], "loss")
        assert_loss(metrics["loss"], losses["loss"] + losses["loss_source"], "total")
        assert_sgd_update(before, state, record, student_t, config)


def test_settings_are_checked_and_the_initial_table_is_read(tmp_path):
    """Stage 1 needs its initial prototype table (read at step 0: a prototypes.npz or the
    reference's .pth); stages 2/3 a teacher model directory of the same classes."""
    config = proda_config("proda")
    with pytest.raises(registry.MethodConfigError, match="config.proda.prototypes=''"):
        methods.check_config(config)
    table = np.arange(NUM_CLASSES * 32, dtype=np.float32).reshape(NUM_CLASSES, 32)
    config.proda.prototypes = str(tmp_path / "prototypes.npz")
    prototype_io.save_prototypes(config.proda.prototypes, table, np.ones(NUM_CLASSES))
    methods.check_config(config)
    method = methods.create(config, models.build_model(config.model).apply)
    np.testing.assert_array_equal(method.initial_prototypes(None), table)
    config = proda_config("proda_distill")
    config.proda.teacher = str(tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="is not a model directory"):
        methods.check_config(config)


def test_without_a_strong_view_in_the_batch_the_step_draws_it_from_its_own_key():
    """The input delivers the weak crop only: the update draws RandAugmentMC from the step
    key "strong_view" (tests/test_proda_pipeline.py trains with it); a batch that has a
    strong view (the reference's, above) keeps it."""
    from ddb_jax.methods import base
    from ddb_jax.methods.proda import ProDA
    from ddb_jax.methods.proda_shared import STRONG_VIEW_KEY, with_strong_view
    from ddb_jax.ops import denormalize_image
    from ddb_jax.uda import randaugment

    batch = jax.tree_util.tree_map(np.float32, stage1_batch())
    assert with_strong_view(batch, jax.random.PRNGKey(1)) is batch
    weak = {k: v for k, v in batch.items() if k not in ("target_strong", "strong_params")}
    state = TrainState(step=jnp.int32(3), params={}, batch_stats={}, opt_state=(),
                       key=jax.random.PRNGKey(0), others={})  # fmt: skip
    key = base.StepKeys(state, ProDA.key_names)[STRONG_VIEW_KEY]
    drawn = jax.jit(with_strong_view)(weak, key)
    draw = randaugment.draw_strong(key, 2, *WEAK)
    strong, params = randaugment.apply_strong(denormalize_image(weak["target_image"]), draw)
    # The same view (compiled apart, a float32 resampling may land one level off a tie).
    levels = np.abs(denormalize_image(drawn["target_strong"]) - strong)
    assert levels.max() <= 1.0 + 1e-3 and np.mean(levels > 1e-3) < 1e-3
    for name, value in params.items():
        np.testing.assert_array_equal(drawn["strong_params"][name], value)
    assert drawn["target_strong"].dtype == weak["target_image"].dtype
