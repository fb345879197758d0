"""SYNTHIA -> Cityscapes and Synscapes -> Cityscapes: the setting files, the toy SYNTHIA- and
Synscapes-like sources through the real converters, and both pipelines end to end on the toy
data (those in make test-pipelines, after the demo pipeline's).

The end-to-end runs use the tiny settings of tests/test_demo_pipeline.py's ``tiny_pipeline``
unchanged (checked below: only the data names and the extra mIoUs differ), so their compiled
programs are the demo test's and come from the session's compilation cache. One round each:
round 2 only rewires ``init_from`` to r1_ckd's student, which the demo test covers, and its
tenth of the learning rate would be new programs to compile.
"""

from __future__ import annotations

import importlib
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from configs import gta2cs, syns2cs, syns2cs_ddb, synthia2cs, synthia2cs_ddb
from ddb_jax import checkpoints, labels, pipeline
from ddb_jax.evaluation import eval_stage
from ddb_jax.graph import stage_graph
from ddb_jax.offline import prototype_io
from ddb_jax.train import workdir as workdir_lib
from input_pipeline import datasets, toy
from tests.support import set_keys, tiny_pipeline

SETTINGS = {"synthia2cs": (synthia2cs, synthia2cs_ddb), "syns2cs": (syns2cs, syns2cs_ddb)}
STAGES = ["r1_cu", "r1_ca", "r1_proto_cu", "r1_proto_ca", "r1_ckd"]
TOY_NAMES = {"synthia": "toy_synthia", "synscapes": "toy_synscapes", "cityscapes": "toy_target"}
# What a setting's tiny pipeline may change in the demo test's stage configs: none of it is
# part of a compiled program (same image sizes, same 19 outputs).
OWN_KEYS = ("data.source", "data.target", "eval.miou_protocols")
# SYNTHIA-RAND-CITYSCAPES README class ids -> train ids, as the reference's converter maps them.
SYNTHIA_README = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
    8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip


def flat(config) -> dict:
    return workdir_lib.flatten(workdir_lib.config_as_json(config))


def differing_keys(a, b) -> set[str]:
    fa, fb = flat(a), flat(b)
    return {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}


# --- the setting files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SETTINGS)
def test_pipeline_and_per_stage_files_are_the_settings_configs(name):
    setting, ddb = SETTINGS[name]
    assert ddb.get_config().to_dict() == setting.get_config().to_dict()
    for n in (1, 2):
        for path in ("cu", "ca", "ckd"):
            stage = f"r{n}_{path}"
            module = importlib.import_module(f"configs.{name}_{stage}")
            config = module.get_config()
            assert config.to_dict() == setting.get_config(stage).to_dict()
    ckd = importlib.import_module(f"configs.{name}_r2_ckd").get_config()
    assert ckd.ckd.teacher_cu == f"runs/{name}/r2_cu/export"


def test_synthia_setting_is_the_gta_recipe_on_synthia_with_the_extra_mious():
    config = synthia2cs.get_config("r1_cu")
    assert differing_keys(config, gta2cs.get_config("r1_cu")) == {
        "data.source", "eval.miou_protocols",
    }  # fmt: skip
    assert config.data.source == ("synthia",) and config.data.target == ("cityscapes",)
    assert config.eval.miou_protocols == ("synthia16", "synthia13", "categories7")
    assert config.model.backbone == "resnet101_v1c" and config.model.num_classes == 19
    assert datasets.dataset_spec("synthia").train_scale == (1280, 760)  # DAFormer's SYNTHIA


def test_synscapes_setting_is_the_gta_recipe_on_synscapes():
    config = syns2cs.get_config("r1_ckd")
    assert differing_keys(config, gta2cs.get_config("r1_ckd")) == {
        "data.source",
        "ckd.teacher_cu",
        "ckd.teacher_ca",
        "ckd.prototypes_cu",
        "ckd.prototypes_ca",
    }  # fmt: skip  (the inputs: runs/syns2cs/... instead of runs/gta2cs/...)
    assert config.data.source == ("synscapes",) and config.eval.miou_protocols == ()
    assert config.data.photometric_distortion  # the reference's ckd_syns2city data config
    assert datasets.dataset_spec("synscapes").train_scale == (1280, 720)


