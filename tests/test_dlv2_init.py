"""DLV2 head initialisation follows the reference's mmcv init, group by group.

The reference (mmcv 1.x, mmseg 0.x, DDB's DLV2AdapterHead) sets ``init_cfg=dict(type=
'Normal', std=0.01, override=dict(name='aspp_modules'))``: mmcv's normal_init on every
submodule of the ASPP branches with a weight (conv kernels and BN scales ~ N(0, 0.01),
BN biases 0). ``bottleneck`` keeps ConvModule.init_weights (kaiming-normal, fan_out,
ReLU; BN scale 1) and ``conv_seg`` PyTorch's Conv2d default (weight and bias
U(-1/sqrt(fan_in), 1/sqrt(fan_in))). Each group is checked against its law with bounds
of SIGMAS standard deviations of the estimator, and against a torch head initialised
the mmcv way by a two-sample Kolmogorov-Smirnov test (the law, not the values).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from ddb_jax.models.deeplabv2 import DLV2Head
from torch_ref.resnet_dlv2 import DLV2AdapterHead

SIGMAS = 5.0
IN_CHANNELS, CHANNELS, DILATIONS, CLASSES = 2048, 256, (6, 12), 19  # the reference's head
BRANCH = CHANNELS // len(DILATIONS)
SEEDS = 8  # inits pooled for the small groups (BN, conv_seg)
KS_P = 1e-6  # false-alarm probability of each two-sample KS test


def _jax_params(conv_impl: str, seed: int) -> dict:
    head = DLV2Head(
        num_classes=CLASSES, channels=CHANNELS, dilations=DILATIONS, conv_impl=conv_impl
    )
    features = [jnp.zeros((1, 4, 4, IN_CHANNELS), jnp.float32)]
    init = jax.jit(functools.partial(head.init, train=False))
    return jax.device_get(init(jax.random.key(seed), features)["params"])


def _pool(per_seed: list[dict[str, list]]) -> dict[str, np.ndarray]:
    """Flattened groups: the small ones pooled over the seeds, the large from seed 0."""
    pooled = {}
    for name, first in per_seed[0].items():
        runs = per_seed if sum(np.size(v) for v in first) < 100_000 else per_seed[:1]
        pooled[name] = np.concatenate([np.ravel(v) for r in runs for v in r[name]])
    return {k: v.astype(np.float64) for k, v in pooled.items()}


def _jax_groups(conv_impl: str) -> dict[str, np.ndarray]:
    per_seed = []
    for seed in range(SEEDS):
        p = _jax_params(conv_impl, seed)
        aspp = [p[f"aspp_modules_{b}"] for b in range(len(DILATIONS))]
        per_seed.append(
            {
                "aspp_conv": [m["conv"]["kernel"] for m in aspp],
                "aspp_bn_scale": [m["bn"]["scale"] for m in aspp],
                "aspp_bn_bias": [m["bn"]["bias"] for m in aspp],
                "bottleneck_conv": [p["bottleneck"]["conv"]["kernel"]],
                "bottleneck_bn_scale": [p["bottleneck"]["bn"]["scale"]],
                "bottleneck_bn_bias": [p["bottleneck"]["bn"]["bias"]],
                "conv_seg_weight": [p["conv_seg"]["kernel"]],
                "conv_seg_bias": [p["conv_seg"]["bias"]],
            }
        )
    return _pool(per_seed)


@torch.no_grad()
def _mmcv_initialised_head(seed: int) -> DLV2AdapterHead:
    """mmcv's order: modules built (ConvModule.__init__ runs its init_weights, conv_seg
    gets torch's default), then the head's init_cfg (normal_init over all of
    aspp_modules), then the children's init_weights (only bottleneck has one)."""
    torch.manual_seed(seed)
    head = DLV2AdapterHead(IN_CHANNELS, CHANNELS, DILATIONS, CLASSES)

    def conv_module_init_weights(module):
        nn.init.kaiming_normal_(module.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(module.bn.weight, 1)
        nn.init.constant_(module.bn.bias, 0)

    for module in [*head.aspp_modules, head.bottleneck]:
        conv_module_init_weights(module)
    for m in head.aspp_modules.modules():
        if getattr(m, "weight", None) is not None:
            nn.init.normal_(m.weight, 0, 0.01)
        if getattr(m, "bias", None) is not None:
            nn.init.constant_(m.bias, 0)
    conv_module_init_weights(head.bottleneck)
    return head


def _torch_groups() -> dict[str, np.ndarray]:
    per_seed = []
    for seed in range(SEEDS):
        head = _mmcv_initialised_head(seed)
        groups = {
            "aspp_conv": [m.conv.weight for m in head.aspp_modules],
            "aspp_bn_scale": [m.bn.weight for m in head.aspp_modules],
            "aspp_bn_bias": [m.bn.bias for m in head.aspp_modules],
            "bottleneck_conv": [head.bottleneck.conv.weight],
            "bottleneck_bn_scale": [head.bottleneck.bn.weight],
            "bottleneck_bn_bias": [head.bottleneck.bn.bias],
            "conv_seg_weight": [head.conv_seg.weight],
            "conv_seg_bias": [head.conv_seg.bias],
        }
        per_seed.append({k: [t.detach().numpy() for t in v] for k, v in groups.items()})
    return _pool(per_seed)


@pytest.fixture(scope="module", params=["lax", "im2col"])
def jax_groups(request):
    return _jax_groups(request.param)


@pytest.fixture(scope="module")
def torch_groups():
    return _torch_groups()


KAIMING_STD = math.sqrt(2.0 / (CHANNELS * 9))  # fan_out of the 3x3 bottleneck conv
SEG_BOUND = 1.0 / math.sqrt(CHANNELS)  # fan_in of the 1x1 classifier
NORMAL = {"aspp_conv": 0.01, "aspp_bn_scale": 0.01, "bottleneck_conv": KAIMING_STD}
UNIFORM = {"conv_seg_weight": SEG_BOUND, "conv_seg_bias": SEG_BOUND}
CONSTANT = {"aspp_bn_bias": 0.0, "bottleneck_bn_scale": 1.0, "bottleneck_bn_bias": 0.0}


def _check_normal(x: np.ndarray, std: float) -> None:
    """N(0, std): mean, standard deviation and (untruncated) excess kurtosis 0."""
    n = len(x)
    assert abs(x.mean()) < SIGMAS * std / math.sqrt(n)
    assert abs(x.std() - std) < SIGMAS * std / math.sqrt(2 * n)
    kurtosis = np.mean((x / x.std()) ** 4) - 3.0
    assert abs(kurtosis) < SIGMAS * math.sqrt(24 / n), kurtosis


def _check_uniform(x: np.ndarray, bound: float) -> None:
    """U(-bound, bound): support, mean, variance bound^2/3, and an edge that is reached
    (P(max |x| < bound (1 - 20/n)) ~ e^-20)."""
    n = len(x)
    assert np.abs(x).max() <= bound
    assert np.abs(x).max() > bound * (1 - 20 / n)
    assert abs(x.mean()) < SIGMAS * bound / math.sqrt(3 * n)
    variance_sd = math.sqrt(4 * bound**4 / (45 * n))  # (mu4 - sigma^4) / n, mu4 = b^4/5
    assert abs(x.var() - bound**2 / 3) < SIGMAS * variance_sd


@pytest.mark.parametrize("name, std", NORMAL.items())
def test_normal_groups(jax_groups, name, std):
    _check_normal(jax_groups[name], std)


@pytest.mark.parametrize("name, bound", UNIFORM.items())
def test_torch_default_classifier(jax_groups, name, bound):
    _check_uniform(jax_groups[name], bound)


@pytest.mark.parametrize("name, value", CONSTANT.items())
def test_constant_groups(jax_groups, name, value):
    np.testing.assert_array_equal(jax_groups[name], value)


def test_torch_transcription_follows_the_same_laws(torch_groups):
    """The mmcv-order torch init obeys the laws the JAX tests check (so they are mmcv's)."""
    for name, std in NORMAL.items():
        _check_normal(torch_groups[name], std)
    for name, bound in UNIFORM.items():
        _check_uniform(torch_groups[name], bound)
    for name, value in CONSTANT.items():
        np.testing.assert_array_equal(torch_groups[name], value)


def _ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


@pytest.mark.parametrize("name", [*NORMAL, *UNIFORM])
def test_same_law_as_the_mmcv_initialised_torch_head(jax_groups, torch_groups, name):
    a, b = jax_groups[name], torch_groups[name]
    assert a.shape == b.shape
    critical = math.sqrt(-math.log(KS_P / 2) / 2) * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    assert _ks_two_sample(a, b) < critical
