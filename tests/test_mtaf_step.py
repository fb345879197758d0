"""MTAF's iterations against a float64 PyTorch transcription of the reference's
(torch_ref/mtaf_step.py, valeoai/MTAF train_UDA.py): the multi-target baseline (two
targets), MDis (two targets: one binary domain classifier per level; three: one-vs-rest)
and MTKT (two targets, distillation from the second iteration on), two iterations each,
with every reference behaviour of config.mtaf kept (its switches' defaults).

Both sides run in float64 from the same weights. Compared: every loss term, the gradient
of every trained tree elementwise (the segmentor's, each discriminator's and domain
classifier's, before any step), the segmentor after its SGD step and its running BN
statistics, each Adam's moments and parameters. Bounds from float64 arithmetic as in
tests/test_advent_step.py: REL64 of each quantity's scale; an SGD step is linear in the
gradient, an Adam step bounded by it (adam_param_bound), and what the first iteration left
carries into the second.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

from ddb_jax import methods, models
from ddb_jax.convert import advent as convert
from ddb_jax.convert.common import convert_to_shapes
from ddb_jax.methods import assemble
from ddb_jax.methods.state import MODEL, create_train_state
from ddb_jax.models.advent_deeplabv2 import frozen_param
from ddb_jax.models.discriminator import FCDiscriminator
from tests.parity_support import EPS64, adam_param_bound, torch_threads
from tests.test_advent_step import (
    MAX_ITERS,
    NDF,
    NUM_CLASSES,
    SOURCE_HW,
    TARGET_HW,
    WIDTH,
    leaves,
    numpy_state,
    torch_images,
)
from tests.test_mtaf_model import LAMBDAS, TARGETS, mtaf_config, mtkt_torch_name
from torch_ref import advent as ref_advent
from torch_ref import mtaf as ref_mtaf
from torch_ref import mtaf_mtkt_step as ref_mtkt
from torch_ref import mtaf_step as ref_step
from torch_ref.optim041 import SGD041

REL64 = 2.0**-33  # far above the float64 rounding of a few 1e5 operations per value
LR_REL = 2.0**-20  # XLA's float64 pow in the compiled optimisers (test_advent_step.py)
# case -> (stage, targets)
CASES = {"baseline": ("mtaf_baseline", 2), "mdis": ("mtaf_mdis", 2),
         "mdis3": ("mtaf_mdis", 3), "mtkt": ("mtaf_mtkt", 2)}  # fmt: skip


def reference_cfg(config) -> ref_step.CfgMtaf:
    return ref_step.CfgMtaf(
        num_classes=NUM_CLASSES, input_size_source=SOURCE_HW[::-1],
        input_size_target=TARGET_HW[::-1], learning_rate=config.optim.lr,
        learning_rate_d=config.mtaf.optim_d.lr, max_iters=MAX_ITERS, teacher_iters=1,
        **LAMBDAS,
    )  # fmt: skip


def make_batches(num_targets: int, count: int = 2) -> list[dict]:
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(count):
        labels = rng.integers(0, NUM_CLASSES, (1, *SOURCE_HW)).astype(np.int32)
        labels[:, :4] = 255
        batch = {"source_image": rng.normal(size=(1, *SOURCE_HW, 3)), "source_label": labels}
        for name in TARGETS[:num_targets]:
            batch[f"target_image_{name}"] = rng.normal(size=(1, *TARGET_HW, 3))
        batches.append(batch)
    return batches


@functools.cache
def shapes_of(flax_model):
    """The variable shapes of a segmentor, or with None of the discriminator."""
    if flax_model is not None:
        return models.variable_shapes(flax_model)
    probe = jax.ShapeDtypeStruct((1, 64, 64, NUM_CLASSES), np.float32)
    return jax.eval_shape(lambda x: FCDiscriminator(ndf=NDF).init(jax.random.key(0), x), probe)


def to_variables(state_dict: dict, flax_model, mtkt: bool) -> dict:
    name = mtkt_torch_name if mtkt else convert.torch_name
    return convert_to_shapes(state_dict, shapes_of(flax_model), name, dtype=np.float64)


def convert_discriminator(state_dict: dict) -> dict:
    """A torch discriminator's tensors (its state dict, gradients, moments) in our layout."""
    return convert_to_shapes(state_dict, shapes_of(None), convert.discriminator_torch_name,
                             dtype=np.float64)["params"]  # fmt: skip


def tree_names(stage: str, num_targets: int) -> list[str]:
    levels = ("main", "aux")
    if stage == "mtaf_baseline":
        return [f"d_{lv}" for lv in levels]
    names = [f"d_{lv}_{i}" for lv in levels for i in range(num_targets)]
    if stage == "mtaf_mdis":
        names += ([f"dt_{lv}" for lv in levels] if num_targets == 2
                  else [f"dt_{lv}_{j}" for lv in levels for j in range(num_targets)])  # fmt: skip
    return names


