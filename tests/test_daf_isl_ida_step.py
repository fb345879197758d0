"""DAF/IDA's ISL ('daf_isl') and intra-domain ('daf_ida') iterations against float64 PyTorch
transcriptions of dg_ljw's train_isl.py and train_intra.py (torch_ref/daf_isl_ida.py): two
iterations of each, so the SGD momentum, Adam's moments and the poly rate of iteration 1
are covered, on the tiny DAF network of tests/test_daf_step.py (random O(1) weights and BN
statistics). Checked: every loss; the gradient of every tree, elementwise, through the
optimisers' state (the SGD momentum buffers: linear in the gradients; D's Adam moments);
both trees' gradient norms; the parameters after the SGD step and after D's Adam; the
running BN statistics. Bounds from float64 arithmetic (REL64 of a gradient's scale, as in
tests/test_daf_step.py), never from one machine's rounding.

The reference's depth regressor (``convR0``, ``bnR0``, ``convR2``) feeds only the depth,
which neither stage's loss reads: its parameters never get a gradient, so PyTorch's SGD
skips them (no weight decay, no momentum). Ours get a zero gradient, and the SGD's weight
decay would move them unless they are frozen: the stages' optimiser freezes them
(``ddb_jax.graph.daf.DEPTH_ONLY`` in ``optim.frozen_keys``); this test checks that they
stay put.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import torch

from ddb_jax import methods, models
from ddb_jax.convert.common import path_to_str
from ddb_jax.graph import daf as daf_graph
from ddb_jax.methods import assemble
from ddb_jax.methods.optim import ListedSGDState
from ddb_jax.methods.state import Trainable
from tests.parity_support import EPS64, adam_param_bound, torch_threads
from tests.test_advent_step import NDF, convert_discriminator, leaves, numpy_state
from tests.test_daf_model import tiny_torch, to_flax_variables
from tests.test_daf_step import (
    DEPTH_HW,
    LR_REL,
    MAX_ITERS,
    NUM_CLASSES,
    REL64,
    SOURCE_HW,
    TARGET_HW,
    daf_config,
    grad_norm,
    torch_images,
)
from torch_ref import advent as ref_advent
from torch_ref import daf_isl_ida as ref_step
from torch_ref.proda_step import SGD1x


def stage_config(stage: str):
    """The stage's config with the optimiser groups the 'daf' graph gives it (the depth
    regressor frozen), at the tests' sizes."""
    config = daf_config()
    config.stage = stage
    config.data.source_depth = False
    graph_stage = next(s for s in daf_graph.daf_graph(config) if s.kind == stage)
    config.optim.frozen_keys = dict(graph_stage.settings)["optim.frozen_keys"]
    assert set(daf_graph.DEPTH_ONLY) <= set(config.optim.frozen_keys)
    config.daf.isl_labels, config.daf.rank = "unused", "unused"
    config.daf.ida_optim_d.lr, config.daf.ida_optim_d.max_iters = 1e-3, MAX_ITERS
    config.daf.disc_channels = NDF
    return config


def make_batches(stage: str, count: int = 2):
    rng = np.random.default_rng(11)
    out = []
    for _ in range(count):
        if stage == "daf_isl":
            labels = rng.integers(0, NUM_CLASSES, (1, *TARGET_HW)).astype(np.int32)
            labels[:, :3] = 255  # below the pseudo-labels' threshold
            out.append({"target_image": rng.normal(size=(1, *TARGET_HW, 3)),
                        "target_label": labels})  # fmt: skip
        else:
            labels = rng.integers(0, NUM_CLASSES, (1, *SOURCE_HW)).astype(np.int32)
            labels[:, :4] = 255
            out.append({"source_image": rng.normal(size=(1, *SOURCE_HW, 3)),
                        "source_label": labels,
                        "target_image": rng.normal(size=(1, *TARGET_HW, 3))})  # fmt: skip
    return out


def momentum_buffers(opt_state) -> dict[str, np.ndarray]:
    """Our SGD's momentum buffer of every stepped parameter ('layer6/conv_0/kernel': ...),
    from the listed 1x group's and the 10x group's states (frozen ones have none)."""

    def is_buffer_state(x):
        return isinstance(x, ListedSGDState | optax.TraceState)

    found = {}
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_buffer_state):
        if not is_buffer_state(node):
            continue
        tree = node.momentum if isinstance(node, ListedSGDState) else node.trace
        for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
            found[path_to_str(path)] = np.asarray(value)
    return found


