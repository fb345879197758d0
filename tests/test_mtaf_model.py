"""MTAF's multi-head DeepLabV2 (MTKT): float64 parity with the PyTorch transcription of
``ResNetMultiMTKT`` (torch_ref/mtaf.py), its parameter names and groups; then what of the
MTAF methods needs no segmentor step: each reference-behaviour switch's intended side,
the settings the methods refuse, the stage graph and the shipped configs, the KL.

``AdventDeepLabV2(num_heads=1 + T)`` nests the reference's ``aux_classifier_list.{i}`` and
``main_classifier_list.{i}`` as ``layer5/head_{i}`` and ``layer6/head_{i}``: every head is a
classifier (10x rate, no ImageNet weights, listed once), the backbone is ADVENT's, and
'logits' is head 0's, the one the reference evaluates. MTAF's saved files convert through
the tool's path (ddb_jax.convert: heads, levels and classes read off the keys).
tests/test_mtaf_step.py checks the iterations (with the switches' defaults) against the
reference's.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from configs import advent_gta2cs, default
from ddb_jax import checkpoints, config_checks, methods, models
from ddb_jax.convert import advent as convert
from ddb_jax.convert import convert_model_state
from ddb_jax.convert.advent import mtkt_torch_name
from ddb_jax.convert.common import ConversionError, path_to_str
from ddb_jax.graph import stage_graph
from ddb_jax.methods import advent, mtaf_mtkt, mtaf_shared, optim
from ddb_jax.methods.state import MODEL, create_train_state
from ddb_jax.models.advent_deeplabv2 import (
    AdventDeepLabV2,
    build_advent,
    frozen_param,
    is_classifier_param,
    listed_times,
)
from ddb_jax.uda import adversarial
from tests.parity_support import torch_threads
from tests.test_advent_model import BLOCKS, LOGITS_HW, NUM_CLASSES, WIDTH, assert_close, images
from tests.test_advent_model import randomize as randomize_torch
from tests.test_advent_model import reference_model as advent_reference_model
from tests.test_advent_step import MAX_ITERS, NDF, SOURCE_HW, TARGET_HW, advent_config
from torch_ref import mtaf as ref
from torch_ref import mtaf_step as ref_step
from torch_ref.common import nhwc, numpy_state_dict

HEADS = 3  # a student and two teachers
TARGETS = ("cityscapes", "mapillary", "synthia")  # names only: they key the batches
LAMBDAS = dict(lambda_seg_main=2.0, lambda_seg_aux=0.3, lambda_adv_main=0.04,
               lambda_adv_aux=0.02, lambda_kl_target=4.0)  # fmt: skip


def convert_mtkt(state_dict: dict, model, dtype=np.float64) -> dict:
    return convert.convert_advent(state_dict, model, dtype=dtype)


def mtaf_config(stage: str, num_targets: int):
    config = advent_config(stage)
    config.data.target = TARGETS[:num_targets]
    config.data.per_target_streams = True
    config.model.advent_heads = 1 + num_targets if stage == "mtaf_mtkt" else 1
    # The published baseline ran without AMP: ADVENT's listed 1x group on PyTorch 1.3.1's
    # SGD (0.4.1's arithmetic); MDis and MTKT under apex O2, each listing its own master.
    config.optim.listed_times = "advent_1x" if stage == "mtaf_baseline" else ""
    section = config.mtaf
    section.update(LAMBDAS)
    section.teacher_iters = 1  # the first iteration before the distillation, the second after
    section.disc_channels = NDF
    section.optim_d.lr, section.optim_d.max_iters = 1e-3, MAX_ITERS
    return config


def tiny_model(dtype=jnp.float64) -> AdventDeepLabV2:
    return AdventDeepLabV2(NUM_CLASSES, True, BLOCKS, WIDTH, dtype=dtype, num_heads=HEADS)


def reference_model() -> ref.ResNetMultiMTKT:
    model = ref.get_deeplab_v2_mtkt(NUM_CLASSES, True, HEADS, BLOCKS, WIDTH)
    return randomize_torch(model, seed=1).double()


@functools.cache
def parity_run():
    normalised, advent_input = images(seed=2)
    torch_model = reference_model()
    state_before = {k: v.copy() for k, v in numpy_state_dict(torch_model).items()}
    with torch_threads(1), torch.no_grad():
        eval_out = torch_model.eval()(advent_input)
        train_out = torch_model.train()(advent_input)
    model = tiny_model()
    with jax.enable_x64(True):
        variables = convert_mtkt(state_before, model)
        expected_stats = convert_mtkt(numpy_state_dict(torch_model), model)["batch_stats"]

        @jax.jit
        def forward(variables, images):
            eval_ours = model.apply(variables, images, train=False)
            train_ours, updates = model.apply(variables, images, train=True, mutable="batch_stats")
            return eval_ours, train_ours, updates["batch_stats"]

        ours = jax.tree_util.tree_map(np.asarray, forward(variables, jnp.asarray(normalised)))
    return ours, (eval_out, train_out, expected_stats)


def test_every_head_matches_the_reference_in_eval_and_training():
    """Each head's main and auxiliary logits (eval: running statistics; training: batch
    statistics, running ones moved as torch moves them); 'logits' is head 0's."""
    (eval_ours, train_ours, stats), (eval_ref, train_ref, expected_stats) = parity_run()
    for ours, (aux_list, main_list), mode in ((eval_ours, eval_ref, "eval"),
                                              (train_ours, train_ref, "train")):  # fmt: skip
        assert set(ours) == {*AdventDeepLabV2.output_names, *AdventDeepLabV2.head_output_names}
        assert ours["head_logits"].shape == (HEADS, 2, *LOGITS_HW, NUM_CLASSES)
        for head in range(HEADS):
            assert_close(ours["head_logits"][head], nhwc(main_list[head]), f"{mode} main {head}")
            assert_close(ours["head_aux_logits"][head], nhwc(aux_list[head]), f"{mode} aux {head}")
        np.testing.assert_array_equal(ours["logits"], ours["head_logits"][0])
        np.testing.assert_array_equal(ours["aux_logits"], ours["head_aux_logits"][0])
        heads_differ = np.abs(ours["head_logits"][1] - ours["head_logits"][0]).max()
        assert heads_differ > 1e-3, "the heads are not distinct"
    for got, want in zip(jax.tree_util.tree_leaves(stats),
                         jax.tree_util.tree_leaves(expected_stats), strict=True):  # fmt: skip
        assert_close(got, want, "running statistic")


