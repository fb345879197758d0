"""ADVENT's DeepLabV2 and discriminator: float64 parity with the PyTorch transcription.

torch_ref/advent.py transcribes valeoai/ADVENT's ResNetMulti and get_fc_discriminator with
their state-dict keys; the Flax variables come from those state dicts through
ddb_jax.convert.advent, so every test here also checks the converter on every tensor.
Both sides run in float64: the bounds (REL64 of the largest reference value) sit far
above float64 rounding and far below any float32 effect.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from ddb_jax import models, ops
from ddb_jax.convert import advent as convert
from ddb_jax.convert.common import ConversionError, path_to_str
from ddb_jax.models.advent_deeplabv2 import (
    AdventDeepLabV2,
    build_advent,
    frozen_param,
    is_classifier_param,
)
from ddb_jax.models.discriminator import FCDiscriminator
from tests.parity_support import torch_threads
from torch_ref import advent as ref
from torch_ref.common import nchw, nhwc, numpy_state_dict

NUM_CLASSES, BLOCKS, WIDTH, NDF = 5, (1, 1, 1, 1), 8, 4
# Height 47: the 7x7/2 conv gives 24 rows, an even count, so the ceil-mode pool adds a
# window (13 rows, not 12) and the logits have 7 rows (6 with floor mode). Width 41: 21
# columns, where ceil and floor agree (6 columns).
IMAGE_HW, LOGITS_HW = (47, 41), (7, 6)
D_INPUT_HW = (70, 99)  # -> 2 x 3 discriminator logits
REL64 = 1e-10


def tiny_model(multi_level: bool = True, dtype=jnp.float64) -> AdventDeepLabV2:
    return AdventDeepLabV2(NUM_CLASSES, multi_level, BLOCKS, WIDTH, dtype=dtype)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights that keep activations O(1) (He-normal kernels, biases N(0, 0.1)) and
    non-trivial BN affine parameters and statistics, so every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            std = (2 / module.weight[0].numel()) ** 0.5
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        elif isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def reference_model(multi_level: bool = True) -> ref.ResNetMulti:
    model = ref.get_deeplab_v2(NUM_CLASSES, multi_level, BLOCKS, WIDTH)
    return randomize(model, seed=0).double()


def images(seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(the project's normalised RGB, NHWC; ADVENT's BGR - IMG_MEAN, NCHW) of 2 images."""
    rgb = np.random.default_rng(seed).uniform(0, 255, size=(2, *IMAGE_HW, 3))
    normalised = (rgb - np.asarray(ops.IMAGE_MEAN)) / np.asarray(ops.IMAGE_STD)
    advent_input = rgb[..., ::-1] - np.asarray(ref.IMG_MEAN_BGR)
    return normalised, nchw(advent_input)


def assert_close(ours, reference, what: str) -> None:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    scale = np.abs(reference).max()
    assert scale > 1e-3, f"{what}: degenerate reference (max |x| = {scale:.3g})"
    error = np.abs(ours - reference).max()
    assert error <= REL64 * scale, f"{what}: max |diff| {error:.3g} > {REL64} * {scale:.3g}"


@functools.cache
def parity_run():
    """Torch eval outputs, train outputs and running statistics after the train forward;
    the same from Flax (one compiled program), with variables converted from torch."""
    normalised, advent_input = images()
    torch_model = reference_model()
    # Copies: numpy_state_dict shares memory, and the train forward moves the statistics.
    state_before = {k: v.copy() for k, v in numpy_state_dict(torch_model).items()}
    with torch_threads(1), torch.no_grad():
        eval_aux, eval_main = torch_model.eval()(advent_input)
        train_aux, train_main = torch_model.train()(advent_input)
    state_after = numpy_state_dict(torch_model)
    model = tiny_model()
    with jax.enable_x64(True):
        variables = convert.convert_advent(state_before, model, dtype=np.float64)
        expected_stats = convert.convert_advent(state_after, model, dtype=np.float64)

        @jax.jit
        def forward(variables, images):
            eval_out = model.apply(variables, images, train=False)
            train_out, updates = model.apply(variables, images, train=True, mutable="batch_stats")
            return eval_out, train_out, updates["batch_stats"]

        ours = jax.tree_util.tree_map(np.asarray, forward(variables, jnp.asarray(normalised)))
    reference = (
        {"logits": nhwc(eval_main), "aux_logits": nhwc(eval_aux)},
        {"logits": nhwc(train_main), "aux_logits": nhwc(train_aux)},
        expected_stats["batch_stats"],
    )
    return ours, reference, variables


