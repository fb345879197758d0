"""ProDA's DeepLabV2: float64 parity with the PyTorch transcription, and its converter.

torch_ref/proda.py transcribes microsoft/ProDA's ``Deeplab`` with its state-dict keys; the
Flax variables come from those state dicts through ddb_jax.convert.proda, so every parity
test also checks the converter on every tensor. Both sides run in float64: the bound
(REL64 of the largest reference value) sits far above float64 rounding and far below any
float32 effect.
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

from configs import default
from ddb_jax import models, ops
from ddb_jax.convert import convert_model_state, convert_torch_checkpoint
from ddb_jax.convert import proda as convert
from ddb_jax.convert.common import ConversionError, path_to_str
from ddb_jax.models.proda_deeplabv2 import (
    ProdaDeepLabV2,
    build_proda,
    is_classifier_param,
    listed_times,
)
from tests.parity_support import torch_threads
from tools import convert_checkpoint
from torch_ref import proda as ref
from torch_ref.common import nchw, nhwc, numpy_state_dict

NUM_CLASSES, BLOCKS, WIDTH, HEAD_CHANNELS = 5, (1, 1, 1, 1), 8, 64
# Height 207: the 7x7/2 conv gives 104 rows, an even count, so the ceil-mode pool adds a
# window (53 rows, not 52) and the outputs have 27 rows (26 with floor mode). Width 201:
# 101 columns, where ceil and floor agree (26 columns). 26 and 27 exceed the largest ASPP
# dilation, 24, so every tap of every branch reaches the image.
IMAGE_HW, OUTPUT_HW = (207, 201), (27, 26)
REL64 = 1e-10
DROP_RATE = 0.5  # the dropout check's rate: about half the channels of each image dropped


def tiny_model(bn_clr: bool = True, dtype=jnp.float64, dropout_rate: float = 0.1):
    return ProdaDeepLabV2(
        NUM_CLASSES, BLOCKS, WIDTH, HEAD_CHANNELS, dropout_rate, bn_clr, dtype=dtype
    )


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    cfg = default.get_model_config()
    tiny = dict(backbone="resnet101_proda", head="proda_aspp", num_classes=NUM_CLASSES,
                base_channels=WIDTH, head_channels=HEAD_CHANNELS)  # fmt: skip
    cfg.update({**tiny, **overrides})
    cfg.proda_blocks = BLOCKS
    return cfg


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights that keep activations O(1) (He-normal kernels, biases N(0, 0.1)) and
    non-trivial norm affines and BN statistics, so every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            std = (2 / module.weight[0].numel()) ** 0.5
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        elif isinstance(module, torch.nn.BatchNorm2d | torch.nn.GroupNorm):
            n = module.weight.shape[0]
            module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def reference_model(bn_clr: bool = True) -> ref.ResNet101:
    model = ref.deeplab(NUM_CLASSES, BLOCKS, WIDTH, HEAD_CHANNELS, 0.1, bn_clr)
    return randomize(model, seed=0).double()


def images(seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(the project's normalised RGB, NHWC; ProDA's RGB / 255, NCHW) of 2 images."""
    rgb = np.random.default_rng(seed).uniform(0, 255, size=(2, *IMAGE_HW, 3))
    normalised = (rgb - np.asarray(ops.IMAGE_MEAN)) / np.asarray(ops.IMAGE_STD)
    return normalised, nchw(rgb / 255.0)


def assert_close(ours, reference, what: str) -> None:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    scale = np.abs(reference).max()
    assert scale > 1e-3, f"{what}: degenerate reference (max |x| = {scale:.3g})"
    error = np.abs(ours - reference).max()
    assert error <= REL64 * scale, f"{what}: max |diff| {error:.3g} > {REL64} * {scale:.3g}"


def torch_outputs(out: dict) -> dict[str, np.ndarray]:
    return {"logits": nhwc(out["out"]), "feature": nhwc(out["feat"])}