class Reference:
    """The torch side of one case: modules, optimisers, and one iteration at a time."""

    def __init__(self, stage: str, num_targets: int, cfg: ref_step.CfgMtaf):
        self.stage, self.num_targets, self.cfg = stage, num_targets, cfg
        torch.manual_seed(5)
        if stage == "mtaf_mtkt":
            self.model = ref_mtaf.get_deeplab_v2_mtkt(NUM_CLASSES, True, 1 + num_targets,
                                                      (1, 1, 1, 1), WIDTH)  # fmt: skip
        else:
            self.model = ref_advent.get_deeplab_v2(NUM_CLASSES, True, (1, 1, 1, 1), WIDTH)
        self.model = self.model.double().train()
        self.discs = {name: ref_advent.get_fc_discriminator(NUM_CLASSES, NDF).double()
                      for name in tree_names(stage, num_targets)}  # fmt: skip
        if stage == "mtaf_baseline":
            self.sgd = SGD041(self.model.optim_parameters(cfg.learning_rate),
                              lr=cfg.learning_rate, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)  # fmt: skip
        else:
            groups = self.model.optim_parameters(cfg.learning_rate, unique=True)
            self.sgd = torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)  # fmt: skip
        self.adams = {name: ref_step.make_adam(d, cfg) for name, d in self.discs.items()}

    def iteration(self, batch: dict, it: int, hook) -> dict:
        d, o, count = self.discs, self.adams, self.num_targets
        source = (torch_images(batch["source_image"]),
                  torch.from_numpy(batch["source_label"]).long())  # fmt: skip
        targets = [torch_images(batch[f"target_image_{n}"]) for n in TARGETS[:count]]
        inputs = (*source, targets, it, self.cfg)
        per = lambda kind: [d[f"{kind}_{i}"] for i in range(count)]  # noqa: E731
        opts = lambda kind: [o[f"{kind}_{i}"] for i in range(count)]  # noqa: E731
        if self.stage == "mtaf_baseline":
            return ref_step.baseline_iteration(self.model, d["d_aux"], d["d_main"], self.sgd,
                                               o["d_aux"], o["d_main"], *inputs,
                                               phase_hook=hook)  # fmt: skip
        if self.stage == "mtaf_mtkt":
            return ref_mtkt.mtkt_iteration(self.model, per("d_main"), per("d_aux"), self.sgd,
                                           opts("d_main"), opts("d_aux"), *inputs,
                                           phase_hook=hook)  # fmt: skip
        if count == 2:
            classifiers = (d["dt_main"], d["dt_aux"], o["dt_main"], o["dt_aux"])
        else:
            classifiers = (per("dt_main"), per("dt_aux"), opts("dt_main"), opts("dt_aux"))
        dt, dt_aux, odt, odt_aux = classifiers
        return ref_step.mdis_iteration(self.model, per("d_main"), per("d_aux"), dt, dt_aux,
                                       self.sgd, opts("d_main"), opts("d_aux"), odt, odt_aux,
                                       *inputs, phase_hook=hook)  # fmt: skip

    def grads(self) -> dict:
        """Every tree's gradient as numpy state dicts (None -> zeros; buffers zero)."""
        out = {}
        for name, module in (("model", self.model), *self.discs.items()):
            state = {k: np.zeros_like(v) for k, v in numpy_state(module).items()}
            for key, p in module.named_parameters():
                if p.grad is not None:
                    state[key] = p.grad.detach().numpy().copy()
            out[name] = state
        return out


def jitted_update(method, txs):
    """The method's iteration, compiled once, with its gradients (the step's outputs)."""

    def update(state, batch):
        new_state, out, metrics = method.update(txs, state, batch)
        return new_state, metrics, out["grads"]

    return jax.jit(update)


@pytest.mark.parametrize("case", list(CASES))
def test_two_iterations_match_the_reference(case):
    stage, count = CASES[case]
    config = mtaf_config(stage, count)
    methods.check_config(config)
    cfg = reference_cfg(config)
    mtkt = stage == "mtaf_mtkt"
    with jax.enable_x64(True), torch_threads(1):
        ref = Reference(stage, count, cfg)
        flax_model = models.build_model(config.model)
        variables = to_variables(numpy_state(ref.model), flax_model, mtkt)
        method = methods.create(config, flax_model.apply)
        txs = assemble.optimizers(config, method)
        assert sorted(method.other_trees) == sorted(ref.discs)
        others = {k: convert_discriminator(numpy_state(d)) for k, d in ref.discs.items()}
        # The torch weights and every optimiser's state (one compiled program).
        state = jax.jit(lambda v, o: create_train_state(v, txs, jax.random.PRNGKey(0), o))(
            variables, others
        )
        update = jitted_update(method, txs)
        for it, batch in enumerate(make_batches(count)):
            before = jax.device_get(state)
            state, metrics, grads = update(state, batch)
            captured = {}

            def keep_grads(phase, captured=captured):
                if phase == "before_step":  # every tree's gradient, before any step
                    captured[phase] = ref.grads()

            losses = ref.iteration(batch, it, keep_grads)
            check_losses(method, metrics, losses, it, mtkt)
            check_trees(config, it, before, state, grads, captured["before_step"], ref, mtkt,
                        flax_model)  # fmt: skip