def test_eval_forward_matches_torch():
    (ours, _, _), (reference, _, _), _ = parity_run()
    assert set(ours) == set(AdventDeepLabV2.output_names)
    assert ours["logits"].shape == (2, *LOGITS_HW, NUM_CLASSES)
    assert ours["aux_logits"].shape == ours["logits"].shape
    for name in AdventDeepLabV2.output_names:
        assert ours[name].dtype == np.float64
        assert_close(ours[name], reference[name], f"eval {name}")


def test_train_forward_uses_batch_statistics_and_updates_running_ones():
    """ADVENT trains in model.train(): BN normalises with the batch's statistics and moves
    its running statistics (momentum 0.1, unbiased variance); only the affine is frozen."""
    (eval_out, train_out, stats), (_, reference, expected_stats), variables = parity_run()
    for name in AdventDeepLabV2.output_names:
        assert_close(train_out[name], reference[name], f"train {name}")
        assert np.abs(train_out[name] - eval_out[name]).max() > 1e-3, "train == eval"
    pairs = zip(
        jax.tree_util.tree_leaves_with_path(stats),
        jax.tree_util.tree_leaves(expected_stats),
        jax.tree_util.tree_leaves(variables["batch_stats"]),
        strict=True,
    )
    for (path, got), want, before in pairs:
        assert_close(got, want, f"running statistic {jax.tree_util.keystr(path)}")
        assert np.abs(want - before).max() > 1e-6, f"{jax.tree_util.keystr(path)} did not move"


def test_single_level_model_and_conversion():
    """multi_level=False: no layer5 in the checkpoint or the model, logits only."""
    torch_model = reference_model(multi_level=False)
    state = numpy_state_dict(torch_model)
    assert not any(k.startswith("layer5.") for k in state)
    model = tiny_model(multi_level=False, dtype=jnp.float32)
    variables = convert.convert_advent(state, model)
    assert "layer5" not in variables["params"] and "layer6" in variables["params"]
    images_spec = jax.ShapeDtypeStruct((1, *IMAGE_HW, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images_spec)
    assert set(out) == {"logits"} and out["logits"].shape == (1, *LOGITS_HW, NUM_CLASSES)


def test_converter_names_missing_and_unexpected_keys():
    state = numpy_state_dict(reference_model())
    model = tiny_model(dtype=jnp.float32)
    missing = dict(state)
    del missing["layer2.0.downsample.1.running_var"]
    with pytest.raises(ConversionError, match=r"missing keys.*\n.*layer2\.0\.downsample\.1"):
        convert.convert_advent(missing, model)
    unexpected = {**state, "layer7.conv2d_list.0.weight": np.zeros((5, 8, 3, 3))}
    with pytest.raises(ConversionError, match=r"unexpected keys.*\n.*layer7\.conv2d_list\.0"):
        convert.convert_advent(unexpected, model)
    # A DataParallel copy converts to the same variables.
    plain = convert.convert_advent(state, model)
    wrapped = convert.convert_advent({f"module.{k}": v for k, v in state.items()}, model)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, plain, wrapped))


