"""MiT-B0 + SegFormer / DAFormer / mmseg SegformerHead against PyTorch references,
both MiT key layouts.

The torch models (torch_ref/mit_heads.py) carry the real checkpoint key names;
their state dicts go through the production conversion (strict), and the Flax model
must reproduce logits and the prototype feature in eval mode (and, for mmseg's head,
in train-mode BN with the running statistics it leaves).
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddb_jax.convert import mit as convert_mit
from ddb_jax.convert.common import ConversionError, convert_state_dict
from ddb_jax.models import EncoderDecoder, variable_shapes
from ddb_jax.models.mit import MixVisionTransformer
from ddb_jax.models.segformer_heads import DAFormerHead, MMSegSegformerHead, SegFormerHead
from torch_ref import mit_heads as ref
from torch_ref.common import nhwc, numpy_state_dict

IMAGE_HW = (65, 97)  # odd sizes: exercises padding, floor-sized sr convs and resizes
B0 = ref.MIT_B0
HEAD_WIDTH = 64  # SegFormer embed dim / DAFormer channels: small for speed


def torch_segmentor(head: str, backbone: str = "nvlabs", eps=ref.NVLABS_EPS, seed: int = 0):
    mit_cls = ref.NVMiT if backbone == "nvlabs" else ref.MMMiT
    encoder = mit_cls(**B0, eps=eps)
    head_cls = {
        "segformer": ref.SegFormerHead,
        "daformer": ref.DAFormerHead,
        "mmseg_segformer": ref.MMSegSegformerHead,
    }[head]
    decoder = head_cls(B0["embed_dims"], HEAD_WIDTH)
    return ref.randomize_(ref.EncoderDecoder(encoder, decoder), seed).eval()


FLAX_HEADS = {
    "segformer": SegFormerHead,
    "daformer": DAFormerHead,
    "mmseg_segformer": MMSegSegformerHead,
}


def flax_segmentor(head: str, layout: str, **head_kwargs) -> EncoderDecoder:
    return EncoderDecoder(
        backbone=MixVisionTransformer(variant="b0", layout=layout, drop_path_rate=0.0),
        decode_head=FLAX_HEADS[head](num_classes=19, channels=HEAD_WIDTH, **head_kwargs),
    )


def convert(model: EncoderDecoder, state_dict: dict[str, np.ndarray]):
    if convert_mit.detect_mit_layout(state_dict) == "mmseg":
        state_dict = convert_mit.mmseg_to_nvlabs(state_dict)
    return convert_state_dict(
        state_dict,
        variable_shapes(model, IMAGE_HW),
        convert_mit.torch_name,
        ignore_keys=convert_mit.unused_keys(state_dict),
    )


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(1, 3, *IMAGE_HW)).astype(np.float32)


def torch_outputs(model, image) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, feature = model(torch.from_numpy(image))
    return nhwc(logits), nhwc(feature)


def flax_outputs(model, variables, image) -> tuple[np.ndarray, np.ndarray]:
    outputs = model.apply(variables, jnp.asarray(nhwc(image)), train=False)
    logits, feature = outputs["logits"], outputs["feature"]
    return np.asarray(logits), np.asarray(feature)


def parity_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """max|diff| relative to max|expected|: the tolerance is 1e-4."""
    return float(np.max(np.abs(expected - actual)) / np.max(np.abs(expected)))


def assert_parity(torch_out, flax_out) -> None:
    (t_logits, t_feature), (f_logits, f_feature) = torch_out, flax_out
    assert f_logits.dtype == np.float32
    assert t_logits.shape == f_logits.shape and t_feature.shape == f_feature.shape
    assert parity_error(t_logits, f_logits) <= 1e-4
    assert parity_error(t_feature, f_feature) <= 1e-4
    agreement = np.mean(np.argmax(t_logits, -1) == np.argmax(f_logits, -1))
    assert agreement >= 0.999


@pytest.mark.parametrize("head", ["segformer", "daformer"])
def test_nvlabs_layout_parity(head, image):
    torch_model = torch_segmentor(head)
    state_dict = numpy_state_dict(torch_model)
    assert convert_mit.detect_mit_layout(state_dict) == "nvlabs"
    model = flax_segmentor(head, "nvlabs")
    assert_parity(
        torch_outputs(torch_model, image), flax_outputs(model, convert(model, state_dict), image)
    )


@pytest.mark.parametrize("head", ["segformer", "daformer"])
def test_mmseg_layout_parity(head, image):
    """mmseg 0.30 MiT (nn.MultiheadAttention, fused in_proj, 1x1-conv FFN, eps 1e-6)."""
    torch_model = torch_segmentor(head, backbone="mmseg", eps=ref.MMSEG_EPS, seed=1)
    state_dict = numpy_state_dict(torch_model)
    assert "backbone.layers.2.1.1.attn.attn.in_proj_weight" in state_dict
    assert convert_mit.detect_mit_layout(state_dict) == "mmseg"
    model = flax_segmentor(head, "mmseg")
    assert_parity(
        torch_outputs(torch_model, image), flax_outputs(model, convert(model, state_dict), image)
    )


EPS32 = float(np.finfo(np.float32).eps)


def assert_float32_error_like_torch(exact, torch32, ours, what: str) -> None:
    """Ours and torch's float32 runs evaluate the same arithmetic in different orders:
    against float64 their rounding errors are of one order (a constant factor for
    reassociated sums), while a wrong mapping is an O(1) error. The floor of a few
    hundred ulps covers a torch run that happens to round almost exactly."""
    torch_error, our_error = parity_error(exact, torch32), parity_error(exact, ours)
    bound = 8 * torch_error + 256 * EPS32
    assert our_error <= bound, f"{what}: {our_error:.2e} > {bound:.2e} (torch {torch_error:.2e})"


def torch_run(model, image: np.ndarray, train: bool):
    """(logits, feature, decode-head BN running stats) of a copy of ``model`` run once;
    ``train`` uses batch statistics (and updates the copy's running ones), dropout off."""
    model = copy.deepcopy(model).train(train)
    model.decode_head.dropout.eval()  # its channel mask is random in both frameworks
    with torch.no_grad():
        logits, feature = model(torch.from_numpy(image).to(next(model.parameters()).dtype))
    stats = {
        k: v.numpy()
        for k, v in model.decode_head.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    }
    return nhwc(logits), nhwc(feature), stats


@pytest.mark.parametrize("train", [False, True], ids=["eval_bn", "train_bn"])
def test_mmseg_segformer_head_parity(train, image):
    """mmseg 0.x SegformerHead (ConvModule per level, fusion_conv, conv_seg) on the
    mmseg MiT, as in mmseg's own SegFormer checkpoints; random BN statistics."""
    torch_model = torch_segmentor("mmseg_segformer", backbone="mmseg", eps=ref.MMSEG_EPS, seed=7)
    state_dict = numpy_state_dict(torch_model)
    assert "decode_head.convs.3.bn.running_var" in state_dict
    assert "decode_head.fusion_conv.conv.weight" in state_dict
    assert convert_mit.detect_head(state_dict) == "mmseg_segformer"
    torch32 = torch_run(torch_model, image, train)
    exact = torch_run(torch_model.double(), image.astype(np.float64), train)

    model = flax_segmentor("mmseg_segformer", "mmseg", dropout_ratio=0.0 if train else 0.1)
    variables = convert(model, state_dict)
    x = jnp.asarray(nhwc(image))
    if train:
        named_outputs, updated = model.apply(variables, x, train=True, mutable="batch_stats")
        logits = named_outputs["logits"]
        feature = named_outputs["feature"]
    else:
        outputs = model.apply(variables, x, train=False)
        logits, feature = outputs["logits"], outputs["feature"]
        updated = variables
    assert logits.dtype == jnp.float32 and logits.shape == torch32[0].shape
    assert feature.shape == torch32[1].shape == (1, 17, 25, HEAD_WIDTH)
    for index, what in enumerate(("logits", "feature")):
        assert_float32_error_like_torch(
            exact[index], torch32[index], np.asarray((logits, feature)[index]), what
        )
    # Eval leaves the converted statistics; train moves them with the unbiased batch variance.
    bn = updated["batch_stats"]["decode_head"]
    for key, expected in exact[2].items():
        module, leaf = key.split(".bn.")  # 'convs.3.bn.running_var'
        ours = bn[module.replace(".", "_")]["bn"][leaf.removeprefix("running_")]
        assert_float32_error_like_torch(expected, torch32[2][key], np.asarray(ours), key)


def test_mmseg_segformer_head_bfloat16():
    """bfloat16 compute: float32 logits, bfloat16 feature, and errors of bfloat16's size
    (8 mantissa bits, relative rounding 2**-8 per step) against the float32 head."""
    rng = np.random.default_rng(8)
    shapes = [(1, 16 // 2**i, 24 // 2**i, c) for i, c in enumerate(B0["embed_dims"])]
    features = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    head32 = MMSegSegformerHead(num_classes=19, channels=HEAD_WIDTH)
    head16 = MMSegSegformerHead(num_classes=19, channels=HEAD_WIDTH, dtype=jnp.bfloat16)
    variables = head32.init(jax.random.key(0), features, False)
    logits32, feature32 = head32.apply(variables, features, False)
    logits16, feature16 = head16.apply(variables, features, False)
    assert logits16.dtype == jnp.float32 and feature16.dtype == jnp.bfloat16
    error = parity_error(np.asarray(logits32), np.asarray(logits16))
    assert 2**-12 < error < 2**-4, error  # bfloat16 was used, and only its rounding differs
    assert parity_error(np.asarray(feature32), np.asarray(feature16, np.float32)) < 2**-4


def nvlabs_to_mmseg_rule(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The DDB repo's mit_convert rule (NVlabs -> mmseg), re-expressed for the test."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("backbone."):
            out[key] = value
            continue
        k = key[len("backbone.") :]
        if m := re.match(r"patch_embed(\d)\.(.*)", k):
            k = f"layers.{int(m[1]) - 1}.0.{m[2].replace('proj.', 'projection.')}"
        elif m := re.match(r"block(\d)\.(.*)", k):
            k = f"layers.{int(m[1]) - 1}.1.{m[2]}"
            if ".attn.kv." in k:
                continue
            if ".attn.q." in k:
                value = np.concatenate([value, state_dict[key.replace(".q.", ".kv.")]], 0)
                k = k.replace("q.", "attn.in_proj_")
            k = k.replace("attn.proj.", "attn.attn.out_proj.")
            if re.search(r"mlp\.fc[12]\.weight", k):
                value = value.reshape(*value.shape, 1, 1)
            k = k.replace("mlp.fc1.", "ffn.layers.0.").replace("mlp.fc2.", "ffn.layers.4.")
            k = k.replace("mlp.dwconv.dwconv.", "ffn.layers.1.")
        elif m := re.match(r"norm(\d)\.(.*)", k):
            k = f"layers.{int(m[1]) - 1}.2.{m[2]}"
        out["backbone." + k] = value
    return out


def test_mmseg_rename_roundtrip_and_same_math(image):
    """DDB's NVlabs->mmseg rule loads strictly into the mmseg reference, gives the same
    outputs as NVlabs attention with eps 1e-6 (MultiheadAttention = q/kv math), and
    mmseg_to_nvlabs inverts it exactly."""
    nv_model = torch_segmentor("daformer", eps=ref.MMSEG_EPS, seed=2)
    nv_sd = numpy_state_dict(nv_model)
    mm_sd = nvlabs_to_mmseg_rule(nv_sd)
    mm_model = ref.EncoderDecoder(ref.MMMiT(**B0), ref.DAFormerHead(B0["embed_dims"], HEAD_WIDTH))
    mm_model.load_state_dict({k: torch.from_numpy(v) for k, v in mm_sd.items()}, strict=True)
    nv_out, mm_out = torch_outputs(nv_model, image), torch_outputs(mm_model.eval(), image)
    assert parity_error(nv_out[0], mm_out[0]) <= 1e-5
    back = convert_mit.mmseg_to_nvlabs(mm_sd)
    assert sorted(back) == sorted(nv_sd)
    for key, value in nv_sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_wrong_layout_is_caught(image):
    """Tiny patch-embedding outputs make LayerNorm eps decisive (1e-5 NVlabs vs 1e-6 mmseg)."""
    torch_model = torch_segmentor("segformer", seed=3)
    with torch.no_grad():
        torch_model.backbone.patch_embed1.proj.weight.mul_(2e-3)
        torch_model.backbone.patch_embed1.proj.bias.mul_(2e-3)
    state_dict = numpy_state_dict(torch_model)
    expected = torch_outputs(torch_model, image)
    right, wrong = flax_segmentor("segformer", "nvlabs"), flax_segmentor("segformer", "mmseg")
    variables = convert(right, state_dict)  # the same tree for both layouts
    assert_parity(expected, flax_outputs(right, variables, image))
    assert parity_error(expected[0], flax_outputs(wrong, variables, image)[0]) > 1e-3


def hf_to_nvlabs(hf_sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers SegformerModel keys -> NVlabs keys under 'backbone.' (k/v -> kv)."""
    renames = (
        (r"stages\.(\d)\.patch_embeddings\.proj\.", "patch_embed{s}.proj."),
        (r"stages\.(\d)\.patch_embeddings\.layer_norm\.", "patch_embed{s}.norm."),
        (r"stages\.(\d)\.layer_norm\.", "norm{s}."),
        (r"stages\.(\d)\.blocks\.(\d+)\.layernorm_before\.", "block{s}.{1}.norm1."),
        (r"stages\.(\d)\.blocks\.(\d+)\.layernorm_after\.", "block{s}.{1}.norm2."),
        (r"stages\.(\d)\.blocks\.(\d+)\.attention\.q_proj\.", "block{s}.{1}.attn.q."),
        (r"stages\.(\d)\.blocks\.(\d+)\.attention\.o_proj\.", "block{s}.{1}.attn.proj."),
        (
            r"stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction\.",
            "block{s}.{1}.attn.sr.",
        ),
        (
            r"stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm\.",
            "block{s}.{1}.attn.norm.",
        ),
        (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.", "block{s}.{1}.mlp."),
    )
    out = {}
    for key, value in hf_sd.items():
        if m := re.match(r"stages\.(\d)\.blocks\.(\d+)\.attention\.k_proj\.(\w+)", key):
            v_key = key.replace("k_proj", "v_proj")
            out[f"backbone.block{int(m[1]) + 1}.{m[2]}.attn.kv.{m[3]}"] = np.concatenate(
                [value, hf_sd[v_key]], 0
            )
            continue
        if ".attention.v_proj." in key:
            continue
        for pattern, template in renames:
            if m := re.match(pattern, key):
                groups = {"s": int(m[1]) + 1}
                prefix = template.replace("{1}", m[2] if m.lastindex > 1 else "").format(**groups)
                out["backbone." + prefix + key[m.end() :]] = value
                break
        else:
            raise KeyError(f"unmapped transformers key {key}")
    return out


def test_encoder_matches_transformers_segformer(image):
    from transformers import SegformerConfig, SegformerModel

    config = SegformerConfig(
        hidden_sizes=list(B0["embed_dims"]), depths=list(B0["depths"]), decoder_hidden_size=64
    )
    hf = SegformerModel(config).eval()
    ref.randomize_(hf, seed=4)
    # transformers builds every LayerNorm with torch's eps 1e-5; NVlabs uses 1e-6 outside
    # the patch embeddings and the attention's reduction norm.
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and re.search(
            r"layernorm_|^stages\.\d\.layer_norm", name
        ):
            module.eps = 1e-6
    with torch.no_grad():
        hidden = hf(torch.from_numpy(image), output_hidden_states=True).hidden_states
    assert len(hidden) == 4
    state_dict = hf_to_nvlabs(numpy_state_dict(hf))
    encoder = MixVisionTransformer(variant="b0", layout="nvlabs")
    shapes = jax.eval_shape(
        lambda: encoder.init(jax.random.key(0), jnp.zeros((1, *IMAGE_HW, 3)), False)
    )
    variables = convert_state_dict(
        state_dict, {"params": {"backbone": shapes["params"]}}, convert_mit.torch_name
    )
    outs = encoder.apply(
        {"params": variables["params"]["backbone"]}, jnp.asarray(nhwc(image)), False
    )
    for stage, (expected, actual) in enumerate(zip(hidden, outs, strict=True)):
        expected = nhwc(expected)
        assert expected.shape == actual.shape, stage
        assert parity_error(expected, np.asarray(actual)) <= 1e-4, stage


def test_strict_conversion_errors():
    torch_model = torch_segmentor("daformer")
    model = flax_segmentor("daformer", "nvlabs")
    state_dict = numpy_state_dict(torch_model)
    broken = dict(state_dict)
    del broken["backbone.block3.1.attn.kv.weight"]
    broken["backbone.block5.0.norm1.weight"] = np.ones(3, np.float32)
    broken["decode_head.fuse_layer.bottleneck.conv.weight"] = np.ones((1, 1, 1, 1), np.float32)
    with pytest.raises(ConversionError) as error:
        convert(model, broken)
    message = str(error.value)
    assert "backbone.block3.1.attn.kv.weight" in message  # missing
    assert "backbone.block5.0.norm1.weight" in message  # unexpected
    assert "decode_head.fuse_layer.bottleneck.conv.weight" in message  # shape conflict
    # A SegFormer checkpoint's conv_seg is unused by construction; not for other heads.
    assert convert_mit.unused_keys(state_dict) == ()
    with pytest.raises(ConversionError, match="backbone.layers.0.1.0.attn.bogus.weight"):
        convert_mit.mmseg_to_nvlabs({"backbone.layers.0.1.0.attn.bogus.weight": np.zeros(1)})
    with pytest.raises(ConversionError, match="cannot tell the MiT key layout"):
        convert_mit.detect_mit_layout({"decode_head.conv_seg.weight": np.zeros(1)})
    with pytest.raises(ConversionError, match="params/backbone/block1_0/attn/qkv/kernel"):
        convert_mit.torch_name(("params", "backbone", "block1_0", "attn", "qkv", "kernel"))


def test_drop_path_and_remat():
    """Eval ignores drop path; train with rate 0 equals eval; remat changes nothing;
    train with drop path is an rng-driven perturbation."""
    # The parity tests' input shape: op-by-op execution reuses their compiled kernels.
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, *IMAGE_HW, 3)), jnp.float32)
    plain = MixVisionTransformer(variant="b0", drop_path_rate=0.0)
    # Random variables without running the initialisers (op-by-op init is slow on CPU).
    shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), x, False))
    rng = np.random.default_rng(6)
    variables = jax.tree.map(
        lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), jnp.float32), shapes
    )
    eval_out = plain.apply(variables, x, False)[3]
    np.testing.assert_array_equal(plain.apply(variables, x, True)[3], eval_out)
    remat = MixVisionTransformer(variant="b0", drop_path_rate=0.0, remat=True)
    remat_out = jax.jit(lambda v: remat.apply(v, x, False)[3])(variables)
    np.testing.assert_allclose(remat_out, eval_out, atol=1e-5 * float(jnp.max(jnp.abs(eval_out))))
    dropping = MixVisionTransformer(variant="b0", drop_path_rate=0.5)
    np.testing.assert_array_equal(dropping.apply(variables, x, False)[3], eval_out)
    a, b, c = (
        dropping.apply(variables, x, True, rngs={"dropout": jax.random.key(seed)})[3]
        for seed in (1, 1, 2)
    )
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, eval_out)


def test_head_conv_module_batchnorm_is_torchs_in_training():
    """The heads' ConvModule (conv, BN, ReLU) in training mode, float64 on both sides: the
    output and the running statistics equal torch's BatchNorm2d, whose running variance
    takes the unbiased batch variance (n / (n - 1) apart from the biased one)."""
    from ddb_jax.models.segformer_heads import ConvModule

    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, size=(2, 5, 6, 4))  # n = 2 * 5 * 6 values per channel
    conv = torch.nn.Conv2d(4, 3, 1, bias=False).double()
    bn = torch.nn.BatchNorm2d(3).double().train()
    with torch.no_grad():
        expected = torch.relu(bn(conv(torch.from_numpy(x).permute(0, 3, 1, 2))))
    with jax.enable_x64(True):
        module = ConvModule(3, 1, dtype=jnp.float64)
        variables = module.init(jax.random.key(0), jnp.asarray(x), train=False)
        kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
        params = {"conv": {"kernel": jnp.asarray(kernel)}, "bn": variables["params"]["bn"]}
        variables = {"params": params, "batch_stats": variables["batch_stats"]}
        out, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
        stats = jax.tree_util.tree_map(np.asarray, updates["batch_stats"]["bn"])
    np.testing.assert_allclose(np.asarray(out), expected.permute(0, 2, 3, 1).numpy(), atol=1e-12)
    # The running statistics are kept in float32 (momentum 0.9 too): a few float32 roundings
    # of values near 1, far below the 1/59 (1.7 %) that biased vs unbiased variance moves
    # the batch term by.
    float32_bound = 8 * 2.0**-24
    np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=float32_bound)
    np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), rtol=float32_bound)
