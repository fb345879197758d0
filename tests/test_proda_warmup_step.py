"""ProDA's warm-up iteration against a float64 PyTorch transcription of the reference's
(torch_ref/proda_warmup_step.py, microsoft/ProDA ``step_adv``): ProDA's DeepLabV2 at tiny
widths, its discriminator, two iterations (so SGD's momentum, Adam's moments and the poly
rate of iteration 1 are covered), the reference's optimisers as it ran them (the 1x group's
nested parameters listed 3 or 4 times and stepped by torch 1.x's SGD; Adam). One listing
per parameter (``optim.listed_times=''``) is plain SGD, checked by the other step tests;
the 'bce' GAN loss is checked against torch's below.

Compared: the losses, every gradient of both trees, the segmentor after SGD, its BN
statistics, the discriminator after Adam. Bounds: REL64 = 2^-33 of each collection's
scale, far above the float64 rounding of the ~2^18 operations behind a value (the other
float64 step tests'); an SGD step is linear in the gradient, an Adam step bounded by it
(``adam_param_bound``); XLA's float64 pow (the poly rate, Adam's bias corrections) is
accurate to ~1e-9, so LR_REL of each step's size is allowed from iteration 1.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import default
from ddb_jax import methods, models, ops
from ddb_jax.convert.proda import convert_proda
from ddb_jax.methods import assemble
from ddb_jax.methods.proda_warmup import DISCRIMINATOR, GAN_LOSSES
from ddb_jax.methods.state import MODEL, apply_updates, create_train_state
from ddb_jax.models.discriminator import LAYER_NAMES, proda_discriminator
from ddb_jax.uda import adversarial
from tests.parity_support import EPS64, REL64, adam_param_bound, assert_within, torch_threads
from torch_ref import proda as ref_model
from torch_ref import proda_warmup_step as ref
from torch_ref.common import nchw, numpy_state_dict
from torch_ref.proda_step import SGD1x
from torch_ref.resnet_dlv2 import randomize

NUM_CLASSES, BLOCKS, WIDTH, HEAD_CHANNELS, NDF = 5, (1, 1, 1, 1), 4, 32, 8
SOURCE_HW, TARGET_HW = (32, 48), (40, 40)  # D's outputs: 2 x 3 and 3 x 3
LR, LR_D, MAX_ITERS = 1e-2, 1e-3, 10
LR_REL = 2.0**-20


def warmup_config(gan: str, listed: bool):
    config = default.get_config()
    config.stage = "proda_warmup"
    model = config.model
    model.backbone, model.head, model.num_classes = "resnet101_proda", "proda_aspp", NUM_CLASSES
    model.base_channels, model.head_channels, model.proda_blocks = WIDTH, HEAD_CHANNELS, BLOCKS
    model.dropout_ratio, model.dtype = 0.0, "float64"
    config.num_steps = MAX_ITERS
    o = config.optim
    o.kind, o.lr, o.momentum, o.weight_decay, o.poly_power = "sgd", LR, 0.9, 2e-4, 0.9
    o.head_keys, o.head_lr_mult, o.warmup_iters = ("layer5", "bn_pretrain"), 10.0, 0
    o.listed_times = "proda_1x" if listed else ""
    config.proda_warmup.gan = gan
    config.proda_warmup.disc_channels = NDF
    config.proda_warmup.optim_d.lr = LR_D
    return config


def make_batches(count: int) -> list[tuple[dict, tuple]]:
    """(our batch, the reference's inputs): images as our normalised RGB and as ProDA's
    RGB / 255."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(count):
        rgb = {k: rng.uniform(0, 255, (2, *hw, 3)) for k, hw in
               (("source_image", SOURCE_HW), ("target_image", TARGET_HW))}  # fmt: skip
        labels = rng.integers(0, NUM_CLASSES, (2, *SOURCE_HW)).astype(np.int32)
        labels[:, :4] = 255
        batch = {k: (v - np.asarray(ops.IMAGE_MEAN)) / np.asarray(ops.IMAGE_STD)
                 for k, v in rgb.items()}  # fmt: skip
        batch["source_label"] = labels
        inputs = (nchw(rgb["source_image"] / 255.0), torch.from_numpy(labels).long(),
                  nchw(rgb["target_image"] / 255.0))  # fmt: skip
        out.append((batch, inputs))
    return out


def disc_to_flax(state_dict: dict) -> dict:
    """Copies (a state dict's arrays share the tensors' memory, which the reference's step
    changes in place while the jitted step may still read its inputs)."""
    return {name: {"kernel": state_dict[f"{name}.weight"].transpose(2, 3, 1, 0).copy(),
                   "bias": state_dict[f"{name}.bias"].copy()} for name in LAYER_NAMES}  # fmt: skip


def leaf_pairs(ours, theirs, what: str) -> list:
    flat = jax.tree_util.tree_flatten_with_path(ours)[0]
    refs = jax.tree_util.tree_leaves(theirs)
    assert len(flat) == len(refs), what
    return [(f"{what} {jax.tree_util.keystr(p)}", np.asarray(a), np.asarray(b))
            for (p, a), b in zip(flat, refs, strict=True)]  # fmt: skip


def scale_of(pairs) -> float:
    return max(np.abs(r).max() for _, _, r in pairs)


def test_two_iterations_match_the_reference():
    """The reference as it ran: least squares, the 1x group listed as its SGD saw it."""
    config = warmup_config("ls", listed=True)
    opt = ref.Options(n_class=NUM_CLASSES, gan="LS", lr=LR, lr_d=LR_D, train_iters=MAX_ITERS,
                      ignore_index=255)  # fmt: skip
    with jax.enable_x64(True), torch_threads(1):
        model_t = ref_model.deeplab(NUM_CLASSES, BLOCKS, WIDTH, HEAD_CHANNELS, 0.0)
        model_t = randomize(model_t, seed=2).double().train()
        torch.manual_seed(0)
        disc_t = ref.FCDiscriminator(NUM_CLASSES, NDF).double()
        flax_model = models.build_model(config.model)

        def to_flax(tensors=None):
            """The segmentor's variables (``tensors``, e.g. gradients, replacing its
            parameters)."""
            state = {k: v.copy() for k, v in numpy_state_dict(model_t).items()}
            state.update({k: v.numpy() for k, v in (tensors or {}).items()})
            return convert_proda(state, flax_model, dtype=np.float64)

        method = methods.create(config, flax_model.apply)
        txs = assemble.optimizers(config, method)
        assert set(txs) == {MODEL, DISCRIMINATOR}
        # The state at step 0 with the reference's discriminator, as one compiled program.
        state = jax.jit(lambda v, d, k: create_train_state(v, txs, k, {DISCRIMINATOR: d}))(
            to_flax(), disc_to_flax(numpy_state_dict(disc_t)), jax.random.PRNGKey(0)
        )

        @jax.jit
        def step(state, batch):
            grads, out, metrics = method.gradients(state, batch)
            return apply_updates(state, grads, out["batch_stats"], txs), grads, metrics

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "optimizer contains a parameter group with dup")
            base_opti, opt_d = ref.make_optimizers(model_t, disc_t, opt, sgd=SGD1x)
        base_lrs = [g["lr"] for g in base_opti.param_groups]
        d_lrs = [g["lr"] for g in opt_d.param_groups]
        carried = {MODEL: 0.0, DISCRIMINATOR: 0.0}
        for it, (batch, inputs) in enumerate(make_batches(2)):
            before = jax.device_get(state)
            state, grads, metrics = step(state, batch)
            ref.poly_rate(base_opti, base_lrs, it, MAX_ITERS)
            ref.poly_rate(opt_d, d_lrs, it, MAX_ITERS)
            record = {}
            losses = ref.step_adv(model_t, disc_t, base_opti, opt_d, *inputs, opt, record)
            check_losses(metrics, losses, config)
            carried = check_updates(it, before, state, grads, record, model_t, disc_t, opt_d,
                                    to_flax, carried)  # fmt: skip