@functools.cache
def parity_run():
    """Torch eval outputs, train outputs (dropout off) and running statistics after the
    train forward; the same from Flax (one compiled program, which also runs a train
    forward with dropout), with variables converted from torch."""
    normalised, proda_input = images()
    torch_model = reference_model()
    # Copies: numpy_state_dict shares memory, and the train forward moves the statistics.
    state_before = {k: v.copy() for k, v in numpy_state_dict(torch_model).items()}
    with torch_threads(1), torch.no_grad():
        eval_out = torch_outputs(torch_model.eval()(proda_input))
        torch_model.layer5.head[0].p = 0.0
        train_out = torch_outputs(torch_model.train()(proda_input))
    state_after = numpy_state_dict(torch_model)
    model = tiny_model()
    no_dropout, dropout = model.clone(dropout_rate=0.0), model.clone(dropout_rate=DROP_RATE)
    with jax.enable_x64(True):
        variables = convert.convert_proda(state_before, model, dtype=np.float64)
        expected_stats = convert.convert_proda(state_after, model, dtype=np.float64)

        @jax.jit
        def forward(variables, images):
            eval_out = model.apply(variables, images, train=False)
            train_out, updates = no_dropout.apply(
                variables, images, train=True, mutable="batch_stats"
            )
            dropped, _ = dropout.apply(
                variables,
                images,
                train=True,
                mutable="batch_stats",
                rngs={"dropout": jax.random.key(1)},
            )
            return eval_out, train_out, updates["batch_stats"], dropped

        ours = jax.tree_util.tree_map(np.asarray, forward(variables, jnp.asarray(normalised)))
    return ours, (eval_out, train_out, expected_stats["batch_stats"]), variables


def test_eval_forward_matches_torch():
    """model.eval(): logits and the 256-channel (here 64) GroupNorm feature, 1/8 size."""
    (ours, *_), (reference, *_), _ = parity_run()
    assert set(ours) == set(ProdaDeepLabV2.output_names)
    assert ours["logits"].shape == (2, *OUTPUT_HW, NUM_CLASSES)
    assert ours["feature"].shape == (2, *OUTPUT_HW, HEAD_CHANNELS)
    for name in ProdaDeepLabV2.output_names:
        assert ours[name].dtype == np.float64
        assert_close(ours[name], reference[name], f"eval {name}")


def test_train_forward_uses_batch_statistics_and_updates_running_ones():
    """model.train(): every BN (bn_pretrain too) normalises with the batch's statistics and
    moves its running statistics (momentum 0.1, unbiased variance)."""
    (eval_out, train_out, stats, _), (_, reference, expected_stats), variables = parity_run()
    for name in ProdaDeepLabV2.output_names:
        assert_close(train_out[name], reference[name], f"train {name}")
        assert np.abs(train_out[name] - eval_out[name]).max() > 1e-3, "train == eval"
    assert "bn_pretrain" in stats
    pairs = zip(
        jax.tree_util.tree_leaves_with_path(stats),
        jax.tree_util.tree_leaves(expected_stats),
        jax.tree_util.tree_leaves(variables["batch_stats"]),
        strict=True,
    )
    for (path, got), want, before in pairs:
        assert_close(got, want, f"running statistic {jax.tree_util.keystr(path)}")
        assert np.abs(want - before).max() > 1e-6, f"{jax.tree_util.keystr(path)} did not move"


def test_dropout_zeroes_whole_feature_channels_before_the_classifier():
    """Dropout2d as the reference places it: the returned feature is the dropped one (whole
    channels of each image zeroed, the rest scaled by 1/(1-p)) and the logits are its
    bias-free 1x1 projection."""
    (_, kept, _, dropped), _, variables = parity_run()
    ratio = dropped["feature"] / kept["feature"]
    per_channel = ratio[:, :1, :1, :]
    np.testing.assert_allclose(ratio, np.broadcast_to(per_channel, ratio.shape), rtol=1e-12)
    scale = np.round(per_channel * (1 - DROP_RATE), 12)
    assert set(np.unique(scale)) == {0.0, 1.0}
    kernel = variables["params"]["layer5"]["head_1"]["kernel"][0, 0]
    assert_close(dropped["logits"], dropped["feature"] @ kernel, "logits of the dropped feature")


