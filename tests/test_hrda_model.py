"""HRDA's multi-resolution segmentor (ddb_jax/models/hrda.py) against a PyTorch transcription
(torch_ref/hrda.py), in float64, for both of its variants: MiT-B0 + DAFormer's head (the
attention's fusion a 1x1 conv) and ResNet-18 + DAFormer's DLV2Head, at tiny widths on
2 x 64 x 64 images with a 32 x 32 detail crop (3 x 3 slide windows at inference).

Bounds: both sides run the same float64 arithmetic up to reassociation, so outputs agree to
a few hundred roundings of their scale: REL64 = 2^-33 of it, tests/parity_support.py's bound,
is far above that and far below what a misplaced tensor or window would cause. The
structural properties (no detail outside the box, a crop of the image's size) are exact.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import default
from ddb_jax import checkpoints, models, ops
from ddb_jax.convert import convert_model_state
from ddb_jax.convert import hrda as convert_hrda
from ddb_jax.convert import mit as convert_mit
from ddb_jax.convert import resnet as convert_resnet
from ddb_jax.convert.common import ConversionError, convert_state_dict, path_to_str
from ddb_jax.models import hrda
from ddb_jax.runtime import aot_figures
from tests.parity_support import REL64, torch_threads
from tools import convert_checkpoint
from torch_ref import hrda as ref
from torch_ref import mit_heads, resnet_dlv2
from torch_ref.common import nchw, nhwc, numpy_state_dict

NUM_CLASSES = 6
CROP = (32, 32)
HEAD_WIDTH, ATTENTION_WIDTH, BASE_WIDTH = 16, 8, 16
# Detail boxes (y1, x1): DAFormer's on the context cells of 8 pixels; DeepLabV2's x1 = 24 is
# half a context cell (16 pixels): its attention mask floors, as the reference's int() does.
BOXES = {"daformer": (16, 8), "dlv2_sum": (8, 24)}


def model_config(head: str, **hrda_settings) -> ml_collections.ConfigDict:
    """Tiny HRDA of ``head`` ('daformer' on MiT-B0, 'dlv2_sum' on ResNet-18), float64."""
    cfg = default.get_model_config()
    cfg.backbone = "mit_b0" if head == "daformer" else "resnet18_v1c"
    cfg.head, cfg.num_classes, cfg.dtype = head, NUM_CLASSES, "float64"
    cfg.head_channels, cfg.base_channels = HEAD_WIDTH, BASE_WIDTH
    cfg.dropout_ratio = cfg.drop_path_rate = 0.0
    cfg.hrda.update(enabled=True, detail_crop=CROP, attention_channels=ATTENTION_WIDTH)
    cfg.hrda.update(hrda_settings)
    return cfg


def torch_model(head: str, seed: int = 0, **settings) -> ref.HRDASegmentor:
    """The reference of :func:`model_config`, random weights and BN statistics, float64."""
    settings.setdefault("detail_crop", CROP)
    if head == "daformer":
        model = ref.daformer_hrda(HEAD_WIDTH, ATTENTION_WIDTH, NUM_CLASSES, **settings)
        return mit_heads.randomize_(model, seed).double()
    model = ref.dlv2_hrda(18, BASE_WIDTH, NUM_CLASSES, **settings)
    return resnet_dlv2.randomize(model, seed).double()


def names(head: str):
    return convert_hrda.torch_name(
        convert_mit.torch_name if head == "daformer" else convert_resnet.torch_name
    )


def to_flax(state: dict[str, np.ndarray], model, head: str):
    """A torch state dict as float64 variables of ``model`` (HRDA's name map)."""
    shapes = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float64), models.variable_shapes(model)
    )
    return jax.tree_util.tree_map(jnp.asarray, convert_state_dict(state, shapes, names(head)))


@functools.cache
def evaluate(model):
    """One compiled inference program per model (models are canonical: equal configs hit)."""
    return jax.jit(functools.partial(model.apply, train=False))


