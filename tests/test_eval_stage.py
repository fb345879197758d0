"""Stage 'evaluate': tables and JSON written, colourised predictions that score the reported
mIoU when read back, and models of another class count or backbone-only files refused."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import eval_cityscapes
from ddb_jax import checkpoints, labels, models
from ddb_jax.evaluation import eval_stage, evaluate
from input_pipeline import evaluation, toy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "2", "--num-val", "3"])
    config = eval_cityscapes.get_config()
    config.data.root = str(root)
    config.data.target = ("toy_target",)
    config.model.backbone = "resnet18_v1c"
    config.model.base_channels = 8
    config.model.head_channels = 8
    model = models.build_model(config.model)
    variables = jax.device_get(models.init_variables(model, jax.random.PRNGKey(3)))
    # Spread the classifier so the random model predicts several classes (the reference's
    # init leaves the ASPP outputs tiny, so without this the bias alone picks one class).
    conv_seg = variables["params"]["decode_head"]["conv_seg"]
    conv_seg["kernel"] = conv_seg["kernel"] * 50.0
    conv_seg["bias"] = conv_seg["bias"] * 0.0
    model_dir = str(root / "model")
    checkpoints.save_model_dir(model_dir, variables, config.model)
    config.checkpoint = model_dir
    return config


def test_tables_json_and_predictions_that_score_the_reported_miou(setup, tmp_path):
    config = ml_collections.ConfigDict(setup.to_dict())
    config.eval.save_predictions = True
    summary = eval_stage.run(config, str(tmp_path))
    assert os.path.exists(tmp_path / "eval_toy_target.md")
    with open(tmp_path / "eval_results.json") as f:
        assert json.load(f)["toy_target"]["miou"] == pytest.approx(summary["toy_target"]["miou"])
    # Read the PNGs back into train ids (palette lookup) and score them against the labels.
    code = np.array([65536, 256, 1])
    colours = {int(c @ code): i for i, c in enumerate(labels.CITYSCAPES_PALETTE.astype(int))}
    confusion = np.zeros((19, 19), np.int64)
    batches = list(evaluation.make_eval_dataset(config.data, "toy_target").as_numpy_iterator())
    assert len(os.listdir(tmp_path / "predictions" / "toy_target")) == len(batches) == 3
    predicted_classes = set()
    for batch in batches:
        name = os.path.splitext(batch["name"][0].decode())[0]
        rgb = np.asarray(Image.open(tmp_path / "predictions" / "toy_target" / f"{name}.png"))
        assert rgb.shape[:2] == batch["label"].shape[1:]
        ids = np.vectorize(colours.__getitem__)(rgb.astype(int) @ code)
        predicted_classes |= set(np.unique(ids))
        confusion += np.asarray(evaluate.confusion_matrix(ids[None], batch["label"], 19))
    assert len(predicted_classes) > 1  # the check is not about a constant map
    assert evaluate.iou_from_confusion(confusion)["miou"] == pytest.approx(
        summary["toy_target"]["miou"], abs=1e-9
    )


def test_other_class_count_and_backbone_only_are_refused(setup, tmp_path):
    config = ml_collections.ConfigDict(setup.to_dict())
    config.model.num_classes = 16
    with pytest.raises(checkpoints.CheckpointError, match="predicts 19 classes.*16"):
        eval_stage.run(config, str(tmp_path / "a"))
    variables, model_cfg = checkpoints.load_model_dir(setup.checkpoint)
    backbone_only = str(tmp_path / "backbone")
    checkpoints.save_model_dir(
        backbone_only, {"params": {"backbone": variables["params"]["backbone"]}}, model_cfg
    )
    config = ml_collections.ConfigDict(setup.to_dict())
    config.checkpoint = backbone_only
    with pytest.raises(checkpoints.CheckpointError, match="only a backbone"):
        eval_stage.run(config, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