def check_losses(method, metrics, losses, it, mtkt):
    for name in method.metric_names:
        ours, theirs = float(metrics[name]), losses[name]
        assert abs(ours - theirs) <= REL64 * abs(theirs), (it, name, ours, theirs)
    if mtkt:  # the distillation starts at the second iteration
        assert (float(metrics["loss_kl_main_0"]) > 0) == (it >= 1)


def check_trees(config, it, before, state, grads, ref_grads, ref, mtkt, flax_model):
    # The segmentor's gradient (BN affines aside: frozen, no reference gradient).
    theirs = to_variables(ref_grads["model"], flax_model, mtkt)["params"]
    pairs = [(p, np.asarray(a), b) for (p, a), b in zip(
        jax.tree_util.tree_leaves_with_path(grads[MODEL]), leaves(theirs), strict=True)
        if not frozen_param(p)]  # fmt: skip
    scale = max(np.abs(b).max() for _, _, b in pairs)
    for path, a, b in pairs:
        assert np.max(np.abs(a - b)) <= REL64 * scale, (it, jax.tree_util.keystr(path))
    # The segmentor after SGD (linear in the gradient: <= 10 lr (1 + m) per listing, 4 at
    # most) and its running statistics.
    expected = to_variables(numpy_state(ref.model), flax_model, mtkt)
    norm = np.sqrt(sum(np.sum(b**2) for _, _, b in pairs))
    bound = 4 * 10 * config.optim.lr * 2 * 2 * REL64 * norm
    for ours, r in zip(leaves(state.params), leaves(expected["params"]), strict=True):
        assert np.max(np.abs(ours - r)) <= bound + 8 * EPS64 * np.max(np.abs(r)), it
    for ours, r in zip(leaves(state.batch_stats), leaves(expected["batch_stats"]), strict=True):
        assert np.max(np.abs(ours - r)) <= REL64 * np.max(np.abs(r)), it
    pairs = zip(leaves(state.params), leaves(before.params), strict=True)
    moved = max(np.max(np.abs(a - b)) for a, b in pairs)
    assert moved > 1e4 * bound, "the step moved nothing measurable"
    for name, module in ref.discs.items():
        check_discriminator(name, module, ref.adams[name], it, before, state, grads, ref_grads)


def check_discriminator(name, module, opt, it, before, state, grads, ref_grads):
    """One tree's gradient, Adam moments and parameters; a tree the reference never
    trains (no gradient, no Adam state) must not move."""
    theirs = leaves(convert_discriminator(ref_grads[name]))
    ours = leaves(grads[name])
    scale = max(np.abs(t).max() for t in theirs)
    grad_error = REL64 * scale
    for a, b in zip(ours, theirs, strict=True):
        assert np.max(np.abs(a - b)) <= grad_error, (it, name)
    params_now = leaves(state.others[name].params)
    expected = leaves(convert_discriminator(numpy_state(module)))
    carried = [np.abs(a - b) for a, b in zip(leaves(before.others[name].params), expected,
                                             strict=True)]  # fmt: skip
    if scale == 0:
        assert all(np.array_equal(a, b) for a, b in zip(params_now, expected, strict=True))
        return
    adam = [s for s in jax.tree_util.tree_leaves(state.others[name].opt_state,
                                                 is_leaf=lambda x: hasattr(x, "nu"))
            if hasattr(s, "nu")][0]  # fmt: skip
    params = list(module.parameters())
    steps = opt.state[params[0]]["step"]
    steps = int(steps.item() if isinstance(steps, torch.Tensor) else steps)
    beta2 = opt.param_groups[0]["betas"][1]
    for moment, key, bound in (("mu", "exp_avg", grad_error),
                               ("nu", "exp_avg_sq", 2 * grad_error * scale)):  # fmt: skip
        ref_moment = leaves(convert_discriminator(
            {n: opt.state[p][key].numpy() for n, p in module.named_parameters()}))  # fmt: skip
        for a, b in zip(leaves(getattr(adam, moment)), ref_moment, strict=True):
            assert np.max(np.abs(a - b)) <= bound, (it, name, moment)
    sqrt_v = leaves(convert_discriminator({
        n: (opt.state[p]["exp_avg_sq"] / (1 - beta2**steps)).sqrt().numpy()
        for n, p in module.named_parameters()}))  # fmt: skip
    lr = float(opt.param_groups[0]["lr"])
    repeats = steps // (it + 1)  # the baseline's discriminators step once per target
    for a, b, v, old in zip(params_now, expected, sqrt_v, carried, strict=True):
        limit = repeats * (adam_param_bound(lr, grad_error, v, b) + LR_REL * lr) + old
        assert np.all(np.abs(a - b) <= limit), (it, name, np.max(np.abs(a - b)))
    moved = max(np.max(np.abs(a - b)) for a, b in zip(params_now, leaves(
        before.others[name].params), strict=True))  # fmt: skip
    assert moved > 0.1 * lr, (it, name, moved)
