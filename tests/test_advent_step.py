"""ADVENT's iteration against a float64 PyTorch transcription of the reference's
(torch_ref/advent_step.py, valeoai/ADVENT train_UDA.py): AdvEnt and MinEnt, two iterations
each, so both optimisers' second steps (SGD momentum, Adam's moments) and the poly rate of
iteration 1 are covered.

Both sides run in float64 from the same weights (the torch modules converted with
ddb_jax.convert.advent). SGD and Adam move parameters by amounts linear in (SGD) or bounded
by (Adam) the gradient's error, so the parameters after each step bound the gradients of
both trees; the losses and gradient norms are compared directly.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

from configs import default
from ddb_jax.convert import advent as convert
from ddb_jax.methods import assemble
from ddb_jax.methods.state import MODEL
from ddb_jax.models.advent_deeplabv2 import to_advent_input
from tests.parity_support import EPS64, adam_param_bound, torch_threads
from torch_ref import advent as ref_model
from torch_ref import advent_step as ref_step
from torch_ref.optim041 import SGD041, Adam041

NUM_CLASSES, WIDTH, NDF = 5, 8, 4
SOURCE_HW, TARGET_HW = (40, 48), (32, 40)  # the discriminators' five /2 convs reach 1x1
MAX_ITERS = 10
REL64 = 2.0**-33  # far above the float64 rounding of a few 1e5 operations per value
LR_REL = 2.0**-20  # XLA's float64 pow in the compiled optimiser (see check_iteration)


def advent_config(stage: str):
    config = default.get_config()
    config.stage = stage
    config.model.backbone = "resnet101_caffe"
    config.model.head = "advent_aspp"
    config.model.num_classes = NUM_CLASSES
    config.model.base_channels = WIDTH
    config.model.advent_blocks = (1, 1, 1, 1)
    config.model.dtype = "float64"
    config.num_steps = MAX_ITERS
    optim = config.optim
    optim.kind, optim.lr, optim.momentum, optim.weight_decay = "sgd", 2.5e-2, 0.9, 5e-4
    optim.head_keys, optim.frozen_keys = ("layer5", "layer6"), ("bn", "downsample_1")
    optim.head_lr_mult, optim.warmup_iters, optim.poly_power = 10.0, 0, 0.9
    optim.max_iters = MAX_ITERS
    config.advent.optim_d.lr = 1e-3
    config.advent.optim_d.max_iters = MAX_ITERS
    config.advent.disc_channels = NDF
    return config


def reference_cfg(config) -> ref_step.CfgAdvent:
    return ref_step.CfgAdvent(
        num_classes=NUM_CLASSES,
        input_size_source=SOURCE_HW[::-1],
        input_size_target=TARGET_HW[::-1],
        learning_rate=config.optim.lr,
        learning_rate_d=config.advent.optim_d.lr,
        max_iters=MAX_ITERS,
    )


def make_batches(count: int):
    rng = np.random.default_rng(4)
    batches = []
    for _ in range(count):
        labels = rng.integers(0, NUM_CLASSES, (1, *SOURCE_HW)).astype(np.int32)
        labels[:, :4] = 255
        batches.append({
            "source_image": rng.normal(size=(1, *SOURCE_HW, 3)),
            "source_label": labels,
            "target_image": rng.normal(size=(1, *TARGET_HW, 3)),
        })  # fmt: skip
    return batches


def torch_images(images: np.ndarray) -> torch.Tensor:
    """Our normalised RGB as the reference's input (BGR - IMG_MEAN), exactly in float64."""
    return torch.from_numpy(np.asarray(to_advent_input(images)).transpose(0, 3, 1, 2).copy())


def reference_modules(seed: int):
    torch.manual_seed(seed)
    model = ref_model.get_deeplab_v2(NUM_CLASSES, True, (1, 1, 1, 1), WIDTH).double()
    discs = {
        "d_aux": ref_model.get_fc_discriminator(NUM_CLASSES, NDF).double(),
        "d_main": ref_model.get_fc_discriminator(NUM_CLASSES, NDF).double(),
    }
    model.train()
    return model, discs


