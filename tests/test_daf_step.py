"""DAF's iteration against a float64 PyTorch transcription of dg_ljw's train.py loop
(torch_ref/daf_step.py): two iterations, so the SGD momentum, Adam's moments and the poly
rate of iteration 1 are covered; every loss, both trees' gradient norms, the parameters
after both optimisers' steps and the running BN statistics (the depth head's included).

The reference ran PyTorch 1.7.1: its SGD steps a parameter listed k times in the 1x group
k times, adding weight decay to a copy of the gradient each time (``listed_times =
'proda_1x'``, the same listing with 1.x semantics), and today's Adam for the discriminator.
"""

from __future__ import annotations

import jax
import numpy as np
import torch

from configs import default
from ddb_jax import models
from ddb_jax.methods import assemble
from ddb_jax.models.advent_deeplabv2 import to_advent_input
from tests.parity_support import EPS64, adam_param_bound, torch_threads
from tests.test_advent_step import NDF, convert_discriminator, leaves, numpy_state
from tests.test_daf_model import to_flax_variables
from torch_ref import advent as ref_advent
from torch_ref import daf as ref_model
from torch_ref import daf_step as ref_step
from torch_ref.proda_step import SGD1x

NUM_CLASSES, WIDTH, FEATURES = 5, 4, 3
SOURCE_HW, TARGET_HW = (40, 48), (32, 40)
DEPTH_HW = (12, 14)  # the network's fixed depth size, small
MAX_ITERS = 10
REL64 = 2.0**-33
LR_REL = 2.0**-20


def daf_config(target_depth_power: int = 2):
    config = default.get_config()
    config.stage = "daf"
    config.model.backbone, config.model.head = models.DAF_BACKBONE, "daf_aspp"
    config.model.num_classes, config.model.base_channels = NUM_CLASSES, WIDTH
    config.model.advent_blocks, config.model.advent_multi_level = (1, 1, 1, 1), False
    config.model.daf_depth_features, config.model.daf_depth_size = FEATURES, DEPTH_HW
    config.model.dtype = "float64"
    config.data.source_depth = True
    config.num_steps = MAX_ITERS
    optim = config.optim
    optim.kind, optim.lr, optim.momentum, optim.weight_decay = "sgd", 2.5e-2, 0.9, 5e-4
    optim.head_keys = ("layer5", "layer6", "depth_head")
    optim.frozen_keys = ("bn", "downsample_1")
    optim.head_lr_mult, optim.warmup_iters, optim.poly_power = 10.0, 0, 0.9
    optim.max_iters, optim.listed_times = MAX_ITERS, "proda_1x"
    config.daf.optim_d.lr, config.daf.optim_d.max_iters = 1e-3, MAX_ITERS
    config.daf.disc_channels = NDF
    config.daf.target_depth_power = target_depth_power
    return config


def make_batches(count: int):
    rng = np.random.default_rng(5)
    out = []
    for _ in range(count):
        labels = rng.integers(0, NUM_CLASSES, (1, *SOURCE_HW)).astype(np.int32)
        labels[:, :4] = 255
        out.append({
            "source_image": rng.normal(size=(1, *SOURCE_HW, 3)),
            "source_label": labels,
            "source_depth": rng.uniform(1.0, 3.0, (1, *SOURCE_HW)),
            "target_image": rng.normal(size=(1, *TARGET_HW, 3)),
        })  # fmt: skip
    return out


def torch_images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(to_advent_input(images)).transpose(0, 3, 1, 2).copy())


def grad_norm(params) -> float:
    return float(np.sqrt(sum(float(torch.sum(p.grad**2)) for p in params if p.grad is not None)))