# --- the toy sources --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extra_root(tmp_path_factory):
    """The toy domains with the SYNTHIA- and Synscapes-like sources; as many images as the
    session's toy_root (tests/conftest.py), whose files the base domains repeat."""
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "12", "--num-val", "5",
              "--extra-sources", "synthia,synscapes"])  # fmt: skip
    return root


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_extra_sources_leave_the_base_domains_unchanged(extra_root, toy_root):
    for name in ("gta/images/00007.png", "cityscapes/gtFine/val/toycity/toycity_000004_000019"
                 "_gtFine_labelTrainIds.png"):  # fmt: skip
        assert (extra_root / "toy" / name).read_bytes() == (toy_root / "toy" / name).read_bytes()


def test_toy_synthia_round_trips_through_the_converter(extra_root):
    """The raw labels read as the reference reads them (OpenCV, 16 bits, the red channel) and
    mapped by SYNTHIA's README table are the train ids tools/convert_datasets/synthia.py wrote."""
    files = datasets.list_files(str(extra_root), "toy_synthia")
    assert len(files) == 12
    present, instances = set(), 0
    for image_path, train_path in zip(files.images, files.labels, strict=True):
        raw = cv2.imread(train_path.replace("_labelTrainIds.png", ".png"), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and raw.shape == (128, 256, 3)
        ids = raw[..., 2]  # BGR: the red channel
        instances += int(raw[..., 1].max() > 0)  # instance ids the converter must skip
        expected = np.full(ids.shape, 255, np.uint8)
        for synthia_id, train_id in SYNTHIA_README.items():
            expected[ids == synthia_id] = train_id
        converted = read(train_path)
        np.testing.assert_array_equal(converted, expected)
        present |= set(np.unique(converted).tolist())
        # Image and label belong together: the road pixels' colour is nearest the road's.
        road = read(image_path)[converted == toy.ROAD].mean(0)
        palette = {c: np.abs(road - rgb).sum() for c, rgb in toy.SOURCE_PALETTE.items()}
        assert min(palette, key=palette.get) == toy.ROAD
    assert instances > 0
    assert not present & set(labels.SYNTHIA_ABSENT_CLASSES)  # terrain, truck, train
    assert {0, 1, 2, 8, 10, 13, 255} <= present  # toy terrain is SYNTHIA's void
    stats = json.loads((extra_root / "toy" / "synthia" / "sample_class_stats.json").read_text())
    assert len(stats) == 12 and all("9" not in s for s in stats)


def test_toy_synscapes_round_trips_through_the_converter(extra_root):
    files = datasets.list_files(str(extra_root), "toy_synscapes")
    assert len(files) == 12
    lut = labels.build_lut(labels.CITYSCAPES_ID_TO_TRAIN_ID, 256)
    for train_path in files.labels:
        raw = read(train_path.replace("_gt_labelTrainIds.png", ".png"))
        np.testing.assert_array_equal(read(train_path), lut[raw])
    assert (extra_root / "toy" / "synscapes" / "samples_with_class.json").exists()


def test_unknown_extra_source_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"unknown toy sources \['gta5'\]"):
        toy.generate(str(tmp_path / "toy"), num_train=1, num_val=1, extra_sources=("gta5",))
    assert not (tmp_path / "toy").exists()


# --- both settings end to end -----------------------------------------------------------------


def tiny_setting(ddb_module, root):
    """``ddb_module``'s pipeline with tiny_pipeline's keys (model, crops, batch, steps), its
    datasets replaced by the toy ones, one round."""
    config = ddb_module.get_config()
    for key, value in stage_graph.set_leaves(tiny_pipeline(root)):
        if key.split(".")[0] not in stage_graph.PIPELINE_KEYS and key not in OWN_KEYS:
            set_keys(config, {key: value})
    config.data.source = tuple(TOY_NAMES[n] for n in config.data.source)
    config.data.target = tuple(TOY_NAMES[n] for n in config.data.target)
    config.rounds = 1
    return config


def test_tiny_settings_compile_the_demo_tests_programs(extra_root, tmp_path):
    workdir = str(tmp_path)
    demo = {p.name: p.config for p in pipeline.plan_stages(tiny_pipeline(extra_root), workdir)}
    for _, ddb in SETTINGS.values():
        plan = pipeline.plan_stages(tiny_setting(ddb, extra_root), workdir)
        assert [p.name for p in plan] == STAGES
        for planned in plan:
            assert differing_keys(planned.config, demo[planned.name]) <= set(OWN_KEYS), planned.name