def test_imagenet_initialisation_fills_the_backbone_only():
    """DeepLab_resnet_pretrained_imagenet.pth as ADVENT's train.py reads it: 'Scale.' keys,
    the file's own layer5 ignored, layer5/layer6 left to the random init."""
    state = numpy_state_dict(reference_model())
    backbone = {k: v for k, v in state.items() if not k.startswith(("layer5.", "layer6."))}
    imagenet = {f"Scale.{k}": v for k, v in backbone.items()}
    imagenet["Scale.layer5.conv2d_list.0.weight"] = np.zeros((1000, 8 * 32, 3, 3))
    model = tiny_model(dtype=jnp.float32)
    ours = convert.convert_advent_imagenet(imagenet, model)
    full = convert.convert_advent(state, model)
    assert set(ours["params"]) == set(full["params"]) - {"layer5", "layer6"}
    for collection in ("params", "batch_stats"):
        expected = {k: v for k, v in full[collection].items() if k not in ("layer5", "layer6")}
        assert jax.tree_util.tree_all(
            jax.tree_util.tree_map(np.array_equal, ours[collection], expected)
        )


def test_frozen_and_classifier_parameters_are_the_references():
    """frozen_param: the reference's requires_grad=False tensors (every BN scale and bias);
    is_classifier_param: its 10x group (layer5, layer6); the rest is its 1x group."""
    torch_model = reference_model()
    names = {id(p): n for n, p in torch_model.named_parameters()}
    frozen = {n for n, p in torch_model.named_parameters() if not p.requires_grad}
    classifier = {names[id(p)] for p in torch_model.classifier_parameters()}
    backbone = {names[id(p)] for p in torch_model.backbone_parameters()}
    shapes = models.variable_shapes(tiny_model(dtype=jnp.float32))
    ours = {"frozen": set(), "classifier": set(), "backbone": set()}

    def classify(path, _):
        key = convert.torch_name(("params", *path_to_str(path).split("/"))).key
        kind = "frozen" if frozen_param(path) else None
        kind = kind or ("classifier" if is_classifier_param(path) else "backbone")
        ours[kind].add(key)

    jax.tree_util.tree_map_with_path(classify, shapes["params"])
    assert ours == {"frozen": frozen, "classifier": classifier, "backbone": backbone}
    # The reference's 1x group repeats a parameter once per enclosing module it walks: the
    # stem conv once, a block's convs 3 times, a shortcut conv 4 times.
    repeats = collections.Counter(names[id(p)] for p in torch_model.backbone_parameters())
    assert {k: repeats[k] for k in ("conv1.weight", "layer3.0.conv2.weight")} == {
        "conv1.weight": 1,
        "layer3.0.conv2.weight": 3,
    }
    assert repeats["layer3.0.downsample.0.weight"] == 4
    # Stem bn1, then bn1..3 and downsample.1 of each of the four blocks: weight and bias.
    assert all("bn" in k or "downsample.1" in k for k in frozen) and len(frozen) == 2 * 17
    # The optimiser of configs/advent_gta2cs.py groups the parameters by name keys: the same
    # groups, and ADVENT's listing counts for the 1x group.
    from configs import advent_gta2cs, default
    from ddb_jax.methods import optim
    from ddb_jax.models.advent_deeplabv2 import listed_times

    config = default.get_config()
    advent_gta2cs.advent_model(config)
    cfg = config.optim
    labels = optim.param_groups(shapes["params"], (), cfg.head_keys, cfg.frozen_keys)
    by_label = {"frozen": set(), "head": set(), "backbone": set()}
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        by_label[label].add(convert.torch_name(("params", *path_to_str(path).split("/"))).key)
    assert by_label == {"frozen": frozen, "head": classifier, "backbone": backbone}
    listing = optim.listing(cfg.listed_times)
    assert listing is listed_times
    for path, _ in jax.tree_util.tree_leaves_with_path(shapes["params"]):
        key = convert.torch_name(("params", *path_to_str(path).split("/"))).key
        if key in backbone:
            assert listing(path) == repeats[key], key