def numpy_state(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def convert_discriminator(state_dict: dict) -> dict:
    from ddb_jax.models.discriminator import FCDiscriminator

    return convert.convert_discriminator(
        state_dict, FCDiscriminator(ndf=NDF), num_classes=NUM_CLASSES, dtype=np.float64
    )["params"]


def reference_variables(model, discs, flax_model) -> tuple[dict, dict]:
    variables = convert.convert_advent(numpy_state(model), flax_model, dtype=np.float64)
    return variables, {name: convert_discriminator(numpy_state(d)) for name, d in discs.items()}


def adam_sqrt_v(d, opt, step: int) -> dict:
    """The bias-corrected sqrt(v) of each discriminator parameter, in our layout."""
    beta2 = opt.param_groups[0]["betas"][1]
    return convert_discriminator({
        name: (opt.state[p]["exp_avg_sq"] / (1 - beta2**step)).sqrt().numpy()
        for name, p in d.named_parameters()
    })  # fmt: skip


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("stage, listed", [("advent", True), ("minent", True), ("advent", False)])
def test_two_iterations_match_the_reference(stage, listed):
    """``listed``: the reference as it ran (its 1x group lists a conv weight 3 or 4 times,
    stepped by PyTorch 0.4.1's SGD each time; PyTorch 0.4.1's Adam for the discriminators);
    else every parameter listed once, today's SGD and Adam (``config.optim.listed_times=''``,
    ``config.advent.optim_d.kind='adam'``)."""
    config = advent_config(stage)
    config.optim.listed_times = "advent_1x" if listed else ""
    config.advent.optim_d.kind = "adam041" if listed else "adam"
    cfg = reference_cfg(config)
    batches = make_batches(2)
    with jax.enable_x64(True), torch_threads(1):
        model_t, discs_t = reference_modules(seed=3)
        if stage == "minent":
            discs_t = {}
        if not listed:
            model_t.optim_parameters = functools.partial(model_t.optim_parameters, unique=True)
        opt, opt_aux, opt_main = ref_step.make_optimizers(
            model_t, discs_t.get("d_aux"), discs_t.get("d_main"), cfg,
            sgd=SGD041 if listed else torch.optim.SGD,
            adam=Adam041 if listed else torch.optim.Adam,
        )  # fmt: skip
        from ddb_jax import models

        flax_model = models.build_model(config.model)
        variables, others = reference_variables(model_t, discs_t, flax_model)
        stage_ = assemble.assemble(config, variables, jax.random.PRNGKey(0))
        assert set(stage_.state.others) == set(others)
        state = stage_.state.replace(
            others={k: v.replace(params=others[k]) for k, v in stage_.state.others.items()}
        )
        step = assemble.train_step(stage_)  # as the loop jits it: the state donated
        for it, batch in enumerate(batches):
            before = jax.device_get(state)  # a host copy: the step donates the state
            state, metrics = step(state, batch)
            grads = {}

            def keep_grads(phase, grads=grads):
                grads[phase] = {
                    "model": np.sqrt(
                        sum(
                            float(torch.sum(p.grad**2))
                            for p in model_t.parameters()
                            if p.grad is not None
                        )
                    ),  # fmt: skip
                    **{
                        name: np.sqrt(sum(float(torch.sum(p.grad**2)) for p in d.parameters()))
                        for name, d in discs_t.items()
                        if all(p.grad is not None for p in d.parameters())
                    },
                }

            # Adam's step is bounded from equal parameters: a difference carried over from
            # the previous step adds to it.
            carried = {
                name: [np.abs(a - b) for a, b in zip(leaves(before.others[name].params),
                                                     leaves(convert_discriminator(numpy_state(d))),
                                                     strict=True)]
                for name, d in discs_t.items()
            }  # fmt: skip
            args = (torch_images(batch["source_image"]),
                    torch.from_numpy(batch["source_label"]).long(),
                    torch_images(batch["target_image"]), it, cfg)  # fmt: skip
            if stage == "advent":
                losses = ref_step.advent_iteration(
                    model_t, discs_t["d_aux"], discs_t["d_main"], opt, opt_aux, opt_main,
                    *args, phase_hook=keep_grads,
                )  # fmt: skip
            else:
                losses = ref_step.minent_iteration(model_t, opt, *args, phase_hook=keep_grads)
            d_opts = {"d_aux": opt_aux, "d_main": opt_main}
            check_iteration(stage, it, config, before, state, metrics, losses, grads,
                            model_t, discs_t, d_opts, carried, flax_model)  # fmt: skip


def check_iteration(stage, it, config, before, state, metrics, losses, grads, model_t, discs_t,
                    d_opts, carried, flax_model):  # fmt: skip
    # Losses, by the reference's names.
    target = "adv" if stage == "advent" else "ent"
    names = {
        "loss_seg_main": "loss_seg_src_main", "loss_seg_aux": "loss_seg_src_aux",
        f"loss_{target}_main": f"loss_{target}_trg_main" if target == "adv" else "loss_ent_main",
        f"loss_{target}_aux": f"loss_{target}_trg_aux" if target == "adv" else "loss_ent_aux",
    }  # fmt: skip
    if stage == "advent":
        names.update({"loss_d_main": None, "loss_d_aux": None})
    for ours, theirs in names.items():
        if theirs is None:  # the whole D loss: the reference logs its halves
            level = ours.rsplit("_", 1)[1]
            ref = losses[f"loss_d_{level}_src"] + losses[f"loss_d_{level}_trg"]
        else:
            ref = losses[theirs]
        value = float(metrics[ours])
        assert abs(value - ref) <= REL64 * abs(ref) + 1e-300, (it, ours, value, ref)
    # Gradient norms of every tree, from the last backward phase of the reference.
    last = list(grads.values())[-1]
    assert abs(float(metrics["grad_norm"]) - last["model"]) <= REL64 * last["model"]
    for name in discs_t:
        ours = float(metrics[f"grad_norm_{name}"])
        assert abs(ours - last[name]) <= REL64 * last[name], (it, name, ours, last[name])

    # The segmentor after the SGD step (and its running BN statistics); frozen BN affines
    # unchanged. An SGD step is linear in the gradient: error <= 10 lr (1 + m) |dg| + ulps,
    # times the listings (4 at most) and their momentum (1 + m each).
    expected = convert.convert_advent(numpy_state(model_t), flax_model, dtype=np.float64)
    grad_scale = last["model"]
    bound = 4 * 10 * config.optim.lr * 2 * 2 * REL64 * grad_scale
    for ours, ref in zip(leaves(state.params), leaves(expected["params"]), strict=True):
        assert np.max(np.abs(ours - ref)) <= bound + 8 * EPS64 * np.max(np.abs(ref)), it
    for ours, ref in zip(leaves(state.batch_stats), leaves(expected["batch_stats"]), strict=True):
        assert np.max(np.abs(ours - ref)) <= REL64 * np.max(np.abs(ref)), it
    bn_scale = before.params["bn1"]["scale"]
    np.testing.assert_array_equal(state.params["bn1"]["scale"], bn_scale)
    moved = [np.max(np.abs(a - b)) for a, b in zip(leaves(state.params), leaves(before.params),
                                                    strict=True)]  # fmt: skip
    assert max(moved) > 1e4 * bound, "the step moved nothing measurable"
    # Each discriminator: Adam's moments (every step's gradient, elementwise) and the
    # parameters after its step. XLA's float64 pow (the poly rate, the bias corrections) is
    # accurate to ~1e-9 relative, not to the last bit: LR_REL of the step is allowed.
    for name, d in discs_t.items():
        opt = d_opts[name]
        adam_state = [
            s for s in jax.tree_util.tree_leaves(
                state.others[name].opt_state, is_leaf=lambda x: hasattr(x, "nu"))
            if hasattr(s, "nu")
        ][0]  # fmt: skip
        grad_error = REL64 * last[name]
        for moment, key, bound in (("mu", "exp_avg", grad_error),
                                   ("nu", "exp_avg_sq", 2 * grad_error * last[name])):  # fmt: skip
            theirs = convert_discriminator(
                {n: opt.state[p][key].numpy() for n, p in d.named_parameters()}
            )
            for ours, ref in zip(leaves(getattr(adam_state, moment)), leaves(theirs), strict=True):
                assert np.max(np.abs(ours - ref)) <= bound, (it, name, moment)
        expected_d = convert_discriminator(numpy_state(d))
        sqrt_v = adam_sqrt_v(d, opt, it + 1)
        lr = float(opt.param_groups[0]["lr"])
        for ours, ref, v, old_error in zip(leaves(state.others[name].params), leaves(expected_d),
                                           leaves(sqrt_v), carried[name], strict=True):  # fmt: skip
            limit = adam_param_bound(lr, grad_error, v, ref) + old_error + LR_REL * lr
            assert np.all(np.abs(ours - ref) <= limit), (it, name, np.max(np.abs(ours - ref)))
        moved_d = max(
            np.max(np.abs(a - b))
            for a, b in zip(
                leaves(state.others[name].params), leaves(before.others[name].params), strict=True
            )
        )
        assert moved_d > 0.1 * lr, (it, name, moved_d)
    assert MODEL not in state.others
