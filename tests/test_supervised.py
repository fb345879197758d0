"""The supervised step (source-only and oracle rows) against a torch transcription, float64.

The transcription: mmseg's CE on the labelled images (logits resized to the labels, 255
ignored, mean over all pixels), backward, one AdamW step with mmcv's two parameter groups
(the decode head at ``head_lr_mult`` x the rate). Bounds as in tests/test_self_training.py:
REL64 = 2^-33 of the values' scale (~2^6 layers of reductions of <= 2^13 rounded terms,
2^-52 each).
"""

import jax
import numpy as np

from ddb_jax import methods, models
from ddb_jax.methods import base, optim
from ddb_jax.methods.state import TrainState
from ddb_jax.methods.supervised import Supervised
from tests.parity_support import (
    adam_param_bound,
    assert_argmax_agrees,
    assert_within,
    group_lr,
    initial_state,
    make_batch,
    make_config,
    paired,
    to_flax,
    top2_margin,
    torch_segmentor,
    torch_threads,
)
from torch_ref.common import nchw, numpy_state_dict, to_torch
from torch_ref.losses import resize, seg_ce
from torch_ref.optim import make_optimizer, set_learning_rates

REL64 = 2.0**-33


def torch_supervised_step(student, opt, it, batch, config):
    """One source-CE iteration (mutates the model and the optimiser); returns the loss, the
    gradients by name and the logits at the label size."""
    set_learning_rates(opt, it, config.optim, config.num_steps)
    student.train()
    opt.zero_grad()
    labels = to_torch(batch["source_label"])
    logits = student(nchw(batch["source_image"]))[0]
    loss = seg_ce(logits, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone().numpy() for n, p in student.named_parameters()}
    opt.step()
    resized = resize(logits.detach(), labels.shape[1:]).numpy()
    return float(loss.detach()), grads, resized


def test_step_matches_torch_transcription():
    config = make_config("supervised")
    student_t = torch_segmentor(seed=8)
    opt = make_optimizer(student_t, config.optim)
    batch = make_batch(20)
    with jax.enable_x64(True), torch_threads(1):
        model = models.build_model(config.model)
        method = methods.create(config, model.apply)
        assert isinstance(method, Supervised)
        tx, _ = optim.make_optimizer(config.optim, config.num_steps)
        state = initial_state(method, tx, to_flax(student_t, model), jax.random.PRNGKey(0))
        step = base.make_train_step(method, tx)
        run = jax.jit(lambda s, b: (base.loss_and_grads(method, s, b), step(s, b)))
        (loss, out, grads), (new_state, metrics) = run(state, batch)
        ref_loss, ref_grads, ref_logits = torch_supervised_step(student_t, opt, 0, batch, config)

    # Loss and metrics; the accuracy counts argmaxes, so only provable near-ties may move it.
    assert set(metrics) == {"loss", "grad_norm", "acc_source"}
    ref_norm = np.sqrt(sum(np.sum(g**2) for g in ref_grads.values()))
    for name, value, ref in (
        ("loss", loss, ref_loss),
        ("loss_source", out["loss_source"], ref_loss),
        ("metrics loss", metrics["loss"], ref_loss),
        ("grad_norm", metrics["grad_norm"], ref_norm),
    ):
        assert abs(float(value) - ref) <= REL64 * abs(ref), (name, float(value), ref)
    labels = batch["source_label"]
    tie = REL64 * np.abs(ref_logits).max()
    assert_argmax_agrees(np.asarray(out["source_prediction"]), ref_logits, 1, tie, "labels")
    valid = labels != 255
    near_ties = np.sum(top2_margin(ref_logits, 1) <= tie)
    ref_acc = 100.0 * np.sum((ref_logits.argmax(1) == labels) & valid) / np.sum(valid)
    acc_bound = 100.0 * near_ties / np.sum(valid) + REL64 * 100.0
    assert abs(float(metrics["acc_source"]) - ref_acc) <= acc_bound
    assert 0.0 < ref_acc < 100.0

    # Gradients, the AdamW step (two groups, elementwise bound: see adam_param_bound) and
    # the BN statistics of the training-mode forward.
    pairs = paired(grads, "params", ref_grads)
    grad_scale = max(np.abs(ref).max() for _, _, ref in pairs)
    assert_within(pairs, REL64 * grad_scale, "gradients")
    assert type(new_state) is TrainState and int(new_state.step) == 1
    ref_state = numpy_state_dict(student_t)
    grads_by_name = {name: ref for name, _, ref in pairs}
    worst = 0.0
    for name, value, ref in paired(new_state.params, "params", ref_state):
        lr = group_lr(name, config.optim, 0, config.num_steps)
        bound = adam_param_bound(lr, REL64 * grad_scale, grads_by_name[name], ref)
        assert np.all(np.abs(value - ref) <= bound), name
        worst = max(worst, float(np.max(np.abs(value - ref))))
    print(f"parameters: max error {worst:.3g}")
    moved = {}
    for group, tree in new_state.params.items():
        change = jax.tree_util.tree_map(
            lambda a, b: np.max(np.abs(a - b)), tree, state.params[group]
        )
        moved[group] = max(jax.tree_util.tree_leaves(change))
    # The head's rate is 10x: its largest move is ~10x the backbone's (|Adam step| <= ~lr).
    assert moved["decode_head"] > 5 * moved["backbone"], moved
    pairs = paired(new_state.batch_stats, "batch_stats", ref_state)
    scale = max(np.abs(ref).max() for _, _, ref in pairs)
    assert_within(pairs, REL64 * scale, "BN statistics")