def check_losses(metrics, losses, config) -> None:
    weight = config.proda_warmup.adv_weight
    expected = {
        "loss_source": losses["loss_GTA"], "loss_d": losses["loss_D"],
        "loss_d_source": losses["loss_D_source"], "loss_d_target": losses["loss_D_target"],
        "loss": losses["loss_GTA"] + losses["loss_adv_G"],
    }  # fmt: skip
    values = {k: float(metrics[k]) for k in expected}
    values["loss_adv"] = weight * float(metrics["loss_adv"])
    expected["loss_adv"] = losses["loss_adv_G"]
    for name, theirs in expected.items():
        assert abs(values[name] - theirs) <= REL64 * abs(theirs), (name, values[name], theirs)


def check_updates(it, before, state, grads, record, model_t, disc_t, opt_d, to_flax, carried):
    """Gradients of both trees, the parameters after each optimiser, the BN statistics;
    returns each tree's largest parameter error (carried into the next iteration)."""
    ref_grads = to_flax(record["grads"])["params"]
    grad_pairs = leaf_pairs(grads[MODEL], ref_grads, "gradient")
    grad_bound = REL64 * scale_of(grad_pairs)
    assert_within(grad_pairs, grad_bound, f"segmentor gradients {it}")
    d_grad_pairs = leaf_pairs(grads[DISCRIMINATOR], disc_to_flax(
        {k: v.numpy() for k, v in record["disc_grads"].items()}), "D gradient")  # fmt: skip
    d_grad_bound = REL64 * scale_of(d_grad_pairs)
    assert_within(d_grad_pairs, d_grad_bound, f"discriminator gradients {it}")
    assert all(np.abs(r).max() > 0 for _, _, r in grad_pairs + d_grad_pairs), "no gradient"

    # SGD: linear in the gradient; 4 listings at most, each through the momentum buffer
    # (<= 10 of a gradient), the head at 10x; plus the rate's error and the carried error.
    expected = to_flax()
    params = leaf_pairs(state.params, expected["params"], "parameter")
    moved = leaf_pairs(state.params, before.params, "step")
    bound_grad = 10 * LR * 4 * 10 * (it + 1) * grad_bound + carried[MODEL]
    worst = 0.0
    for (name, ours, theirs), (_, _, old) in zip(params, moved, strict=True):
        limit = bound_grad + LR_REL * np.abs(theirs - old) + 16 * EPS64 * np.abs(theirs)
        assert np.all(np.abs(ours - theirs) <= limit), (it, name)
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert max(np.abs(a - b).max() for _, a, b in moved) > 1e4 * bound_grad, "nothing moved"
    stats = leaf_pairs(state.batch_stats, expected["batch_stats"], "BN")
    assert_within(stats, REL64 * scale_of(stats), f"BN statistics {it}")

    # Adam: bounded by the gradients' error given sqrt(v) (the reference's, bias-corrected).
    beta2 = opt_d.param_groups[0]["betas"][1]
    step = it + 1
    sqrt_v = disc_to_flax({n: (opt_d.state[p]["exp_avg_sq"] / (1 - beta2**step)).sqrt().numpy()
                           for n, p in disc_t.named_parameters()})  # fmt: skip
    lr_d = float(opt_d.param_groups[0]["lr"])
    d_params = leaf_pairs(state.others[DISCRIMINATOR].params,
                          disc_to_flax(numpy_state_dict(disc_t)), "D parameter")  # fmt: skip
    d_worst = 0.0
    for (name, ours, theirs), v in zip(d_params, jax.tree_util.tree_leaves(sqrt_v), strict=True):
        limit = (adam_param_bound(lr_d, d_grad_bound, v, theirs) + carried[DISCRIMINATOR]
                 + LR_REL * lr_d)  # fmt: skip
        assert np.all(np.abs(ours - theirs) <= limit), (it, name)
        d_worst = max(d_worst, float(np.abs(ours - theirs).max()))
    d_moved = leaf_pairs(state.others[DISCRIMINATOR].params,
                         before.others[DISCRIMINATOR].params, "D step")  # fmt: skip
    assert max(np.abs(a - b).max() for _, a, b in d_moved) > 0.1 * lr_d
    print(f"iteration {it}: parameters max error {worst:.3g}, D {d_worst:.3g}")
    return {MODEL: worst, DISCRIMINATOR: d_worst}


