"""The extra mIoUs of a setting (SYNTHIA's 16 / 13 classes, the 7 Cityscapes categories): the
tables against the published ones, every number of a hand-made confusion matrix worked out by
hand, and where they appear (eval tables, eval_results.json, the pipeline summary). No model
runs here; tests/test_synthia_settings.py runs the settings end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import demo, synthia2cs
from ddb_jax import labels, pipeline
from ddb_jax.evaluation import eval_stage, evaluate

# cityscapesScripts helpers/labels.py: (name, category) of the 19 classes with a train id.
CITYSCAPES_SCRIPTS_CATEGORY = {
    "road": "flat", "sidewalk": "flat", "building": "construction", "wall": "construction",
    "fence": "construction", "pole": "object", "traffic light": "object",
    "traffic sign": "object", "vegetation": "nature", "terrain": "nature", "sky": "sky",
    "person": "human", "rider": "human", "car": "vehicle", "truck": "vehicle", "bus": "vehicle",
    "train": "vehicle", "motorcycle": "vehicle", "bicycle": "vehicle",
}  # fmt: skip


def names(train_ids) -> set[str]:
    return {labels.CITYSCAPES_CLASSES[c] for c in train_ids}


def test_synthia_subsets_are_the_published_ones():
    # synthia_set_16 / synthia_set_13 of the UDA evaluation code (e.g. MaxSquareLoss).
    assert labels.SYNTHIA_16_CLASSES == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert labels.SYNTHIA_13_CLASSES == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    all_classes = set(labels.CITYSCAPES_CLASSES)
    assert all_classes - names(labels.SYNTHIA_16_CLASSES) == {"terrain", "truck", "train"}
    assert names(labels.SYNTHIA_16_CLASSES) - names(labels.SYNTHIA_13_CLASSES) == {
        "wall", "fence", "pole",
    }  # fmt: skip


def test_synthia_never_yields_the_three_absent_classes():
    """The SYNTHIA ids of terrain, truck and train are the ones the reference's converter marks
    'not present in synthia' (16, 18, 20); every other train id comes from one SYNTHIA id."""
    synthia_id = labels.TRAIN_ID_TO_SYNTHIA_ID
    absent = labels.SYNTHIA_ABSENT_CLASSES
    assert names(absent) == {"terrain", "truck", "train"}
    assert sorted(synthia_id[c] for c in absent) == [16, 18, 20]
    assert len(synthia_id) == len(labels.SYNTHIA_ID_TO_TRAIN_ID) == labels.NUM_CLASSES
    assert set(labels.SYNTHIA_16_CLASSES) == set(synthia_id) - set(absent)


def test_every_train_id_has_exactly_one_category_as_in_cityscapes_scripts():
    assert len(labels.TRAIN_ID_TO_CATEGORY) == labels.NUM_CLASSES
    categories = [labels.CITYSCAPES_CATEGORIES[g] for g in labels.TRAIN_ID_TO_CATEGORY]
    assert dict(zip(labels.CITYSCAPES_CLASSES, categories, strict=True)) == (
        CITYSCAPES_SCRIPTS_CATEGORY
    )
    assert set(categories) == set(labels.CITYSCAPES_CATEGORIES)  # none empty, 'void' not one
    assert len(labels.CITYSCAPES_CATEGORIES) == 7


def hand_made_confusion() -> np.ndarray:
    """8 correct pixels of every class SYNTHIA has; the model never predicts the three absent
    classes (terrain -> vegetation, truck -> car, train -> bus) and confuses wall -> building
    (within a category) and person -> pole (across categories)."""
    c = np.zeros((19, 19), np.int64)
    for k in labels.SYNTHIA_16_CLASSES:
        c[k, k] = 8
    c[9, 8] = 8  # terrain -> vegetation
    c[14, 13] = 4  # truck -> car
    c[16, 15] = 4  # train -> bus
    c[3, 2] = 8  # wall -> building
    c[11, 5] = 8  # person -> pole
    return c


# Per-class IoU of hand_made_confusion, worked out by hand: TP / (label + prediction - TP).
HAND_IOU = {
    0: 1, 1: 1, 2: 8 / 16, 3: 8 / 16, 4: 1, 5: 8 / 16, 6: 1, 7: 1, 8: 8 / 16, 9: 0,
    10: 1, 11: 8 / 16, 12: 1, 13: 8 / 12, 14: 0, 15: 8 / 12, 16: 0, 17: 1, 18: 1,
}  # fmt: skip
HAND_SUM = 9 * 1 + 5 * 0.5 + 2 * (2 / 3)  # the 19 IoUs summed (three of them 0)


def test_hand_made_matrix_per_class_and_19_class_miou():
    result = evaluate.iou_from_confusion(hand_made_confusion())
    np.testing.assert_allclose(result["iou"], [HAND_IOU[k] for k in range(19)])
    assert result["miou"] == pytest.approx(HAND_SUM / 19)


def test_hand_made_matrix_16_13_and_7_class_mious():
    scores = evaluate.protocol_scores(
        hand_made_confusion(), ("synthia16", "synthia13", "categories7")
    )
    # 16: the three absent classes (IoU 0) left out; DAFormer's mIoU19 * 19 / 16.
    assert scores["synthia16"]["miou"] == pytest.approx(HAND_SUM / 16)
    mean19 = evaluate.iou_from_confusion(hand_made_confusion())["miou"]
    assert scores["synthia16"]["miou"] == pytest.approx(mean19 * 19 / 16)
    # 13: also without wall (1/2), fence (1) and pole (1/2).
    assert scores["synthia13"]["miou"] == pytest.approx((HAND_SUM - 2) / 13)
    assert list(scores["synthia13"]["iou"]) == [
        labels.CITYSCAPES_CLASSES[k] for k in labels.SYNTHIA_13_CLASSES
    ]
    # 7 categories: confusions inside a category are correct; person -> pole is not:
    # object = 24 / (24 + 32 - 24), human = 16 / (24 + 16 - 16), the other five are 1.
    iou7 = scores["categories7"]["iou"]
    assert iou7 == pytest.approx(
        {
            "flat": 1,
            "construction": 1,
            "object": 0.75,
            "nature": 1,
            "sky": 1,
            "human": 2 / 3,
            "vehicle": 1,
        }  # fmt: skip
    )
    assert scores["categories7"]["miou"] == pytest.approx((5 + 0.75 + 2 / 3) / 7)
    assert [s["title"] for s in scores.values()] == ["mIoU16", "mIoU13", "mIoU7"]


def test_merged_confusion_keeps_every_pixel():
    confusion = hand_made_confusion()
    merged = evaluate.merge_confusion(confusion, labels.TRAIN_ID_TO_CATEGORY, 7)
    assert merged.sum() == confusion.sum()
    assert merged[5, 2] == 8  # human labelled, object predicted: the person -> pole pixels
    assert merged[3, 3] == 8 + 8  # nature: vegetation, terrain -> vegetation


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_the_mean():
    confusion = hand_made_confusion()
    confusion[17, 17] = 0  # no motorcycle anywhere: NaN, as mmseg
    scores = evaluate.protocol_scores(confusion, ("synthia16",))
    assert np.isnan(scores["synthia16"]["iou"]["motorcycle"])
    assert scores["synthia16"]["miou"] == pytest.approx((HAND_SUM - 1) / 15)
    empty = evaluate.protocol_scores(np.zeros((19, 19), np.int64), ("categories7",))
    assert np.isnan(empty["categories7"]["miou"])
    # 'categories7_merged' is its name now; the old one stays an alias of the same protocol.
    renamed = evaluate.protocol_scores(hand_made_confusion(), ("categories7_merged",))
    assert renamed["categories7_merged"]["miou"] == pytest.approx((5 + 0.75 + 2 / 3) / 7)


def test_unknown_protocol_and_other_class_counts_fail_by_name():
    with pytest.raises(ValueError, match=r"unknown 'synthia7'.*categories7"):
        evaluate.protocol_scores(hand_made_confusion(), ("synthia7",))
    with pytest.raises(ValueError, match="needs the 19 Cityscapes classes; .* has 18"):
        evaluate.protocol_scores(np.ones((18, 18), np.int64), ("synthia16",))


def results_of(confusion, protocols) -> dict:
    result = evaluate.iou_from_confusion(confusion)
    result["confusion"] = confusion
    result["protocols"] = evaluate.protocol_scores(confusion, protocols)
    return {"cityscapes": result}


def test_eval_table_and_json_add_the_extra_mious_only_when_asked():
    plain = results_of(hand_made_confusion(), ())
    table = evaluate.format_iou_table(plain["cityscapes"], title="t")
    assert "mIoU16" not in table and "flat" not in table
    assert eval_stage.summarize(plain)["cityscapes"].keys() == {"miou", "aacc", "iou"}
    assert evaluate.protocol_scalars(plain) == {}

    extra = results_of(hand_made_confusion(), synthia2cs.MIOU_PROTOCOLS)
    table = evaluate.format_iou_table(extra["cityscapes"], title="t")
    assert f"| **mIoU16** (synthia16) | **{100 * HAND_SUM / 16:.2f}** | |" in table
    assert f"| **mIoU13** (synthia13) | **{100 * (HAND_SUM - 2) / 13:.2f}** | |" in table
    assert "| categories7 | IoU |" in table and "| human | 66.67 |" in table
    summary = eval_stage.summarize(extra)
    assert summary["cityscapes"]["protocols"]["synthia13"]["miou"] == pytest.approx(
        (HAND_SUM - 2) / 13
    )
    assert json.loads(json.dumps(summary)) == summary  # JSON as written
    assert evaluate.protocol_scalars(extra) == pytest.approx(
        {
            "cityscapes/synthia16": HAND_SUM / 16,
            "cityscapes/synthia13": (HAND_SUM - 2) / 13,
            "cityscapes/categories7": (5 + 0.75 + 2 / 3) / 7,
        }  # fmt: skip
    )


def write_results(plan, workdir, extra: dict) -> None:
    """A result.json per training stage as a stage writes it (mIoU 0.5, extras as given)."""
    for planned in plan:
        if planned.config.stage == "prototypes":
            continue
        os.makedirs(planned.dir)
        with open(os.path.join(planned.dir, "result.json"), "w") as f:
            json.dump({"step": 2, "toy_target": 0.5, "miou": 0.5, **extra}, f)


def test_pipeline_summary_has_a_column_per_extra_miou(tmp_path):
    config = demo.get_config("2")
    config.rounds = 1
    config.baselines = ()
    config.eval.miou_protocols = synthia2cs.MIOU_PROTOCOLS
    workdir = str(tmp_path / "with")
    plan = pipeline.plan_stages(config, workdir)
    write_results(plan, workdir, {"toy_target/synthia16": 0.6, "toy_target/categories7": 0.8})
    summary = pipeline.summarize(plan)
    columns = ["toy_target/synthia16", "toy_target/synthia13", "toy_target/categories7"]
    assert summary["extra_columns"] == columns
    assert summary["stages"]["r1_ckd"]["toy_target/synthia16"] == 0.6
    table = pipeline.format_summary(summary)
    header = "| stage | kind | steps | toy_target mIoU | toy_target mIoU16 | toy_target mIoU13 | "
    assert table.startswith(header + "toy_target mIoU7 |")
    assert "| r1_ckd | ckd | 2 | 50.00 | 60.00 | - | 80.00 |" in table  # '-': not in result


def test_pipeline_summary_without_extra_mious_is_unchanged(tmp_path):
    config = demo.get_config("2")
    config.rounds = 1
    workdir = str(tmp_path / "without")
    plan = pipeline.plan_stages(config, workdir)
    write_results(plan, workdir, {})
    summary = pipeline.summarize(plan)
    assert set(summary) == {"targets", "stages"}
    assert pipeline.format_summary(summary).splitlines()[0] == (
        "| stage | kind | steps | toy_target mIoU |"
    )
