"""The demo's pictures: the predictions grid (layout, the image, its ground truth and each
stage's prediction in place, stages without a model left out) and the mIoU bars (lengths,
colours, the shaded source-only -> oracle gap)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from configs import demo
from ddb_jax import checkpoints, models
from ddb_jax.demo import pictures
from ddb_jax.inference import label_images
from ddb_jax.inference.batching import predict_images
from ddb_jax.inference.predictor import Predictor, load_model
from tests.support import TINY, set_keys

VAL = os.path.join("toy", "cityscapes", "leftImg8bit", "val", "toycity")
LABELS = os.path.join("toy", "cityscapes", "gtFine", "val", "toycity")
SUMMARY = {
    "targets": ["toy_target"],
    "stages": {
        "source_only": {"stage": "supervised", "steps": 4, "toy_target": 0.30, "miou": 0.30},
        "oracle": {"stage": "supervised", "steps": 4, "toy_target": 0.50, "miou": 0.50},
        "r1_cu": {"stage": "self_training", "steps": 4, "toy_target": 0.45, "miou": 0.45},
        "r1_ca": {"stage": "self_training", "steps": 4, "toy_target": None, "miou": None},
        "r2_ckd": {"stage": "ckd", "steps": 4, "toy_target": 0.463, "miou": 0.463},
    },
}


def save_tiny_model(out: str, config, seed: int) -> None:
    variables = jax.device_get(
        models.init_variables(models.build_model(config.model), jax.random.PRNGKey(seed))
    )
    conv_seg = variables["params"]["decode_head"]["conv_seg"]
    conv_seg["kernel"] = conv_seg["kernel"] * 50.0  # several classes predicted (test_eval_stage)
    conv_seg["bias"] = conv_seg["bias"] * 0.0
    checkpoints.save_model_dir(out, variables, config.model)


@pytest.fixture(scope="module")
def workdir(toy_root, tmp_path_factory) -> str:
    """A pipeline workdir as the demo leaves it (pipeline.json, summary.json, stages'
    export/), with tiny random models; r1_ca has no export."""
    config = set_keys(demo.get_config("4"), {**TINY, "data.root": str(toy_root)})
    root = str(tmp_path_factory.mktemp("demo"))
    with open(os.path.join(root, "pipeline.json"), "w") as f:
        json.dump(json.loads(json.dumps(config.to_dict(), default=list)), f)
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(SUMMARY, f)
    save_tiny_model(os.path.join(root, "source_only", "export"), config, seed=1)
    save_tiny_model(os.path.join(root, "r1_cu", "export"), config, seed=2)
    shutil.copytree(os.path.join(root, "r1_cu", "export"), os.path.join(root, "r2_ckd", "export"))
    return root


def panel(picture: np.ndarray, grid: pictures.Grid, row: int, column: int) -> np.ndarray:
    x, y = grid.origin(row, column)
    h, w = grid.panel
    return picture[y : y + h, x : x + w]


def test_predictions_grid_holds_image_truth_and_each_stage(workdir, toy_root):
    written = pictures.write_demo_pictures(workdir)
    assert written == [os.path.join(workdir, "predictions.png"), os.path.join(workdir, "miou.png")]
    picture = np.asarray(Image.open(written[0]))
    # 3 rows of 128x256 toy images; image | ground truth | source-only | r1_cu | r2_ckd.
    grid = pictures.Grid(rows=3, columns=5, panel=(128, 256))
    assert picture.shape == (grid.size[1], grid.size[0], 3)
    names = sorted(os.listdir(toy_root / VAL))[:3]
    models_ = {s: os.path.join(workdir, s, "export") for s in ("source_only", "r1_cu", "r2_ckd")}
    predictors = {
        stage: Predictor.from_model(*load_model(path)[:2]) for stage, path in models_.items()
    }
    for row, name in enumerate(names):
        image = np.asarray(Image.open(toy_root / VAL / name))
        label = np.asarray(Image.open(toy_root / LABELS / name.replace(
            "leftImg8bit", "gtFine_labelTrainIds")))  # fmt: skip
        np.testing.assert_array_equal(panel(picture, grid, row, 0), image)
        np.testing.assert_array_equal(panel(picture, grid, row, 1), label_images.colorize(label))
        for column, stage in enumerate(("source_only", "r1_cu", "r2_ckd"), start=2):
            ids = predict_images(predictors[stage], [image])[0]
            assert len(np.unique(ids)) > 1
            np.testing.assert_array_equal(
                panel(picture, grid, row, column), label_images.colorize(ids), err_msg=stage
            )
    # r1_cu and r2_ckd share a model, source-only does not.
    assert np.array_equal(panel(picture, grid, 0, 3), panel(picture, grid, 0, 4))
    assert not np.array_equal(panel(picture, grid, 0, 2), panel(picture, grid, 0, 3))
    # A title over every column, nothing but background between the columns' titles.
    header = picture[: grid.header]
    for column in range(5):
        x, _ = grid.origin(0, column)
        assert (header[:, x : x + 256] < 128).any(), column
    assert (picture[:, : grid.gap] == 255).all()


def test_miou_bars_have_their_lengths_colours_and_the_gap_shaded():
    chart = pictures.MiouChart.from_summary(SUMMARY)
    assert chart.names == ("source_only", "oracle", "r1_cu", "r2_ckd")  # r1_ca: no result
    assert chart.axis_max == 60
    picture = np.asarray(chart.draw())
    assert picture.shape == (chart.size[1], chart.size[0], 3)
    colours = {"source_only": (200, 80, 70), "oracle": (70, 150, 80), "r1_cu": (60, 110, 190)}
    for row, (name, value) in enumerate(zip(chart.names, chart.values, strict=True)):
        x0, y0, x1, y1 = chart.bar_box(row)
        assert x1 - x0 + 1 == chart.x(value) - chart.x(0)
        middle = (y0 + y1) // 2
        bar = picture[middle, x0 + 1 : x1 + 1]
        assert (bar == colours.get(name, colours["r1_cu"])).all(), name
        # Just past the bar: the gap's shade between source-only and oracle, else paper.
        inside_gap = chart.x(30) <= x1 + 2 <= chart.x(50)
        assert tuple(picture[middle, x1 + 2]) == (
            pictures.GAP_SHADE if inside_gap else pictures.BACKGROUND
        ), name
    # The shaded band spans source-only (30) to oracle (50), above the bars too.
    y = chart.top - 2
    assert tuple(picture[y, (chart.x(30) + chart.x(50)) // 2]) == pictures.GAP_SHADE
    assert tuple(picture[y, chart.x(30) - 3]) == pictures.BACKGROUND
    assert tuple(picture[y, chart.x(50) + 3]) == pictures.BACKGROUND


def test_miou_chart_without_baselines_has_no_gap():
    summary = {"targets": ["t"], "stages": {"r1_cu": {"miou": 0.2}, "r1_ca": {"miou": 0.25}}}
    chart = pictures.MiouChart.from_summary(summary)
    assert chart.gap() is None and chart.axis_max == 30
    picture = np.asarray(chart.draw())
    assert not (picture == pictures.GAP_SHADE).all(axis=-1).any()


def test_small_copy_keeps_the_aspect_ratio(tmp_path):
    source = tmp_path / "big.png"
    Image.new("RGB", (1600, 400), (10, 20, 30)).save(source)
    pictures.small_copy(str(source), str(tmp_path / "small.png"), max_width=800)
    small = Image.open(tmp_path / "small.png")
    assert small.size == (800, 200) and small.getpixel((400, 100)) == (10, 20, 30)