def test_heads_are_classifiers_in_the_references_groups():
    """Frozen BN affines, the 10x group (every head) and the 1x group with its listings are
    the reference's (``optim_parameters``), also through the optimiser config of
    configs/advent_gta2cs.py; the ImageNet initialisation fills the backbone alone."""
    torch_model = reference_model()
    names = {id(p): n for n, p in torch_model.named_parameters()}
    frozen = {n for n, p in torch_model.named_parameters() if not p.requires_grad}
    classifier = {names[id(p)] for p in torch_model.classifier_parameters()}
    repeats = collections.Counter(names[id(p)] for p in torch_model.backbone_parameters())
    assert len(classifier) == 2 * HEADS * 4 * 2  # aux and main, 4 convs, weight and bias
    shapes = models.variable_shapes(tiny_model(jnp.float32))
    config = default.get_config()
    advent_gta2cs.advent_model(config)
    cfg = config.optim
    labels = optim.param_groups(shapes["params"], (), cfg.head_keys, cfg.frozen_keys)
    by_label = {"frozen": set(), "head": set(), "backbone": set()}
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        key = mtkt_torch_name(("params", *path_to_str(path).split("/"))).key
        by_label[label].add(key)
        assert is_classifier_param(path) == (key in classifier), key
        assert frozen_param(path) == (key in frozen), key
        if key in repeats:
            assert listed_times(path) == repeats[key], key
    assert by_label == {"frozen": frozen, "head": classifier, "backbone": set(repeats)}
    is_backbone = models.backbone_predicate(tiny_model())
    assert [name for name in shapes["params"] if not is_backbone(name)] == ["layer5", "layer6"]


def test_one_head_keeps_advents_model():
    """``num_heads=1`` (the default, and ``config.model.advent_heads`` unset) is ADVENT's
    network, names and outputs unchanged; ``advent_heads`` builds the heads."""
    cfg = ml_collections.ConfigDict({"num_classes": 5, "dtype": "float32", "base_channels": 8,
                                     "advent_blocks": [1, 1, 1, 1]})  # fmt: skip
    one = build_advent(cfg)
    assert one == AdventDeepLabV2(5, True, (1, 1, 1, 1), 8, jnp.float32)
    params = models.variable_shapes(one)["params"]
    assert set(params["layer6"]) == {f"conv2d_list_{i}" for i in range(4)}
    cfg.advent_heads = HEADS
    several = build_advent(cfg)
    assert several.num_heads == HEADS
    params = models.variable_shapes(several)["params"]
    for name in ("layer5", "layer6"):
        assert set(params[name]) == {f"head_{i}" for i in range(HEADS)}
    out = jax.eval_shape(lambda v, x: several.apply(v, x), models.variable_shapes(several),
                         jax.ShapeDtypeStruct((1, 47, 41, 3), jnp.float32))  # fmt: skip
    assert out["logits"].shape == (1, *LOGITS_HW, 5)
    assert out["head_aux_logits"].shape == (HEADS, 1, *LOGITS_HW, 5)