def test_converter_names_missing_and_unexpected_keys():
    state = numpy_state_dict(reference_model())
    model = tiny_model(dtype=jnp.float32)
    missing = dict(state)
    del missing["layer5.bottleneck.0.se.2.bias"]
    with pytest.raises(ConversionError, match=r"missing keys.*\n.*layer5\.bottleneck\.0\.se\.2"):
        convert.convert_proda(missing, model)
    unexpected = {**state, "layer6.conv2d_list.0.weight": np.zeros((5, 8, 3, 3))}
    with pytest.raises(ConversionError, match=r"unexpected keys.*\n.*layer6\.conv2d_list\.0"):
        convert.convert_proda(unexpected, model)
    # A stage-1 network has no bn_pretrain: the bn_clr model finds it missing.
    plain = {k: v for k, v in state.items() if not k.startswith("bn_pretrain.")}
    with pytest.raises(ConversionError, match=r"missing keys \(4\):\n.*bn_pretrain\.running_mean"):
        convert.convert_proda(plain, model)
    # A DataParallel copy converts to the same variables.
    ours = convert.convert_proda(state, model)
    wrapped = convert.convert_proda({f"module.{k}": v for k, v in state.items()}, model)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, ours, wrapped))


def test_released_layout_converts_end_to_end(tmp_path, capsys):
    """train.py's file ({'ResNet101': {'model_state', 'objective_vectors'}, 'iter',
    'best_iou'}, a warm-up's discriminator beside it) through convert_torch_checkpoint;
    bn_pretrain in the file sets proda_bn_clr. The command line reaches the converter."""
    torch_model = reference_model(bn_clr=False).float()
    discriminator = torch.nn.Conv2d(NUM_CLASSES, 1, 4)
    path = tmp_path / "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl"
    torch.save(
        {
            "ResNet101": {
                "model_state": torch_model.state_dict(),
                "objective_vectors": torch.zeros(NUM_CLASSES, HEAD_CHANNELS),
            },
            "FCDiscriminator": {"model_state": discriminator.state_dict()},
            "iter": 3,
            "best_iou": 0.5,
        },
        path,
    )
    variables, model_cfg, provenance = convert_torch_checkpoint(str(path), tiny_config())
    assert provenance["prefix"] == "ResNet101.model_state" and provenance["kind"] == "segmentor"
    assert model_cfg.proda_bn_clr is False and "bn_pretrain" not in variables["params"]
    direct = convert.convert_proda(
        numpy_state_dict(torch_model), tiny_model(bn_clr=False, dtype=jnp.float32)
    )
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, variables, direct))
    with_clr = numpy_state_dict(reference_model(bn_clr=True))
    _, clr_cfg, kind = convert_model_state(with_clr, tiny_config())
    assert clr_cfg.proda_bn_clr is True and kind == "segmentor"
    # The full-size model the command line builds refuses the tiny file.
    out = tmp_path / "model"
    args = [str(path), str(out), "--backbone=resnet101_proda", f"--num-classes={NUM_CLASSES}"]
    assert convert_checkpoint.main(args) != 0
    assert "does not fit the model" in capsys.readouterr().err and not out.exists()


def test_backbone_file_fills_the_backbone_only():
    """torchvision's ImageNet ResNet-101 (its fc ignored) or the SimCLR file ({'state_dict'}),
    as Deeplab() loads them: layer5 and bn_pretrain stay to the random init."""
    state = numpy_state_dict(reference_model())
    backbone = {k: v for k, v in state.items() if not k.startswith(("layer5.", "bn_pretrain."))}
    imagenet = {**backbone, "fc.weight": np.zeros((1000, 8 * 32)), "fc.bias": np.zeros(1000)}
    prefix, unwrapped = convert.proda_state_dict({"state_dict": imagenet})
    assert prefix == "state_dict" and unwrapped is imagenet
    ours, cfg, kind = convert_model_state(imagenet, tiny_config(proda_bn_clr=True))
    full = convert.convert_proda(state, tiny_model(dtype=jnp.float32))
    assert kind == "backbone" and set(ours["params"]) == set(full["params"]) - {
        "layer5",
        "bn_pretrain",
    }
    for collection in ("params", "batch_stats"):
        expected = {k: v for k, v in full[collection].items() if k in ours[collection]}
        assert set(expected) == set(ours[collection])
        same = jax.tree_util.tree_map(np.array_equal, ours[collection], expected)
        assert jax.tree_util.tree_all(same)
    del imagenet["layer4.0.bn3.running_mean"]
    with pytest.raises(ConversionError, match=r"missing keys.*\n.*layer4\.0\.bn3\.running_mean"):
        convert_model_state(imagenet, tiny_config())
    with pytest.raises(ConversionError, match="no ProDA network"):
        convert.proda_state_dict({"FCDiscriminator": {"model_state": {}}, "iter": 1})