def test_random_init_is_the_references():
    """Conv kernels N(0, 0.01) (classifiers too), BN scale 1, bias 0, statistics (0, 1);
    classifier biases PyTorch's default U(+-1/sqrt(fan_in)), as ResNetMulti's init leaves
    them."""
    model = tiny_model(dtype=jnp.float32)
    variables = models.init_variables(model, jax.random.key(0))
    kernels, bn_scales, bn_biases, classifier_biases = [], [], [], []
    for path, value in jax.tree_util.tree_leaves_with_path(variables["params"]):
        name = path_to_str(path)
        value = np.asarray(value)
        if name.endswith("kernel"):
            kernels.append(value.ravel())
        elif frozen_param(path):
            (bn_scales if name.endswith("scale") else bn_biases).append(value)
        else:
            bound = 1 / np.sqrt(9 * (WIDTH * 16 if "layer5" in name else WIDTH * 32))
            assert np.abs(value).max() <= bound and np.abs(value).max() > bound / 4, name
            classifier_biases.append(value)
    kernels = np.concatenate(kernels)
    assert abs(kernels.std() / 0.01 - 1) < 0.03 and abs(kernels.mean()) < 3e-4
    assert all(np.all(s == 1) for s in bn_scales) and all(np.all(b == 0) for b in bn_biases)
    assert len(classifier_biases) == 8
    stats = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
    assert all(np.all(np.asarray(v) == (1 if path_to_str(p).endswith("var") else 0))
               for p, v in stats)  # fmt: skip


def test_discriminator_matches_torch_in_both_layouts():
    torch_d = ref.get_fc_discriminator(NUM_CLASSES, ndf=NDF).double()
    maps = np.random.default_rng(1).uniform(0, 1, size=(2, *D_INPUT_HW, NUM_CLASSES))
    with torch_threads(1), torch.no_grad():
        expected = nhwc(torch_d(nchw(maps)))
    assert expected.shape == (2, 2, 3, 1)
    state = numpy_state_dict(torch_d)
    assert sorted({k.split(".")[0] for k in state}) == ["0", "2", "4", "6", "8"]
    model = FCDiscriminator(ndf=NDF, dtype=jnp.float64)
    with jax.enable_x64(True):
        variables = convert.convert_discriminator(
            state, model, num_classes=NUM_CLASSES, dtype=np.float64
        )
        ours = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(maps)))
    assert_close(ours, expected, "discriminator logits")

    # AdaptSegNet's FCDiscriminator names the same five convs.
    renamed = {
        f"{convert.LAYER_NAMES[int(k.split('.')[0]) // 2]}.{k.split('.')[1]}": v
        for k, v in state.items()
    }
    convert_d = functools.partial(
        convert.convert_discriminator, model=FCDiscriminator(ndf=NDF), num_classes=NUM_CLASSES
    )
    same = jax.tree_util.tree_map(np.array_equal, convert_d(renamed), convert_d(state))
    assert jax.tree_util.tree_all(same)
    with pytest.raises(ConversionError, match=r"missing keys.*\n.*8\.bias"):
        convert_d({k: v for k, v in state.items() if k != "8.bias"})
    with pytest.raises(ConversionError, match=r"unexpected keys.*\n.*10\.weight"):
        convert_d({**state, "10.weight": np.zeros(1)})


def test_discriminator_init_is_pytorchs_default():
    model = FCDiscriminator(ndf=NDF)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, NUM_CLASSES)))
    for name, layer in variables["params"].items():
        fan_in = 16 * layer["kernel"].shape[2]
        bound = 1 / np.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            value = np.abs(np.asarray(layer[leaf]))
            assert value.max() <= bound and value.max() > bound / 4, (name, leaf)


def test_build_advent_reads_the_model_config():
    cfg = ml_collections.ConfigDict({"num_classes": 19, "dtype": "bfloat16"})
    model = build_advent(cfg)
    assert (model.num_classes, model.multi_level, model.blocks, model.base_channels) == (
        19,
        True,
        (3, 4, 23, 3),
        64,
    )
    assert model.dtype == jnp.bfloat16
    cfg = ml_collections.ConfigDict(
        {
            "num_classes": 5,
            "dtype": "float32",
            "advent_multi_level": False,
            "advent_blocks": [1, 1, 1, 1],
            "base_channels": 8,
        }
    )
    assert build_advent(cfg) == AdventDeepLabV2(5, False, (1, 1, 1, 1), 8, jnp.float32)