def images(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 64, 64, 3))


def assert_rel(ours, reference, what: str) -> None:
    scale = np.abs(reference).max()
    error = np.abs(np.asarray(ours) - reference).max()
    assert scale > 0.1, f"{what}: degenerate reference"
    assert error <= REL64 * scale, f"{what}: {error:.3g} > {REL64 * scale:.3g}"
    print(f"{what}: max error {error:.3g} (bound {REL64 * scale:.3g})")


@pytest.fixture(scope="module", params=["daformer", "dlv2_sum"])
def case(request):
    """(head, torch reference, our model, its variables from the reference's state dict)."""
    head = request.param
    with jax.enable_x64(True):
        model = models.build_model(model_config(head))
        reference = torch_model(head)
        yield head, reference, model, to_flax(numpy_state_dict(reference), model, head)


def test_training_forward_matches_pytorch(case):
    """Fused, detail and context logits of the training forward (train mode: BN on batch
    statistics) and the BN running statistics after its two backbone passes."""
    head, reference, model, variables = case
    x, box = images(), BOXES[head]
    ref_model = copy.deepcopy(reference).train()
    with torch.no_grad(), torch_threads(1):
        fused, lr, hr = (nhwc(t) for t in ref_model.forward_train(nchw(x), box))
    with jax.enable_x64(True):
        step = jax.jit(lambda v, x, b: model.apply(v, x, b, method="forward_train",
                                                   mutable=["batch_stats"]))  # fmt: skip
        out, updates = step(variables, x, jnp.asarray(box, jnp.int32))
    assert out["logits"].dtype == jnp.float64 and len(out["backbone"]) == 4
    assert_rel(out["logits"], fused, f"{head} fused")
    assert_rel(out["detail_logits"], hr, f"{head} detail")
    assert_rel(out["context_logits"], lr, f"{head} context")
    ref_state = numpy_state_dict(ref_model)
    for path, ours in jax.tree_util.tree_flatten_with_path(updates["batch_stats"])[0]:
        source = names(head)(("batch_stats", *path_to_str(path).split("/")))
        assert_rel(ours, source.transform(ref_state[source.key]), source.key)

    # No detail outside the box: where no bilinear tap of the fused map reaches the box's
    # context cells, the fused logits are the upsampled raw context logits, exactly.
    context = np.asarray(out["context_logits"])
    up = np.asarray(ops.resize_bilinear(jnp.asarray(context), out["logits"].shape[1:3]))
    cell = 2 * hrda_stride(head)
    mask = np.asarray(hrda.box_mask(context.shape[1:3], jnp.asarray(box), CROP, cell))[0, ..., 0]
    reached = [touched(mask.any(1 - a), 2 * mask.shape[a]) for a in (0, 1)]
    outside = ~(reached[0][:, None] & reached[1][None, :])
    fused_ours = np.asarray(out["logits"])
    assert outside.any()
    np.testing.assert_array_equal(fused_ours[:, outside], up[:, outside])
    # ... and where both taps are in the box the attention (> 0) changes them.
    within = [touched(mask.any(1 - a), 2 * mask.shape[a], both=True) for a in (0, 1)]
    inside = within[0][:, None] & within[1][None, :]
    assert inside.any() and np.all(np.abs(fused_ours - up).max(-1)[:, inside] > 0)


def hrda_stride(head: str) -> int:
    return models.HRDA_HEADS[head][1]


def touched(rows_in_box: np.ndarray, out_size: int, both: bool = False) -> np.ndarray:
    """Which cells of a x2 bilinear upsampling read a row flagged in the input (either of
    their two taps; ``both``: both taps)."""
    i0, i1, _, _ = ops.bilinear_taps(len(rows_in_box), out_size)
    if both:
        return rows_in_box[i0] & rows_in_box[i1]
    return rows_in_box[i0] | rows_in_box[i1]