def test_two_iterations_match_the_reference():
    config = daf_config()
    cfg = ref_step.CfgDaf(input_size_source=SOURCE_HW[::-1], input_size_target=TARGET_HW[::-1],
                          learning_rate=config.optim.lr, learning_rate_d=config.daf.optim_d.lr,
                          max_iters=MAX_ITERS)  # fmt: skip
    with jax.enable_x64(True), torch_threads(1):
        torch.manual_seed(3)
        model_t = ref_model.get_deeplab_v2_depth(NUM_CLASSES, False, (1, 1, 1, 1), WIDTH,
                                                 FEATURES, DEPTH_HW).double().train()  # fmt: skip
        d_t = ref_advent.get_fc_discriminator(NUM_CLASSES, NDF).double()
        opt, opt_d = ref_step.make_optimizers(model_t, d_t, cfg, sgd=SGD1x)
        flax_model = models.build_model(config.model)
        variables = to_flax_variables(numpy_state(model_t), flax_model)
        stage = assemble.assemble(config, variables, jax.random.PRNGKey(0))
        d_params = convert_discriminator(numpy_state(d_t))
        state = stage.state.replace(others={"d_main": stage.state.others["d_main"].replace(
            params=d_params)})  # fmt: skip
        step = assemble.train_step(stage)
        for it, batch in enumerate(make_batches(2)):
            before = jax.device_get(state)
            carried = [np.abs(a - b) for a, b in zip(leaves(before.others["d_main"].params),
                                                      leaves(convert_discriminator(numpy_state(d_t))),
                                                      strict=True)]  # fmt: skip
            state, metrics = step(state, batch)
            norms = {}

            def keep(phase, norms=norms):
                norms[phase] = (grad_norm(model_t.parameters()), grad_norm(d_t.parameters()))

            losses = ref_step.daf_iteration(
                model_t, d_t, opt, opt_d, torch_images(batch["source_image"]),
                torch.from_numpy(batch["source_label"]).long(),
                torch.from_numpy(batch["source_depth"]), torch_images(batch["target_image"]),
                it, cfg, phase_hook=keep,
            )  # fmt: skip
            pairs = {"loss_seg_main": losses["loss_seg_src_main"],
                     "loss_depth_main": losses["loss_depth_src_main"],
                     "loss_adv_main": losses["loss_adv_trg_main"],
                     "loss_d_main_target": losses["loss_d_main"],
                     "loss_d_main_source": losses["loss_d_main_src"],
                     "loss_d_main": losses["loss_d_main"] + losses["loss_d_main_src"]}  # fmt: skip
            for name, ref in pairs.items():
                assert abs(float(metrics[name]) - ref) <= REL64 * abs(ref), (it, name)
            model_norm, d_norm = norms["discriminator"]
            assert abs(float(metrics["grad_norm"]) - model_norm) <= REL64 * model_norm
            assert abs(float(metrics["grad_norm_d_main"]) - d_norm) <= REL64 * d_norm
            check_state(config, it, before, state, model_t, d_t, opt_d, flax_model, model_norm,
                        d_norm, carried)  # fmt: skip


def check_state(config, it, before, state, model_t, d_t, opt_d, flax_model, model_norm, d_norm,
                carried):  # fmt: skip
    expected = to_flax_variables(numpy_state(model_t), flax_model)
    bound = 4 * 10 * config.optim.lr * 2 * 2 * REL64 * model_norm
    for ours, ref in zip(leaves(state.params), leaves(expected["params"]), strict=True):
        assert np.max(np.abs(ours - ref)) <= bound + 8 * EPS64 * np.max(np.abs(ref)), it
    for ours, ref in zip(leaves(state.batch_stats), leaves(expected["batch_stats"]), strict=True):
        assert np.max(np.abs(ours - ref)) <= REL64 * np.max(np.abs(ref)), it
    head_bn = state.params["depth_head"]["mff_bn"]["scale"]
    assert np.max(np.abs(head_bn - before.params["depth_head"]["mff_bn"]["scale"])) > 0
    np.testing.assert_array_equal(state.params["bn1"]["scale"], before.params["bn1"]["scale"])
    beta2 = opt_d.param_groups[0]["betas"][1]
    sqrt_v = convert_discriminator({
        n: (opt_d.state[p]["exp_avg_sq"] / (1 - beta2 ** (it + 1))).sqrt().numpy()
        for n, p in d_t.named_parameters()
    })  # fmt: skip
    lr = float(opt_d.param_groups[0]["lr"])
    expected_d = convert_discriminator(numpy_state(d_t))
    for ours, ref, v, old in zip(leaves(state.others["d_main"].params), leaves(expected_d),
                                 leaves(sqrt_v), carried, strict=True):  # fmt: skip
        limit = adam_param_bound(lr, REL64 * d_norm, v, ref) + old + LR_REL * lr
        assert np.all(np.abs(ours - ref) <= limit), (it, np.max(np.abs(ours - ref)))