# --- MTAF's released files: conversion ---------------------------------------------------


def file_model_config(**overrides) -> ml_collections.ConfigDict:
    """What tools/convert_checkpoint.py builds (ADVENT's backbone, head and the default
    ``advent_heads`` of 1), at the tiny model's size."""
    cfg = default.get_model_config()
    cfg.update(backbone=models.ADVENT_BACKBONE, head="advent_aspp", num_classes=NUM_CLASSES,
               base_channels=WIDTH, advent_blocks=BLOCKS)  # fmt: skip
    cfg.update(overrides)
    return cfg


@torch.no_grad()
def float32_exact(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor rounded to a float32 value (kept in float64): the converter's float32
    leaves then hold the reference's weights exactly, and float64 parity holds."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.float().double())
    return model


def test_an_mtkt_file_converts_with_its_heads_and_every_head_matches(tmp_path):
    """MTKT's ``model.state_dict()`` (``main_classifier_list.{i}``, ``aux_classifier_list.{i}``)
    through the tool's path: the head count and levels come from the keys into the model
    directory's model.json; every head's outputs are the reference's (float64)."""
    torch_model = float32_exact(reference_model())
    state = {f"module.{k}": v for k, v in numpy_state_dict(torch_model).items()}
    variables, cfg, kind = convert_model_state(state, file_model_config(), source="mtkt.pth")
    assert (kind, cfg.advent_heads, cfg.advent_multi_level) == ("segmentor", HEADS, True)
    checkpoints.save_model_dir(str(tmp_path / "mtkt"), variables, cfg, {"kind": kind})
    stored, _ = checkpoints.read_model_config(str(tmp_path / "mtkt"))
    assert stored.advent_heads == HEADS
    normalised, advent_input = images(seed=4)
    with torch_threads(1), torch.no_grad():
        aux_list, main_list = torch_model.eval()(advent_input)
    cfg.dtype = "float64"
    model = models.build_model(cfg)
    with jax.enable_x64(True):
        wide = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), variables)
        out = jax.jit(lambda v, x: model.apply(v, x, train=False))(wide, normalised)
        out = jax.tree_util.tree_map(np.asarray, out)
    for head in range(HEADS):
        assert_close(out["head_logits"][head], nhwc(main_list[head]), f"main {head}")
        assert_close(out["head_aux_logits"][head], nhwc(aux_list[head]), f"aux {head}")
    np.testing.assert_array_equal(out["logits"], out["head_logits"][0])  # what is evaluated


def test_the_layout_sets_heads_and_levels_and_a_disagreeing_config_is_one_line():
    """A single-level MTKT file, ADVENT's (MTAF's baseline and MDis) layout; an
    ``advent_heads`` or class count other than the file's is refused in one line."""
    mtkt = numpy_state_dict(float32_exact(reference_model()))
    single = {k: v for k, v in mtkt.items() if not k.startswith("aux_classifier_list.")}
    _, cfg, _ = convert_model_state(single, file_model_config(advent_heads=HEADS))
    assert (cfg.advent_heads, cfg.advent_multi_level) == (HEADS, False)
    advent_state = numpy_state_dict(advent_reference_model())
    _, cfg, kind = convert_model_state(advent_state, file_model_config())
    assert (kind, cfg.advent_heads, cfg.advent_multi_level) == ("segmentor", 1, True)
    cases = [
        (mtkt, {"advent_heads": 2}, "holds MTKT's 3 classifier pairs; .*advent_heads=2"),
        (advent_state, {"advent_heads": 3}, "holds ADVENT's one classifier; .*advent_heads=3"),
        (mtkt, {"num_classes": 19}, "main_classifier_list.0.conv2d_list.0.bias has 5 classes"),
    ]
    for state, overrides, message in cases:
        with pytest.raises(ConversionError, match=message) as err:
            convert_model_state(state, file_model_config(**overrides), source="x.pth")
        assert "\n" not in str(err.value)


# --- the switches, the checks, the graph --------------------------------------------------


def tiny_method(stage: str, num_targets: int, **switches):
    config = mtaf_config(stage, num_targets)
    config.model.dtype = "float32"
    config.mtaf.update(switches)
    return methods.create(config, models.build_model(config.model).apply)


