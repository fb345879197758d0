"""tools/convert_checkpoint.py end to end: DDB .pth -> model directory -> same outputs as torch."""

import os

import numpy as np
import pytest
import torch

from ddb_jax import checkpoints, models
from tools import convert_checkpoint
from torch_ref.resnet_dlv2 import Segmentor, center_classifier, randomize


@pytest.fixture(scope="module")
def ddb_checkpoint(tmp_path_factory):
    """A self-training checkpoint in DDB's layout: student under model., teacher under ema_model."""
    torch.manual_seed(0)
    images = torch.randn(1, 3, 65, 97)
    student = center_classifier(randomize(Segmentor(18), seed=1).eval(), images)
    teacher = randomize(Segmentor(18), seed=2)
    state = {f"model.{k}": v for k, v in student.state_dict().items()}
    state.update({f"ema_model.{k}": v for k, v in teacher.state_dict().items()})
    path = tmp_path_factory.mktemp("pth") / "iter_40000.pth"
    torch.save({"state_dict": state, "meta": {"iter": 40000}}, path)
    with torch.no_grad():
        logits, feature = student(images)
    return path, images.numpy().transpose(0, 2, 3, 1), logits.numpy(), feature.numpy()


def test_convert_then_load_gives_torch_outputs(ddb_checkpoint, tmp_path):
    path, images, ref_logits, ref_feature = ddb_checkpoint
    out = tmp_path / "model"
    assert convert_checkpoint.main([str(path), str(out), "--backbone=resnet18_v1c"]) == 0
    variables, model_cfg = checkpoints.load_model_dir(str(out))
    _, provenance = checkpoints.read_model_config(str(out))
    assert provenance["prefix"] == "model" and provenance["kind"] == "segmentor"
    logits, feature = models.build_model(model_cfg).apply(variables, images, train=False)
    logits = np.asarray(logits).transpose(0, 3, 1, 2)
    scale = np.abs(ref_logits).max()
    assert np.abs(logits - ref_logits).max() <= 1e-4 * scale
    assert np.abs(np.asarray(feature).transpose(0, 3, 1, 2) - ref_feature).max() <= 1e-4 * scale
    assert np.mean(logits.argmax(1) == ref_logits.argmax(1)) >= 0.999


def test_which_picks_the_teacher(ddb_checkpoint, tmp_path):
    path = ddb_checkpoint[0]
    out_student, out_teacher = tmp_path / "s", tmp_path / "t"
    assert convert_checkpoint.main([str(path), str(out_student), "--backbone=resnet18_v1c"]) == 0
    args = [str(path), str(out_teacher), "--backbone=resnet18_v1c", "--which=ema_model"]
    assert convert_checkpoint.main(args) == 0
    student, _ = checkpoints.load_model_dir(str(out_student))
    teacher, _ = checkpoints.load_model_dir(str(out_teacher))
    kernel = ("params", "decode_head", "conv_seg", "kernel")
    get = lambda tree: tree[kernel[0]][kernel[1]][kernel[2]][kernel[3]]
    assert not np.allclose(get(student), get(teacher))


def test_imagenet_backbone_converts_backbone_only(tmp_path):
    backbone = randomize(Segmentor(18), seed=4).backbone
    state = dict(backbone.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18_v1c.pth"
    torch.save(state, path)
    out = tmp_path / "imagenet"
    assert convert_checkpoint.main([str(path), str(out), "--backbone=resnet18_v1c"]) == 0
    variables, _ = checkpoints.load_model_dir(str(out))
    assert set(variables["params"]) == {"backbone"}
    np.testing.assert_allclose(
        variables["params"]["backbone"]["stem_0"]["kernel"],
        state["stem.0.weight"].numpy().transpose(2, 3, 1, 0),
    )


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("truncated", "not a readable PyTorch checkpoint"),
        ("not_a_checkpoint", "not a state dict"),
        ("wrong_depth", "does not fit the model"),
        ("missing_prefix", "has no model 'ca_model'"),
        ("unknown_backbone", "resnet77_v1c"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(ddb_checkpoint, tmp_path, capsys, case, needle):
    path = ddb_checkpoint[0]
    args = ["--backbone=resnet18_v1c"]
    if case == "truncated":
        data = open(path, "rb").read()
        path = tmp_path / "truncated.pth"
        path.write_bytes(data[: len(data) // 2])
    elif case == "not_a_checkpoint":
        path = tmp_path / "list.pth"
        torch.save([1, 2, 3], path)
    elif case == "wrong_depth":
        args = ["--backbone=resnet34_v1c"]
    elif case == "missing_prefix":
        args.append("--which=ca_model")
    elif case == "unknown_backbone":
        args = ["--backbone=resnet77_v1c"]
    out = tmp_path / "out"
    assert convert_checkpoint.main([str(path), str(out), *args]) == 1
    err = capsys.readouterr().err
    assert needle in err
    if case == "wrong_depth":
        assert "missing keys" in err and "backbone.layer1.2.conv1.weight" in err
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp")]