def test_least_squares_gan_loss_is_the_closed_form():
    """``mse_to_label``: sum (x - y)^2 / n, gradient 2 (x - y) / n, for either label; both
    GAN losses as the reference's torch losses (MSELoss, BCEWithLogitsLoss: 'LS', 'Vanilla')."""
    x = jnp.array([[0.5, -1.0], [2.0, 0.0]])
    assert float(adversarial.mse_to_label(x, 1.0)) == (0.25 + 4.0 + 1.0 + 1.0) / 4
    assert float(adversarial.mse_to_label(x, 0.0)) == (0.25 + 1.0 + 4.0 + 0.0) / 4
    grad = jax.grad(adversarial.mse_to_label)(x, 1.0)
    np.testing.assert_array_equal(grad, 2 * (x - 1.0) / 4)
    outputs = np.random.default_rng(3).normal(size=(2, 3, 4, 1))
    with jax.enable_x64(True):
        for ours, theirs in (("ls", "LS"), ("bce", "Vanilla")):
            for label in (0, 1):
                value = float(GAN_LOSSES[ours](jnp.asarray(outputs), float(label)))
                torch_out = torch.from_numpy(outputs)
                expected = ref.gan_loss(theirs)(torch_out, ref.filled(torch_out, label)).item()
                assert abs(value - expected) <= 4 * EPS64 * abs(expected), (ours, label)


def test_proda_discriminator_layout():
    """3x3/2 convs of ndf x 1, 2, 4, 8 channels and a 1x1 classifier: H -> ceil(H / 16)."""
    disc = proda_discriminator(ndf=NDF)
    maps = jnp.zeros((1, 33, 48, NUM_CLASSES))
    params = jax.eval_shape(disc.init, jax.random.PRNGKey(0), maps)["params"]
    shapes = {name: params[name]["kernel"].shape for name in LAYER_NAMES}
    assert shapes == {"conv1": (3, 3, NUM_CLASSES, NDF), "conv2": (3, 3, NDF, 2 * NDF),
                      "conv3": (3, 3, 2 * NDF, 4 * NDF), "conv4": (3, 3, 4 * NDF, 8 * NDF),
                      "classifier": (1, 1, 8 * NDF, 1)}  # fmt: skip
    assert jax.eval_shape(disc.apply, {"params": params}, maps).shape == (1, 3, 3, 1)
