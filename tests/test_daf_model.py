"""DAF's depth-aware DeepLabV2: float64 parity with the PyTorch transcription (torch_ref/daf.py),
eval and train forwards, every output, and the running statistics after a train forward."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from ddb_jax import models
from ddb_jax.convert import advent as advent_convert
from ddb_jax.convert.common import TorchSource, convert_state_dict
from ddb_jax.models.daf_deeplabv2 import DEPTH_HEAD, DafDeepLabV2
from tests.parity_support import torch_threads
from tests.test_advent_model import images, randomize
from torch_ref import daf as ref
from torch_ref.common import nhwc, numpy_state_dict

NUM_CLASSES, BLOCKS, WIDTH, FEATURES = 5, (1, 1, 1, 1), 4, 3
DEPTH_HW = (9, 11)  # the fixed depth size, small
REL64 = 1e-10


def torch_name(path: tuple[str, ...]) -> TorchSource:
    """A Flax variable of DafDeepLabV2 -> its torch tensor (the reference's names)."""
    collection, *modules, leaf = path
    if modules[0] != DEPTH_HEAD:
        return advent_convert.torch_name(path)
    torch_leaf, transform = advent_convert.LEAVES[(collection, leaf)]
    module = modules[1]
    match = re.fullmatch(r"att(\d)_conv([12])", module)
    if match:
        module = f"att{match.group(1)}.{1 if match.group(2) == '1' else 3}"
    else:
        module = re.sub(r"^(up\d)_", r"\1.", module)
    return TorchSource(f"{module}.{torch_leaf}", transform)


def tiny_flax(multi_level: bool = False, depth_size=DEPTH_HW, dtype=jnp.float64):
    return DafDeepLabV2(NUM_CLASSES, multi_level, BLOCKS, WIDTH, FEATURES, depth_size, dtype)


def tiny_torch(multi_level: bool = False, depth_size=DEPTH_HW, seed: int = 0):
    model = ref.get_deeplab_v2_depth(NUM_CLASSES, multi_level, BLOCKS, WIDTH, FEATURES,
                                     depth_size)  # fmt: skip
    return randomize(model, seed).double()


def to_flax_variables(state: dict, model: DafDeepLabV2) -> dict:
    shapes = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float64), models.variable_shapes(model)
    )
    return jax.tree_util.tree_map(jnp.asarray, convert_state_dict(state, shapes, torch_name))


def assert_close(ours, reference, what: str) -> None:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    scale = np.abs(reference).max()
    assert scale > 1e-6, f"{what}: degenerate reference"
    error = np.abs(ours - reference).max()
    assert error <= REL64 * scale, f"{what}: max |diff| {error:.3g} > {REL64} * {scale:.3g}"


@functools.cache
def parity_run(multi_level: bool):
    normalised, advent_input = images()
    torch_model = tiny_torch(multi_level)
    before = {k: v.copy() for k, v in numpy_state_dict(torch_model).items()}
    with torch_threads(1), torch.no_grad():
        evaluated = torch_model.eval()(advent_input)
        trained = torch_model.train()(advent_input)
    after = numpy_state_dict(torch_model)
    model = tiny_flax(multi_level)
    with jax.enable_x64(True):
        variables = to_flax_variables(before, model)
        expected_stats = to_flax_variables(after, model)["batch_stats"]

        @jax.jit
        def forward(variables, x):
            eval_out = model.apply(variables, x, train=False)
            train_out, updates = model.apply(variables, x, train=True, mutable="batch_stats")
            return eval_out, train_out, updates["batch_stats"]

        ours = jax.tree_util.tree_map(np.asarray, forward(variables, jnp.asarray(normalised)))

    def named(outs):
        aux, main, depth, fused = outs
        out = {"logits": nhwc(main), "depth": nhwc(depth), "depth_features": nhwc(fused)}
        return out | ({"aux_logits": nhwc(aux)} if aux is not None else {})

    return ours, (named(evaluated), named(trained), expected_stats)


@pytest.mark.parametrize("multi_level", [False, True])
def test_forwards_and_statistics_match_torch(multi_level):
    (eval_out, train_out, stats), (ref_eval, ref_train, ref_stats) = parity_run(multi_level)
    expected = {"logits", "depth", "depth_features"} | ({"aux_logits"} if multi_level else set())
    assert set(eval_out) == expected
    assert eval_out["depth"].shape == (2, *DEPTH_HW, 1)
    for name in expected:
        assert eval_out[name].dtype == np.float64
        assert_close(eval_out[name], ref_eval[name], f"eval {name}")
        assert_close(train_out[name], ref_train[name], f"train {name}")
    flat = jax.tree_util.tree_flatten_with_path(stats)[0]
    ref_flat = dict(jax.tree_util.tree_flatten_with_path(ref_stats)[0])
    assert any(DEPTH_HEAD in str(p) for p, _ in flat)
    for path, value in flat:
        assert_close(value, ref_flat[path], f"running {path}")


def test_depth_size_unset_returns_depth_at_the_logits_stride():
    model = tiny_flax(depth_size=(), dtype=jnp.float32)
    variables = models.init_variables(model, jax.random.key(0), (47, 41))
    out = model.apply(variables, jnp.zeros((1, 47, 41, 3)), train=False)
    assert out["depth"].shape == (1, *out["logits"].shape[1:3], 1)


def test_build_model_and_backbone_predicate():
    cfg = ml_collections.ConfigDict(dict(
        backbone=models.DAF_BACKBONE, head="daf_aspp", num_classes=16, dtype="float32",
        advent_blocks=BLOCKS, base_channels=WIDTH,
    ))  # fmt: skip
    model = models.build_model(cfg)
    assert isinstance(model, DafDeepLabV2) and not model.multi_level
    assert model.depth_size == (228, 304)
    keep = models.backbone_predicate(model)
    assert keep("layer4_0") and keep("conv1") and not keep("layer6") and not keep(DEPTH_HEAD)
    assert models.default_head(models.DAF_BACKBONE) == "daf_aspp"
    cfg.head = "advent_aspp"
    with pytest.raises(models.ModelConfigError):
        models.build_model(cfg)