@pytest.fixture(scope="module")
def runs(extra_root, tmp_path_factory):
    """{setting: (workdir, summary)} of both pipelines run on the toy data."""
    out = {}
    for name, (_, ddb) in SETTINGS.items():
        workdir = str(tmp_path_factory.mktemp(name))
        out[name] = (workdir, pipeline.run(tiny_setting(ddb, extra_root), workdir))
    return out


@pytest.mark.pipelines
@pytest.mark.parametrize("name", SETTINGS)
def test_every_stage_delivers(runs, name):
    workdir, summary = runs[name]
    for stage in STAGES:
        if "proto" in stage:
            table, counts = prototype_io.load_prototypes(
                os.path.join(workdir, stage, "prototypes.npz"), 19, 8
            )
            assert counts.sum() > 0 and np.all(np.isfinite(table))
            continue
        _, model_cfg = checkpoints.load_model_dir(os.path.join(workdir, stage, "export"))
        assert model_cfg.base_channels == 8 and model_cfg.num_classes == 19
        result = json.loads(open(os.path.join(workdir, stage, "result.json")).read())
        assert result["step"] == 2 and 0.0 <= result["toy_target"] <= 1.0
        stored = json.loads(open(os.path.join(workdir, stage, "config.json")).read())
        source = SETTINGS[name][0].setting().data.source
        assert stored["data"]["source"] == [TOY_NAMES[n] for n in source]
    assert list(summary["stages"]) == ["r1_cu", "r1_ca", "r1_ckd"]
    assert os.path.exists(os.path.join(workdir, "summary.md"))
    assert ("extra_columns" in summary) == (name == "synthia2cs")


def scalar_tags(stage_dir) -> set[str]:
    import tensorflow as tf

    tags = set()
    for name in os.listdir(stage_dir):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(stage_dir, name)):
                tags |= {value.tag for value in event.summary.value}
    return tags


@pytest.mark.pipelines
def test_synthia_results_summary_and_tensorboard_have_the_extra_mious(runs):
    workdir, summary = runs["synthia2cs"]
    columns = [f"toy_target/{p}" for p in synthia2cs.MIOU_PROTOCOLS]
    assert summary["extra_columns"] == columns
    for stage in ("r1_cu", "r1_ca", "r1_ckd"):
        result = json.loads(open(os.path.join(workdir, stage, "result.json")).read())
        assert all(0.0 <= result[c] <= 1.0 for c in columns), result
        assert set(columns) <= scalar_tags(os.path.join(workdir, stage))
    table = open(os.path.join(workdir, "summary.md")).read()
    assert "| toy_target mIoU | toy_target mIoU16 | toy_target mIoU13 | toy_target mIoU7 |" in table
    assert " - " not in table


@pytest.mark.pipelines
def test_evaluate_stage_reports_the_extra_mious(runs, extra_root, tmp_path):
    """Stage 'evaluate' on the SYNTHIA setting's r1_ckd student: the 19-class mIoU that its
    training stage reported, mIoU16 / mIoU13 over the same per-class IoUs, the 7 categories."""
    workdir, _ = runs["synthia2cs"]
    plan = pipeline.plan_stages(tiny_setting(synthia2cs_ddb, extra_root), workdir)
    config = next(p.config for p in plan if p.name == "r1_ckd")
    config.stage = "evaluate"
    config.checkpoint = os.path.join(workdir, "r1_ckd", "export")
    summary = eval_stage.run(config, str(tmp_path))
    trained = json.loads(open(os.path.join(workdir, "r1_ckd", "result.json")).read())
    target = json.loads((tmp_path / "eval_results.json").read_text())["toy_target"]
    assert target["miou"] == pytest.approx(summary["toy_target"]["miou"])
    assert target["miou"] == pytest.approx(trained["toy_target"])
    for protocol, classes in (("synthia16", labels.SYNTHIA_16_CLASSES),
                              ("synthia13", labels.SYNTHIA_13_CLASSES)):  # fmt: skip
        ious = [target["iou"][labels.CITYSCAPES_CLASSES[c]] for c in classes]
        assert target["protocols"][protocol]["miou"] == pytest.approx(np.nanmean(ious))
    categories = target["protocols"]["categories7"]
    assert list(categories["iou"]) == list(labels.CITYSCAPES_CATEGORIES)
    assert 0.0 <= categories["miou"] <= 1.0
    table = (tmp_path / "eval_toy_target.md").read_text()
    assert "| **mIoU16** (synthia16) |" in table and "| categories7 | IoU |" in table