def test_slide_inference_matches_pytorch(case):
    """encode_decode: the detail view in 3 x 3 overlapping windows (one batch), BN in
    inference mode; and the feature (the context head's) has the context's size."""
    head, reference, model, variables = case
    assert hrda.slide_windows((64, 64), CROP) == [
        (y, y + 32, x, x + 32) for y in (0, 16, 32) for x in (0, 16, 32)
    ]
    x = images(2)
    with torch.no_grad(), torch_threads(1):
        expected = nhwc(copy.deepcopy(reference).eval().encode_decode(nchw(x)))
    with jax.enable_x64(True):
        out = evaluate(model)(variables, x)
    assert set(out) == {"logits", "feature"}
    assert out["logits"].shape == (2, 64 // hrda_stride(head), 64 // hrda_stride(head), 6)
    assert out["feature"].shape[1:3] == (32 // hrda_stride(head),) * 2
    assert_rel(out["logits"], expected, f"{head} slide inference")


def test_sharded_batch_keeps_each_images_windows_on_its_device(case):
    """The batch sharded over 8 devices, one image each: the detail windows' batch is
    image-major, so the compiled inference has no collective at all (window-major, XLA
    gathered the whole batch on every device and permuted it back), with the logits of the
    unsharded program."""
    head, _, model, variables = case
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_image = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = np.random.default_rng(5).normal(size=(8, 64, 64, 3))
    with jax.enable_x64(True):
        sharded = jax.jit(
            functools.partial(model.apply, train=False), in_shardings=(replicated, by_image)
        ).lower(variables, x).compile()  # fmt: skip
        assert aot_figures.hlo_counts(sharded.as_text())["collectives"] == {}
        assert_rel(sharded(variables, x)["logits"], evaluate(model)(variables, x)["logits"],
                   f"{head} sharded slide inference")  # fmt: skip


def test_a_crop_of_the_image_size_is_one_detail_pass():
    """Slide windows of the image's size are one window: the same logits as no sliding,
    exactly; and both are the reference's inference without sliding."""
    head = "dlv2_sum"
    reference = torch_model(head, seed=3, slide=False)
    x = images(4)
    with torch.no_grad(), torch_threads(1):
        expected = nhwc(reference.eval().encode_decode(nchw(x)))
    with jax.enable_x64(True):
        whole = models.build_model(model_config(head, detail_crop=(64, 64)))
        single = models.build_model(model_config(head, slide_detail=False))
        variables = to_flax(numpy_state_dict(reference), whole, head)
        sliding, one_pass = evaluate(whole)(variables, x), evaluate(single)(variables, x)
    np.testing.assert_array_equal(sliding["logits"], one_pass["logits"])
    assert_rel(one_pass["logits"], expected, "one detail pass")


def test_box_mask_floors_like_the_reference():
    mask = np.asarray(hrda.box_mask((4, 4), jnp.asarray([8, 24]), (32, 32), 16))[0, ..., 0]
    np.testing.assert_array_equal(np.argwhere(mask.any(1)).ravel(), [0, 1])  # 8 // 16 .. 40 // 16
    np.testing.assert_array_equal(np.argwhere(mask.any(0)).ravel(), [1, 2])  # 24 // 16 .. 56 // 16


# --- configuration ---------------------------------------------------------------------------


def test_hrda_wraps_only_its_heads():
    cfg = model_config("daformer")
    cfg.head = "segformer"
    with pytest.raises(models.ModelConfigError) as err:
        models.build_model(cfg)
    message = str(err.value)
    assert "config.model.hrda.enabled" in message and "'segformer'" in message
    assert "\n" not in message
    plain = default.get_model_config()
    assert not models.is_multi_resolution(models.build_model(plain))
    assert models.is_multi_resolution(models.build_model(model_config("dlv2_sum")).apply)


def test_an_old_model_json_builds_the_plain_model(tmp_path):
    """A model.json written before config.model.hrda existed: the single-scale segmentor."""
    cfg = model_config("daformer").to_dict()
    del cfg["hrda"]
    (tmp_path / "model.json").write_text(json.dumps({"model": cfg, "provenance": {}}))
    old_cfg, _ = checkpoints.read_model_config(str(tmp_path))
    model = models.build_model(old_cfg)
    assert isinstance(model, models.EncoderDecoder) and not models.is_multi_resolution(model)


# --- conversion ------------------------------------------------------------------------------


def save_uda_checkpoint(student, teacher, path) -> None:
    """The UDA wrapper's state dict, as DAFormer/HRDA/MIC release it."""
    state = {f"model.{k}": v for k, v in student.state_dict().items()}
    state.update({f"ema_model.{k}": v for k, v in teacher.state_dict().items()})
    torch.save({"state_dict": state, "meta": {"iter": 40000}}, path)


def test_convert_checkpoint_gives_the_reference_outputs(tmp_path, capsys):
    """tools/convert_checkpoint.py on a MIC(HRDA)-style file: model.json says HRDA (the
    attention's width and class-wise output from the file); the model directory loads,
    builds and reproduces the reference's slide inference (float64)."""
    head = "daformer"
    student, teacher = torch_model(head, seed=0), torch_model(head, seed=5)
    path, out = tmp_path / "mic_hrda.pth", tmp_path / "model"
    save_uda_checkpoint(student.float(), teacher.float(), path)
    args = ["--backbone=mit_b0", f"--head-channels={HEAD_WIDTH}", f"--num-classes={NUM_CLASSES}"]
    assert convert_checkpoint.main([str(path), str(out), *args]) == 0
    assert "HRDA mit_b0+daformer" in capsys.readouterr().out
    variables, cfg = checkpoints.load_model_dir(str(out))
    _, provenance = checkpoints.read_model_config(str(out))
    assert provenance["prefix"] == "model"
    assert cfg.hrda.enabled and cfg.hrda.attention_classwise
    assert cfg.hrda.attention_channels == ATTENTION_WIDTH and cfg.mit_layout == "nvlabs"
    assert models.is_multi_resolution(models.build_model(cfg))
    # The tests' crop and float64: the very model (and compiled program) of the parity tests.
    cfg.hrda.detail_crop, cfg.dtype = CROP, "float64"
    cfg.dropout_ratio = cfg.drop_path_rate = 0.0
    x = images(2)
    with torch.no_grad(), torch_threads(1):
        expected = nhwc(student.double().eval().encode_decode(nchw(x)))
    with jax.enable_x64(True):
        model = models.build_model(cfg)
        assert model is models.build_model(model_config(head))
        variables = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), variables)
        ours = evaluate(model)(variables, x)["logits"]
    assert_rel(ours, expected, "converted model")


@pytest.mark.parametrize(("head", "args", "needle"), [
    ("dlv2_sum", ["--backbone=resnet18_v1c"], "--head=dlv2_sum "),
    ("daformer", ["--backbone=mit_b0", "--head=segformer"], "--head=daformer "),
    ("daformer", ["--backbone=mit_b0"], "has 6 classes, the config"),
])  # fmt: skip
def test_a_mismatched_config_is_one_line(tmp_path, capsys, head, args, needle):
    path, out = tmp_path / "hrda.pth", tmp_path / "out"
    model = torch_model(head).float()
    save_uda_checkpoint(model, model, path)
    assert convert_checkpoint.main([str(path), str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not os.path.exists(out)


def test_a_single_scale_file_refuses_an_hrda_config():
    plain = mit_heads.EncoderDecoder(
        mit_heads.NVMiT(**mit_heads.MIT_B0),
        mit_heads.DAFormerHead(mit_heads.MIT_B0["embed_dims"], HEAD_WIDTH, NUM_CLASSES),
    )
    with pytest.raises(ConversionError, match="hrda.enabled=False") as err:
        convert_model_state(numpy_state_dict(plain), model_config("daformer"))
    assert "\n" not in str(err.value)