def test_the_intended_behaviours_behind_mdis_switches():
    """Off, ``aux_source_over_targets`` halves the auxiliary source loss as every other one,
    and ``last_aux_domain_classifier`` trains each auxiliary one-vs-rest classifier on its own
    target's maps as the main ones; on, the reference's (what the step test checks)."""
    kept = tiny_method("mtaf_mdis", 3)
    fixed = tiny_method("mtaf_mdis", 3, aux_source_over_targets=False,
                        last_aux_domain_classifier=False)  # fmt: skip
    rng = np.random.default_rng(3)
    levels = ("main", "aux")
    rand = lambda hw: rng.uniform(0, 0.5, (1, *hw, NUM_CLASSES))  # noqa: E731
    maps = {"source": {lv: rand(SOURCE_HW) for lv in levels},
            "targets": [{lv: rand(TARGET_HW) for lv in levels} for _ in range(3)]}  # fmt: skip

    def bce(disc, name, level_maps, label):
        return adversarial.bce_to_label(kept.discriminate(disc[name], level_maps), label)

    def one_vs_rest(disc, name, j, level):
        return sum(bce(disc, name, maps["targets"][i][level], float(i != j))
                   / (2 if i == j else 4) for i in range(3))  # fmt: skip

    @jax.jit
    def run(disc):
        ours = kept.discriminator_losses(disc, maps), fixed.discriminator_losses(disc, maps)
        src = [bce(disc, f"d_aux_{i}", maps["source"]["aux"], 0.0) for i in range(3)]
        own = {f"dt_aux_{j}": one_vs_rest(disc, f"dt_aux_{j}", j, "aux") for j in range(3)}
        last = sum(bce(disc, "dt_aux_2", m["aux"], 0.0) / 2
                   + bce(disc, "dt_aux_2", m["aux"], 1.0) / 2 for m in maps["targets"])  # fmt: skip
        return ours, src, own, last

    with jax.enable_x64(True):
        (kept_losses, fixed_losses), src, own, last = run(kept.init_others(jax.random.key(1)))
    rel = lambda a, b: abs(float(a) - float(b)) <= 1e-6 * abs(float(b))  # noqa: E731
    for i in range(3):
        step = fixed_losses[f"d_aux_{i}"] - kept_losses[f"d_aux_{i}"]
        assert rel(step, src[i] * (1 / 2 - 1 / 4))
        assert rel(fixed_losses[f"d_main_{i}"], kept_losses[f"d_main_{i}"])
    for name, value in own.items():  # as the main classifiers are trained either way
        assert rel(fixed_losses[name], value), name
        assert rel(fixed_losses[name.replace("aux", "main")],
                   kept_losses[name.replace("aux", "main")])  # fmt: skip
    assert float(kept_losses["dt_aux_0"]) == float(kept_losses["dt_aux_1"]) == 0.0
    assert rel(kept_losses["dt_aux_2"], last)


def test_the_intended_behaviours_behind_mtkt_switches():
    kept = tiny_method("mtaf_mtkt", 2)
    fixed = tiny_method("mtaf_mtkt", 2, last_aux_discriminator=False, aux_kl_over_targets=False)
    assert [kept.adversary(lv, i) for lv in ("main", "aux") for i in range(2)] == [
        "d_main_0", "d_main_1", "d_aux_1", "d_aux_1"]  # fmt: skip
    assert [fixed.adversary("aux", i) for i in range(2)] == ["d_aux_0", "d_aux_1"]
    seg_aux, kl = LAMBDAS["lambda_seg_aux"], LAMBDAS["lambda_kl_target"]
    assert kept.kl_weight("main") == fixed.kl_weight("main") == kl
    assert (kept.kl_weight("aux"), fixed.kl_weight("aux")) == (seg_aux * kl / 2, seg_aux * kl)
    # The student head (and only it) is held while idle, parameters and optimiser state.
    params = models.variable_shapes(kept.student_apply.__self__)
    students = [path for path, _ in jax.tree_util.tree_leaves_with_path(params["params"])
                if mtaf_mtkt.is_student_leaf(path)]  # fmt: skip
    assert {path_to_str(p).rsplit("/", 2)[0] for p in students} == {"layer5/head_0",
                                                                    "layer6/head_0"}  # fmt: skip
    assert len(students) == 2 * 4 * 2