def test_parameter_groups_are_the_references():
    """is_classifier_param: the 10x group of the warm-up and --finetune stages (layer5,
    bn_pretrain); listed_times: how often the 1x group lists each parameter (BN included)."""
    torch_model = reference_model()
    names = {id(p): n for n, p in torch_model.named_parameters()}
    classifier = {names[id(p)] for p in torch_model.classifier_parameters()}
    repeats = collections.Counter(names[id(p)] for p in torch_model.backbone_parameters())
    assert set(classifier) | set(repeats) == set(names.values())
    assert not set(classifier) & set(repeats)
    shapes = models.variable_shapes(tiny_model(dtype=jnp.float32))
    for path, _ in jax.tree_util.tree_leaves_with_path(shapes["params"]):
        key = convert.torch_name(("params", *path_to_str(path).split("/"))).key
        assert is_classifier_param(path) == (key in classifier), key
        assert listed_times(path) == repeats.get(key, 1), key
    assert repeats["layer3.0.bn2.weight"] == 3 and repeats["layer2.0.downsample.1.bias"] == 4
    assert repeats["conv1.weight"] == 1 and repeats["bn1.bias"] == 1


def test_random_init_is_the_references():
    """Every conv kernel N(0, 0.01), head included; branch biases PyTorch's default, the 3x3
    bottleneck's 0; SE Linears PyTorch's default; norms scale 1, bias 0."""
    variables = models.init_variables(tiny_model(dtype=jnp.float32), jax.random.key(0))
    kernels = []
    for path, value in jax.tree_util.tree_leaves_with_path(variables["params"]):
        name, value = path_to_str(path), np.asarray(value)
        if "/se_" in name:
            bound = 1 / np.sqrt(value.shape[0] if name.endswith("kernel") else 5 * HEAD_CHANNELS)
            if name.endswith("bias") and "se_2" in name:
                bound = 1 / np.sqrt(5 * HEAD_CHANNELS // 16)
            assert bound / 4 < np.abs(value).max() <= bound, name
        elif name.endswith("kernel"):
            kernels.append(value.ravel())
        elif "conv2d_list" in name and name.endswith("_0/bias"):
            kernel = variables["params"]["layer5"][name.split("/")[1]]["kernel"]
            bound = 1 / np.sqrt(np.prod(kernel.shape[:3]))
            assert bound / 4 < np.abs(value).max() <= bound, name
        else:  # norm scales, norm biases, the bottleneck conv's bias
            assert np.all(value == (1 if name.endswith("scale") else 0)), name
    kernels = np.concatenate(kernels)
    assert abs(kernels.std() / 0.01 - 1) < 0.03 and abs(kernels.mean()) < 3e-4
    for path, value in jax.tree_util.tree_leaves_with_path(variables["batch_stats"]):
        assert np.all(np.asarray(value) == (1 if path_to_str(path).endswith("var") else 0))


def test_build_model_reads_the_config():
    model = models.build_model(tiny_config(dtype="bfloat16", dropout_ratio=0.2))
    assert model == ProdaDeepLabV2(
        NUM_CLASSES, BLOCKS, WIDTH, HEAD_CHANNELS, 0.2, False, dtype=jnp.bfloat16
    )
    full = build_proda(ml_collections.ConfigDict({"num_classes": 19, "dtype": "float32"}))
    assert (full.blocks, full.base_channels, full.head_channels, full.dropout_rate) == (
        (3, 4, 23, 3),
        64,
        256,
        0.1,
    )
    assert models.default_head("resnet101_proda") == "proda_aspp"
    assert "proda_aspp" in models.HEADS
    is_backbone = models.backbone_predicate(model)
    assert is_backbone("layer4_0") and not is_backbone("layer5") and not is_backbone("bn_pretrain")
    with pytest.raises(models.ModelConfigError, match="proda_aspp"):
        models.build_model(tiny_config(head="dlv2"))
    with pytest.raises(models.ModelConfigError, match="multiple of 32"):
        models.build_model(tiny_config(head_channels=48))
    out = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *IMAGE_HW, 3))))
    assert out["params"]["layer5"]["head_1"]["kernel"].shape == (1, 1, HEAD_CHANNELS, NUM_CLASSES)