def reference_buffers(model_t, opt, flax_model) -> dict[str, np.ndarray]:
    """The torch SGD's momentum buffers in our layout; NaN where a parameter has none."""
    state = numpy_state(model_t)
    for name, p in model_t.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        state[name] = np.full(state[name].shape, np.nan) if buf is None else buf.numpy().copy()
    params = to_flax_variables(state, flax_model)["params"]
    return {
        path_to_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def start_state(method, txs, variables, others):
    """The stage's initial state with the reference's discriminator, its Adam state made
    from those (float64) parameters, as one compiled program (op by op it is ~100 tiny
    compiles; the discriminator's own init is float32, which would compile the step twice)."""

    def build(variables, others, key):
        state = assemble.initial_state(method, txs, variables, key)
        assert set(state.others) == set(others)
        return state.replace(others={name: Trainable(p, txs[name].init(p))
                                     for name, p in others.items()})  # fmt: skip

    return jax.jit(build)(variables, others, jax.random.PRNGKey(0))


def run_stage(stage: str):
    config = stage_config(stage)
    lr = config.optim.lr
    with jax.enable_x64(True), torch_threads(1):
        model_t = tiny_torch(False, DEPTH_HW, seed=7).train()
        flax_model = models.build_model(config.model)
        variables = to_flax_variables(numpy_state(model_t), flax_model)
        method = methods.create(config, flax_model.apply)
        txs = assemble.optimizers(config, method)
        d_t, opt_d, others = None, None, {}
        if stage == "daf_isl":
            cfg = ref_step.CfgIsl(input_size_target=TARGET_HW[::-1], learning_rate=lr,
                                  max_iters=MAX_ITERS)  # fmt: skip
            opt = ref_step.make_isl_optimizer(model_t, cfg, sgd=SGD1x)
        else:
            cfg = ref_step.CfgIda(input_size_source=SOURCE_HW[::-1],
                                  input_size_target=TARGET_HW[::-1], learning_rate=lr,
                                  learning_rate_d=config.daf.ida_optim_d.lr,
                                  lambda_adv_main=config.daf.ida_lambda_adv_main,
                                  max_iters=MAX_ITERS)  # fmt: skip
            torch.manual_seed(3)
            d_t = ref_advent.get_fc_discriminator(NUM_CLASSES, NDF).double()
            opt, opt_d = ref_step.make_ida_optimizers(model_t, d_t, cfg, sgd=SGD1x)
            others = {"d_main": convert_discriminator(numpy_state(d_t))}
        state = start_state(method, txs, variables, others)
        step = assemble.train_step(assemble.Assembled(flax_model, method, txs, state))
        scales = []
        for it, batch in enumerate(make_batches(stage)):
            before = jax.device_get(state)
            carried = None
            if d_t is not None:
                carried = [np.abs(a - b) for a, b in zip(
                    leaves(before.others["d_main"].params),
                    leaves(convert_discriminator(numpy_state(d_t))), strict=True)]  # fmt: skip
            state, metrics = step(state, batch)
            norms = {}

            def keep(phase, norms=norms):
                d_norm = 0.0 if d_t is None else grad_norm(d_t.parameters())
                norms[phase] = (grad_norm(model_t.parameters()), d_norm)

            if stage == "daf_isl":
                loss = ref_step.isl_iteration(
                    model_t, opt, torch_images(batch["target_image"]),
                    torch.from_numpy(batch["target_label"]).long(), it, cfg, phase_hook=keep,
                )  # fmt: skip
                pairs = {"loss_seg_target": loss, "loss": loss}
                model_norm, d_norm = norms["target"]
            else:
                losses = ref_step.ida_iteration(
                    model_t, d_t, opt, opt_d, torch_images(batch["source_image"]),
                    torch.from_numpy(batch["source_label"]).long(),
                    torch_images(batch["target_image"]), it, cfg, phase_hook=keep,
                )  # fmt: skip
                # The reference logs D's halved target half only; ours: both halves.
                d_loss = losses["loss_d_main"] + losses["loss_d_main_src"]
                pairs = {
                    "loss_seg_main": losses["loss_seg_src_main"],
                    "loss_adv_main": losses["loss_adv_trg_main"],
                    "loss_d_main": d_loss,
                }
                model_norm, d_norm = norms["discriminator"]
            for name, ref in pairs.items():
                value = float(metrics[name])
                assert abs(value - ref) <= REL64 * abs(ref), (stage, it, name, value, ref)
                print(f"{stage} {it}: {name} relative error {abs(value - ref) / abs(ref):.3g}")
            assert abs(float(metrics["grad_norm"]) - model_norm) <= REL64 * model_norm
            if d_t is not None:
                ours = float(metrics["grad_norm_d_main"])
                assert abs(ours - d_norm) <= REL64 * d_norm, (stage, it, ours, d_norm)
            scales.append(model_norm)
            check_segmentor(stage, it, lr, before, state, model_t, opt, flax_model, max(scales))
            if d_t is not None:
                check_discriminator(it, before, state, d_t, opt_d, d_norm, carried)


def check_segmentor(stage, it, lr, before, state, model_t, opt, flax_model, grad_scale):
    """Momentum buffers (the gradients), parameters, BN statistics after the SGD step."""
    # A buffer is a sum of at most 4 listings x 2 iterations of gradients (each within
    # REL64 of the gradient's scale) and weight decays of equal parameters; plus ulps.
    ours_bufs = momentum_buffers(state.opt_state)
    ref_bufs = reference_buffers(model_t, opt, flax_model)
    assert ours_bufs and set(ours_bufs) <= set(ref_bufs)
    worst = 0.0
    for name, ref in ref_bufs.items():
        if name not in ours_bufs:  # not stepped: frozen here, no gradient or group there
            assert np.all(np.isnan(ref)), (stage, it, name, "stepped by the reference only")
            continue
        assert not np.any(np.isnan(ref)), (stage, it, name, "stepped by us only")
        error = np.max(np.abs(ours_bufs[name] - ref))
        assert error <= 8 * REL64 * grad_scale + 8 * EPS64 * np.max(np.abs(ref)), (it, name)
        worst = max(worst, float(error))
    print(f"{stage} {it}: momentum buffers max error {worst:.3g} "
          f"(bound {8 * REL64 * grad_scale:.3g})")  # fmt: skip
    # An SGD step is linear in the buffer: 10 lr x the buffer's bound, plus ulps.
    expected = to_flax_variables(numpy_state(model_t), flax_model)
    bound = 10 * lr * 8 * REL64 * grad_scale
    worst = 0.0
    for ours, ref in zip(leaves(state.params), leaves(expected["params"]), strict=True):
        error = np.max(np.abs(ours - ref))
        assert error <= bound + 8 * EPS64 * np.max(np.abs(ref)), (stage, it, error)
        worst = max(worst, float(error))
    print(f"{stage} {it}: parameters max error {worst:.3g} (bound {bound:.3g})")
    for ours, ref in zip(leaves(state.batch_stats), leaves(expected["batch_stats"]), strict=True):
        assert np.max(np.abs(ours - ref)) <= REL64 * np.max(np.abs(ref)), (stage, it)
    moved = max(np.max(np.abs(a - b)) for a, b in zip(leaves(state.params), leaves(before.params),
                                                       strict=True))  # fmt: skip
    assert moved > 1e4 * bound, (stage, it, moved)
    # Frozen: the backbone's BN affines, and the depth regressor nothing reads.
    np.testing.assert_array_equal(state.params["bn1"]["scale"], before.params["bn1"]["scale"])
    for module in ("convR0", "bnR0", "convR2"):
        for ours, old in zip(leaves(state.params["depth_head"][module]),
                             leaves(before.params["depth_head"][module]), strict=True):  # fmt: skip
            np.testing.assert_array_equal(ours, old)
    head_bn = state.params["depth_head"]["mff_bn"]["scale"]
    assert np.max(np.abs(head_bn - before.params["depth_head"]["mff_bn"]["scale"])) > 0


def check_discriminator(it, before, state, d_t, opt_d, d_norm, carried):
    """D's Adam moments (its gradients, elementwise) and parameters after its step."""
    adam_state = [
        s for s in jax.tree_util.tree_leaves(
            state.others["d_main"].opt_state, is_leaf=lambda x: hasattr(x, "nu"))
        if hasattr(s, "nu")
    ][0]  # fmt: skip
    grad_error = REL64 * d_norm
    for moment, key, bound in (("mu", "exp_avg", grad_error),
                               ("nu", "exp_avg_sq", 2 * grad_error * d_norm)):  # fmt: skip
        theirs = convert_discriminator(
            {n: opt_d.state[p][key].numpy() for n, p in d_t.named_parameters()}
        )
        for ours, ref in zip(leaves(getattr(adam_state, moment)), leaves(theirs), strict=True):
            assert np.max(np.abs(ours - ref)) <= bound, (it, moment)
        print(
            f"D {it}: Adam {moment} max error {np.max(np.abs(ours - ref)):.3g} (bound {bound:.3g})"
        )
    beta2 = opt_d.param_groups[0]["betas"][1]
    sqrt_v = convert_discriminator({
        n: (opt_d.state[p]["exp_avg_sq"] / (1 - beta2 ** (it + 1))).sqrt().numpy()
        for n, p in d_t.named_parameters()
    })  # fmt: skip
    lr = float(opt_d.param_groups[0]["lr"])
    expected = convert_discriminator(numpy_state(d_t))
    for ours, ref, v, old in zip(leaves(state.others["d_main"].params), leaves(expected),
                                 leaves(sqrt_v), carried, strict=True):  # fmt: skip
        limit = adam_param_bound(lr, grad_error, v, ref) + old + LR_REL * lr
        assert np.all(np.abs(ours - ref) <= limit), (it, np.max(np.abs(ours - ref)))
    moved = max(np.max(np.abs(a - b)) for a, b in zip(leaves(state.others["d_main"].params),
                                                       leaves(before.others["d_main"].params),
                                                       strict=True))  # fmt: skip
    assert moved > 0.1 * lr, (it, moved)


def test_isl_two_iterations_match_the_reference():
    run_stage("daf_isl")


def test_ida_two_iterations_match_the_reference():
    run_stage("daf_ida")