def test_repeated_discriminator_steps_keep_the_iterations_rate():
    """The baseline's extra Adam steps (``repeated_disc_steps``): Adam's own count (its bias
    corrections) advances with each, the schedule's once per iteration, so every step of an
    iteration runs at that iteration's rate, as the reference's."""
    cfg = advent.discriminator_adam("adam", 10)
    tx = optim.make_optimizer(cfg, 10)[0]
    txs = {MODEL: tx, "d": tx}
    params, grads = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([0.3, -0.1])}
    state = create_train_state({"params": params}, txs, jax.random.key(0), {"d": params})
    both = {MODEL: grads, "d": grads}
    state = mtaf_shared.step_all(txs, mtaf_shared.step_all(txs, state, both, {}), both, {},
                                 {"d": 2})  # fmt: skip
    counts = [int(x) for x in jax.tree_util.tree_leaves(state.others["d"].opt_state)
              if x.ndim == 0]  # fmt: skip
    assert sorted(set(counts)) == [2, 3]  # the schedule's, Adam's
    schedule = optim.mmcv_poly_warmup_schedule(cfg.lr, 10, 0, power=cfg.poly_power)
    adam, w = optax.scale_by_adam(cfg.b1, cfg.b2), params
    moments = adam.init(params)
    for it in (0, 1, 1):  # iteration 0 once, iteration 1 twice
        updates, moments = adam.update(grads, moments, w)
        w = jax.tree_util.tree_map(lambda p, u, it=it: p - schedule(it) * u, w, updates)
    np.testing.assert_allclose(state.others["d"].params["w"], w["w"], rtol=1e-6)
    segmentor = state.params["w"]  # one step per iteration
    assert not np.allclose(segmentor, state.others["d"].params["w"], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "stage, change, message",
    [
        ("mtaf_mdis", lambda c: setattr(c.data, "per_target_streams", False), "per_target_streams"),
        ("mtaf_mdis", lambda c: setattr(c.data, "target", ("cityscapes",)), "at least 2"),
        ("mtaf_mtkt", lambda c: setattr(c.data, "target", ("mapillary",) * 2), "distinct"),
        ("mtaf_mtkt", lambda c: setattr(c.model, "advent_heads", 1), "advent_heads=3"),
        ("mtaf_mdis", lambda c: setattr(c.model, "advent_heads", 3), "advent_heads=1"),
        ("mtaf_baseline", lambda c: setattr(c.mtaf.optim_d, "kind", "adam041"), "adam041"),
        ("mtaf_baseline", lambda c: setattr(c.model, "head", "dlv2"), "advent_aspp"),
    ],
)
def test_settings_the_methods_refuse(stage, change, message):
    config = mtaf_config(stage, 2)
    change(config)
    with pytest.raises(methods.MethodConfigError, match=message):
        methods.check_config(config)


def test_the_graph_and_the_shipped_settings():
    """config.graph='mtaf': three independent stages (MTKT with 1 + T heads); the published
    runs' per-stage settings, whether a stage runs alone or in the pipeline; every stage
    config passes the config checks and its method's."""
    from configs import mtaf_demo, mtaf_gta2csmap

    stages = stage_graph.graph_of(mtaf_gta2csmap.setting())
    assert [(s.name, s.kind, s.inputs) for s in stages] == [
        ("baseline", "mtaf_baseline", ()), ("mdis", "mtaf_mdis", ()),
        ("mtkt", "mtaf_mtkt", ())]  # fmt: skip
    pipeline = mtaf_gta2csmap.get_config()
    config_checks.check_config(pipeline)
    for module in (mtaf_gta2csmap, mtaf_demo):
        for name in ("baseline", "mdis", "mtkt"):
            config = module.get_config(name)
            config_checks.check_config(config)
            methods.check_config(config)
            assert config.model.get("advent_heads", 1) == (3 if name == "mtkt" else 1)
    for name, values in mtaf_gta2csmap.STAGE_SETTINGS.items():
        alone = mtaf_gta2csmap.get_config(name)
        for key, value in values.items():
            section, *rest = key.split(".")
            assert functools.reduce(getattr, rest, alone[section]) == value, key
            assert functools.reduce(getattr, key.split("."), pipeline.pipeline[name]) == value
    baseline = mtaf_gta2csmap.get_config("baseline")
    assert (baseline.batch_size, baseline.optim.listed_times) == (1, "advent_1x")


def test_kl_is_the_references():
    """kl_to_teacher is MTAF's kl_divergence: F.kl_div with the legacy size_average, the
    mean over every element, classes included."""
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 2, 5, 7, NUM_CLASSES)) * 3
    ours = adversarial.kl_to_teacher(student, teacher)
    theirs = ref_step.kl_divergence(*(torch.from_numpy(x.transpose(0, 3, 1, 2)) for x in
                                      (student, teacher)))  # fmt: skip
    assert abs(float(ours) - float(theirs)) <= 1e-6 * float(theirs)
