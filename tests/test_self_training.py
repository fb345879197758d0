"""The self-training step against a PyTorch reference step (float64), and across device
counts (float32, bounded by a float64 run of the same step).

The reference step (torch_ref/self_training.py) is written from DDB's ``ST.forward_train``
semantics with the mmseg-named torch model of torch_ref; it is given the bridging masks and
strong-augmentation draws that our step took from its key (``outputs['draws']``).

Bounds (float64, EPS64 = 2^-52): a value computed through the network (losses, gradients,
BN statistics, probabilities) passes ~2^6 layers forward and backward, each a reduction of
at most ~2^13 rounded products (9 x 512 channels; N x H x W pixels), so it is off by at most
~2^6 * 2^13 * EPS64 = 2^-33 of the values' scale (REL64). The strong augmentation is ~2^12
elementwise operations per pixel (four jitter ops through HSV and back, the blur taps):
2^-40 of the image's scale (AUG64). The measured errors are ~1e-14 relative: the bounds are
worst cases, far from this CPU's rounding, and the same on any x86-64 CPU.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddb_jax import methods, models
from ddb_jax.methods import base, optim
from ddb_jax.uda import bridging
from tests.parity_support import (
    EPS32,
    REL64,
    adam_param_bound,
    assert_argmax_agrees,
    assert_bn_statistics,
    assert_self_training_update,
    assert_within,
    group_lr,
    initial_state,
    load_into_torch,
    make_batch,
    make_config,
    paired,
    per_image_draws,
    to_flax,
    torch_segmentor,
    torch_threads,
    torch_value,
)
from torch_ref.common import nchw, numpy_state_dict
from torch_ref.losses import resize
from torch_ref.optim import make_optimizer
from torch_ref.self_training import torch_reference_step

AUG64 = 2.0**-40
# Float32 (the device-count test): the same 2^19 rounded operations per value, but its
# rounding errors add up like a random walk (Higham's probabilistic bound, which holds with
# overwhelming probability): sqrt(2^19) * EPS32 = 2^-13.5 of the scale; 2^-12 allows 2.8x.
# The worst case n * EPS32 = 2^-4 is never approached by sums of rounding errors.
REL32 = 2.0**-12
# With color_jitter_p = blur_p = 0.5, the key of seed 2 gives the four images of the two
# iterations every (jitter, blur) combination: both branches of both ops are compared.
KEY_SEED = 2


def threshold_between_confidences(model, batch) -> float:
    """Halfway between two neighbouring teacher confidences near the median (the teacher of
    iteration 0 is the student, BN in training mode): 0 < weight < 1, no pixel at it."""
    with torch.no_grad():
        logits = copy.deepcopy(model).train()(nchw(batch["target_image"]))[0]
        probs = torch.softmax(resize(logits, batch["source_label"].shape[1:]), 1)
    conf = np.sort(probs.max(1)[0].numpy().ravel())
    mid = len(conf) // 2
    return float(0.5 * (conf[mid] + conf[mid + 1]))


def test_step_matches_pytorch_reference():
    """Two iterations, ResNet-18 DLV2 (tiny widths) on 2 x 32 x 40 images, both sides in
    float64."""
    config = make_config()
    config.st.color_jitter_p = 0.5
    config.st.blur_p = 0.5
    student_t = torch_segmentor(seed=3)
    teacher_t = copy.deepcopy(student_t)
    config.st.pseudo_threshold = threshold_between_confidences(student_t, make_batch(10))
    opt = make_optimizer(student_t, config.optim)
    coins = set()
    with jax.enable_x64(True), torch_threads(1):
        model = models.build_model(config.model)
        method = methods.create(config, model.apply)
        tx, _ = optim.make_optimizer(config.optim, config.num_steps)
        state = initial_state(method, tx, to_flax(student_t, model), jax.random.PRNGKey(KEY_SEED))
        step = base.make_train_step(method, tx)
        # One program for both: the step and what it computed on the way (XLA shares the
        # common work, so this compiles about as fast as the step alone).
        run = jax.jit(lambda s, b: (base.loss_and_grads(method, s, b), step(s, b)))
        before = None
        for it in range(2):
            batch = make_batch(10 + it)
            (_, out, grads), (state, metrics) = run(state, batch)
            draws = per_image_draws(out["draws"]["aug"])
            coins.update((bool(d["jitter"]), bool(d["blur"])) for d in draws)
            masks = np.asarray(out["draws"]["masks"])
            assert 0 < masks.mean() < 1  # class-mix: both domains in the bridged images
            ours_pseudo = np.asarray(out["pseudo_labels"])
            ref_src, ref_mix, ref_grads, ref_weight, extra = torch_reference_step(
                student_t, teacher_t, opt, it, batch, masks, draws, config,
                use_pseudo=ours_pseudo, keep_probs=True,
            )  # fmt: skip
            ref_student = numpy_state_dict(student_t)
            ref_teacher = numpy_state_dict(teacher_t)

            # Pseudo-labels and their weight: the threshold is at a provable distance from
            # every confidence, so the weight is the same count of pixels on both sides.
            assert 0.0 < ref_weight < 1.0
            assert np.min(np.abs(extra["confidence"] - config.st.pseudo_threshold)) > REL64
            assert abs(float(out["pseudo_weight"]) - ref_weight) <= 2.0**-40
            assert_argmax_agrees(ours_pseudo, extra["probs"], 1, REL64, f"pseudo-labels {it}")

            # Losses and the bridged image.
            for name, ours, ref in (
                ("loss_source", out["loss_source"], ref_src),
                ("loss_mixed", out["loss_mixed"], ref_mix),
                ("loss", metrics["loss"], ref_src + ref_mix),
            ):
                assert abs(float(ours) - ref) <= REL64 * abs(ref), (it, name, float(ours), ref)
            mixed = [("mixed_image", np.asarray(out["mixed_image"]), extra["mixed"])]
            assert_within(mixed, AUG64 * np.abs(extra["mixed"]).max(), f"mixed image {it}")

            before = assert_self_training_update(
                config, it, state, grads, ref_grads, ref_student, ref_teacher, before
            )

            if it == 0:
                # Iteration 1 starts from our parameters on both sides. Adam's 1/eps
                # sensitivity where a gradient is ~0 turns step 0's rounding (~1e-17 in a
                # gradient) into ~1e-12 parameter differences: within adam_param_bound, but
                # carried into iteration 1's forward they would need the network's Lipschitz
                # constants, not arithmetic, to bound.
                load_into_torch(student_t, state.params)
    assert coins == {(True, True), (True, False), (False, True), (False, False)}, coins


def test_step_is_independent_of_device_count():
    """One step on 1 and on 8 devices (BN statistics and gradients reduced over the global
    batch), float32: each within float32 rounding (REL32) of the float64 reference step on
    the same inputs and draws (torch_ref, which the test above matches to ~1e-14), so within
    twice that of each other, whatever CPU computes them.

    The draws are taken as the step takes them (its bridging key, in float32 mode) and are
    chosen not to depend on the float width: one source class, so the class-mix mask is all
    source; jitter and blur always on; no target pixel above the threshold (their pseudo-labels
    are then unused, and float32 near-ties cannot change the loss).
    """
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    config = make_config(dtype="float32")
    config.st.color_jitter_p = 1.0
    config.st.blur_p = 1.0
    config.st.pseudo_threshold = 1.5
    batch32 = make_batch(5, n=8, size=(24, 24), dtype=np.float32)
    batch32["source_label"] = np.full_like(batch32["source_label"], 7)
    # The reference gets the very same (float32) values, in float64.
    batch = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in batch32.items()}
    student_t = torch_segmentor(seed=6)
    teacher_t = copy.deepcopy(student_t)
    model = models.build_model(config.model)
    method = methods.create(config, model.apply)
    tx, _ = optim.make_optimizer(config.optim, config.num_steps)
    variables = to_flax(student_t, model, jnp.float32)  # the same values (randomize)
    state0 = jax.device_get(initial_state(method, tx, variables, jax.random.PRNGKey(1)))

    runs = {}
    for num_devices in (1, 8):
        mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        sharded = NamedSharding(mesh, PartitionSpec("data"))
        step = base.make_train_step(method, tx, mesh)
        # frozen=None passed explicitly: the meshed step has three in_shardings.
        state, metrics = step(
            jax.device_put(state0, replicated), jax.device_put(batch32, sharded), None
        )
        runs[num_devices] = jax.device_get((state, metrics))

    key = base.StepKeys(state0, method.key_names)["bridging"]
    draws = jax.jit(lambda k, labels: bridging.draw(k, labels, config.st))(
        key, batch["source_label"]
    )
    augs = per_image_draws(draws["aug"])
    assert np.asarray(draws["masks"]).all() and all(d["jitter"] and d["blur"] for d in augs)
    opt = make_optimizer(student_t, config.optim)
    with torch_threads(1):
        ref_src, ref_mix, ref_grads, ref_weight, _ = torch_reference_step(
            student_t, teacher_t, opt, 0, batch, np.asarray(draws["masks"]), augs, config
        )
    ref_student, ref_teacher = numpy_state_dict(student_t), numpy_state_dict(teacher_t)
    ref_metrics = {
        "loss": ref_src + ref_mix,
        "loss_source": ref_src,
        "loss_mixed": ref_mix,
        "grad_norm": np.sqrt(sum(np.sum(g**2) for g in ref_grads.values())),
    }
    assert ref_weight == 0.0
    grad_scale = max(np.abs(g).max() for g in ref_grads.values())
    for num_devices, (state, metrics) in runs.items():
        for key, ref in ref_metrics.items():
            err = abs(float(metrics[key]) - ref)
            assert err <= REL32 * abs(ref), (num_devices, key, err, ref)
        assert float(metrics["pseudo_weight"]) == 0.0
        assert_bn_statistics(state, ref_student, ref_teacher, REL32, f"{num_devices} devices")
        # The teacher of iteration 0 is the student itself (EMA alpha 0): exactly.
        for a, b in zip(
            jax.tree_util.tree_leaves(state.ema_params),
            jax.tree_util.tree_leaves(state0.params),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
        # Parameters after AdamW's first step, elementwise: float32 gradients within REL32
        # of the reference's, float32 rounding (EPS32) of the update and the parameters.
        worst = 0.0
        for name, ours, ref in paired(state.params, "params", ref_student):
            g = torch_value(ref_grads, tuple(name.split("/")))
            lr = group_lr(name, config.optim, 0, config.num_steps)
            bound = adam_param_bound(lr, REL32 * grad_scale, g, ref, eps=EPS32)
            assert np.all(np.abs(ours - ref) <= bound), (num_devices, name)
            worst = max(worst, float(np.max(np.abs(ours - ref) / bound)))
        print(f"{num_devices} devices, parameters: max error / bound {worst:.3g}")
