"""The papers' 7-class label sets against the tables of their code, the converters'
--label-set files and what reads them (config.data.label_set)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import default
from ddb_jax import config_checks, label_sets, labels
from ddb_jax.evaluation import eval_stage, evaluate
from input_pipeline import datasets
from tests.support import save_gray, save_rgb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = 255

# --- The reference tables, transcribed as the references write them ------------------------
# valeoai/MTAF mtaf/dataset/gta5.py:19-37 (num_classes == 7).
MTAF_GTA5 = {7: 0, 8: 0, 11: 1, 12: 1, 13: 1, 17: 2, 19: 2, 20: 2, 21: 3, 22: 0, 23: 4,
             24: 5, 25: 5, 26: 6, 27: 6, 28: 6, 31: 6, 32: 6, 33: 6}  # fmt: skip
# valeoai/MTAF mtaf/dataset/cityscapes_list/info7class.json "label2train" (-1: the licence
# plate, which an 8-bit PNG stores as 255).
MTAF_CITYSCAPES_LABEL2TRAIN = [
    [0, 255], [1, 255], [2, 255], [3, 255], [4, 255], [5, 255], [6, 255], [7, 0], [8, 0],
    [9, 255], [10, 255], [11, 1], [12, 1], [13, 1], [14, 255], [15, 255], [16, 255], [17, 2],
    [18, 255], [19, 2], [20, 2], [21, 3], [22, 3], [23, 4], [24, 5], [25, 5], [26, 6],
    [27, 6], [28, 6], [29, 6], [30, 6], [31, 6], [32, 6], [33, 6], [-1, 255],
]  # fmt: skip
# valeoai/MTAF mtaf/dataset/idd_list/info7class.json "label2train" (IDD's fine ids).
MTAF_IDD_LABEL2TRAIN = [
    [0, 0], [1, 255], [2, 0], [3, 0], [4, 255], [5, 255], [6, 5], [7, 255], [8, 5], [9, 6],
    [10, 6], [11, 6], [12, 6], [13, 6], [14, 6], [15, 6], [16, 6], [17, 6], [18, 6], [19, 1],
    [20, 1], [21, 1], [22, 255], [23, 2], [24, 2], [25, 2], [26, 2], [27, 255], [28, 255],
    [29, 1], [30, 255], [31, 255], [32, 3], [33, 4], [34, 255], [35, 255], [36, 255],
    [37, 255], [38, 255], [39, 255],
]  # fmt: skip
# valeoai/DADA dada/dataset/synthia.py:49-62 (num_classes == 7).
DADA_SYNTHIA = {1: 4, 2: 1, 3: 0, 4: 0, 5: 1, 6: 3, 7: 2, 8: 6, 9: 2, 10: 5, 11: 6, 15: 2,
                22: 0}  # fmt: skip
# valeoai/DADA dada/dataset/mapillary.py:9-82 (MAPILLARY_2_CITYSCAPES, COMMON_7CLASSES) =
# valeoai/MTAF mtaf/dataset/mapillary.py:17-91 (the same table).
COMMON_7CLASSES = {"flat": 0, "construction": 1, "object": 2, "nature": 3, "sky": 4,
                   "human": 5, "vehicle": 6, "other": 255}  # fmt: skip
MAPILLARY_2_CITYSCAPES = {
    "bird": "other", "ground animal": "other", "curb": "construction",
    "fence": "construction", "guard rail": "construction", "barrier": "construction",
    "wall": "construction", "bike lane": "flat", "crosswalk - plain": "flat",
    "curb cut": "flat", "parking": "flat", "pedestrian area": "flat", "rail track": "flat",
    "road": "flat", "service lane": "flat", "sidewalk": "flat", "bridge": "construction",
    "building": "construction", "tunnel": "construction", "person": "human",
    "bicyclist": "human", "motorcyclist": "human", "other rider": "human",
    "lane marking - crosswalk": "flat", "lane marking - general": "flat",
    "mountain": "other", "sand": "other", "sky": "sky", "snow": "other", "terrain": "flat",
    "vegetation": "nature", "water": "other", "banner": "other", "bench": "other",
    "bike rack": "other", "billboard": "other", "catch basin": "other",
    "cctv camera": "other", "fire hydrant": "other", "junction box": "other",
    "mailbox": "other", "manhole": "other", "phone booth": "other", "pothole": "object",
    "street light": "object", "pole": "object", "traffic sign frame": "object",
    "utility pole": "object", "traffic light": "object", "traffic sign (back)": "object",
    "traffic sign (front)": "object", "trash can": "other", "bicycle": "vehicle",
    "boat": "vehicle", "bus": "vehicle", "car": "vehicle", "caravan": "vehicle",
    "motorcycle": "vehicle", "on rails": "vehicle", "other vehicle": "vehicle",
    "trailer": "vehicle", "truck": "vehicle", "wheeled slow": "vehicle",
    "car mount": "other", "ego vehicle": "other", "unlabeled": "other",
}  # fmt: skip
# Mapillary Vistas v1.x config "readable" names (both references' config json), in order.
MAPILLARY_READABLE = [
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane",
    "Crosswalk - Plain", "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road",
    "Service Lane", "Sidewalk", "Bridge", "Building", "Tunnel", "Person", "Bicyclist",
    "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk", "Lane Marking - General",
    "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner", "Bench",
    "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box",
    "Mailbox", "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole",
    "Traffic Sign Frame", "Utility Pole", "Traffic Light", "Traffic Sign (Back)",
    "Traffic Sign (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan",
    "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow",
    "Car Mount", "Ego Vehicle", "Unlabeled",
]  # fmt: skip


def lut(name: str, layout: str, size: int) -> np.ndarray:
    return labels.build_lut(label_sets.raw_table(name, layout), size)


def expected_from_dict(table: dict[int, int], size: int) -> np.ndarray:
    return np.array([table.get(i, IGNORE) for i in range(size)], np.uint8)


def expected_from_label2train(pairs: list[list[int]], size: int) -> np.ndarray:
    out = np.full(size, IGNORE, np.uint8)
    for raw, cls in pairs:
        out[255 if raw == -1 else raw] = cls
    return out


@pytest.mark.parametrize(
    ("name", "layout", "expected"),
    [
        ("mtaf7", "gta", expected_from_dict(MTAF_GTA5, 256)),
        ("mtaf7", "cityscapes", expected_from_label2train(MTAF_CITYSCAPES_LABEL2TRAIN, 256)),
        ("mtaf7", "idd", expected_from_label2train(MTAF_IDD_LABEL2TRAIN, 256)),
        ("dada7", "synthia", expected_from_dict(DADA_SYNTHIA, 256)),
        # DADA has no 7-class Cityscapes table; the set uses MTAF's (label_sets.py).
        ("dada7", "cityscapes", expected_from_label2train(MTAF_CITYSCAPES_LABEL2TRAIN, 256)),
    ],
)
def test_every_raw_id_maps_as_the_reference(name, layout, expected):
    np.testing.assert_array_equal(lut(name, layout, 256), expected)


@pytest.mark.parametrize("name", ["mtaf7", "dada7"])
def test_mapillary_names_map_as_the_reference(name):
    table = label_sets.mapillary_table(name, MAPILLARY_READABLE)
    expected = [COMMON_7CLASSES[MAPILLARY_2_CITYSCAPES[n.lower()]] for n in MAPILLARY_READABLE]
    np.testing.assert_array_equal(table, expected)
    with pytest.raises(label_sets.LabelSetError, match="not in its table"):
        label_sets.mapillary_table(name, [*MAPILLARY_READABLE, "Temporary Barrier"])


def test_the_quirks_the_papers_tables_hold():
    flat, construction, nature = 0, 1, 3
    synthia = label_sets.raw_table("dada7", "synthia")
    assert synthia[22] == flat  # lane marking
    assert all(raw not in synthia for raw in (21, 12, 17, 19))  # wall, motorcycle, rider, bus
    mapillary = label_sets.MAPILLARY_7
    assert mapillary["terrain"] == flat
    assert mapillary["curb"] == mapillary["barrier"] == construction
    assert label_sets.raw_table("mtaf7", "gta")[22] == flat  # GTA5's terrain
    assert label_sets.raw_table("mtaf7", "cityscapes")[22] == nature  # Cityscapes' terrain
    # Neither is the 19-class merge: its categories put terrain in nature, rider in human.
    merged = labels.MIOU_PROTOCOLS["categories7_merged"]
    assert merged.group_of[9] == nature and merged.group_of[12] == 5


def test_names_palettes_and_errors():
    for name, s in label_sets.LABEL_SETS.items():
        assert s.name == name and s.num_classes == 7 == len(s.palette)
        assert label_sets.class_names(name) == label_sets.SEVEN_CLASSES
        assert label_sets.palette_256(name)[6].tolist() == [0, 0, 142]
    assert label_sets.class_names("") == labels.CITYSCAPES_CLASSES
    assert label_sets.label_suffix("mtaf7") == "_mtaf7" and label_sets.label_suffix("") == ""
    with pytest.raises(label_sets.LabelSetError, match="unknown label set 'x'"):
        label_sets.label_set("x")
    with pytest.raises(label_sets.LabelSetError, match="no table for synscapes"):
        label_sets.raw_table("mtaf7", "synscapes")


def test_merged_protocol_is_renamed_with_the_old_name_an_alias():
    assert labels.miou_protocol("categories7") is labels.miou_protocol("categories7_merged")
    confusion = np.eye(19, dtype=np.int64)
    scores = evaluate.protocol_scores(confusion, ("categories7_merged", "categories7"))
    assert scores["categories7_merged"] == scores["categories7"]


def test_config_label_set_needs_as_many_classes():
    config = default.get_config()
    config.data.label_set = "mtaf7"
    with pytest.raises(config_checks.ConfigValueError, match="num_classes=19 must equal it"):
        config_checks.check_config(config)
    config.model.num_classes = 7
    config_checks.check_config(config)
    config.data.label_set = "nope"
    with pytest.raises(config_checks.ConfigValueError, match="label_set"):
        config_checks.check_config(config)


def test_mtaf_setting_is_7_class():
    from configs import mtaf_gta2csmap

    config = mtaf_gta2csmap.setting()
    assert config.data.label_set == "mtaf7" and config.model.num_classes == 7
    config_checks.check_config(mtaf_gta2csmap.get_config())


def test_summary_and_table_name_the_label_sets_classes():
    result = evaluate.iou_from_confusion(np.eye(7, dtype=np.int64))
    summary = eval_stage.summarize({"cityscapes": result}, label_sets.class_names("mtaf7"))
    assert list(summary["cityscapes"]["iou"]) == list(label_sets.SEVEN_CLASSES)
    table = evaluate.format_iou_table(result, label_sets.class_names("mtaf7"))
    assert "| vehicle | 100.00 |" in table and "road" not in table


# --- Converters: --label-set files, and the input pipeline reading them --------------------


def convert(tool: str, data_dir, *args, check: bool = True):
    result = subprocess.run(
        [sys.executable, f"tools/convert_datasets/{tool}.py", str(data_dir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


RAW = np.array([[7, 22, 0], [29, 24, 23]], np.uint8)  # road, terrain, void / caravan, person, sky


def test_gta_and_cityscapes_write_their_own_tables(tmp_path):
    gta, cs = tmp_path / "gta", tmp_path / "cityscapes"
    for i in range(2):
        save_rgb(f"{gta}/images/{i:05d}.png", np.zeros((2, 3, 3)))
        save_gray(f"{gta}/labels/{i:05d}.png", RAW)
    for split in ("train", "val"):
        stem = f"{split}/aachen/aachen_000000_000019"
        save_rgb(f"{cs}/leftImg8bit/{stem}_leftImg8bit.png", np.zeros((2, 3, 3)))
        save_gray(f"{cs}/gtFine/{stem}_gtFine_labelIds.png", RAW)
    convert("gta", gta, "--nproc", "1")
    with pytest.raises(datasets.DatasetError, match=r"gta.py <data root>/gta --label-set mtaf7\)$"):
        datasets.list_files(str(tmp_path), "gta", label_set="mtaf7")
    convert("gta", gta, "--nproc", "1", "--label-set", "mtaf7")
    stats = json.load(open(gta / "sample_class_stats.json"))
    # terrain flat, caravan ignored in GTA5's table; the 19-class files and stats unchanged
    np.testing.assert_array_equal(read(gta / "labels/00000_labelTrainIds_mtaf7.png"),
                                  [[0, 0, 255], [255, 5, 4]])  # fmt: skip
    np.testing.assert_array_equal(read(gta / "labels/00000_labelTrainIds.png"),
                                  [[0, 9, 255], [255, 11, 10]])  # fmt: skip
    assert all(s["file"].endswith("_labelTrainIds.png") for s in stats)
    files = datasets.list_files(str(tmp_path), "gta", label_set="mtaf7")
    assert len(files) == 2 and files.labels[0].endswith("00000_labelTrainIds_mtaf7.png")
    assert len(datasets.list_files(str(tmp_path), "gta")) == 2  # a re-run lists no extras

    convert("cityscapes", cs, "--nproc", "1", "--label-set", "mtaf7")
    out = cs / f"gtFine/{stem}_gtFine_labelTrainIds_mtaf7.png"
    np.testing.assert_array_equal(read(out), [[0, 3, 255], [6, 5, 4]])  # terrain nature
    files = datasets.list_files(str(tmp_path), "cityscapes", "val", label_set="mtaf7")
    assert files.labels == (str(out),)


def test_label_set_without_a_table_fails_before_reading(tmp_path):
    d = tmp_path / "gta"
    save_rgb(f"{d}/images/0.png", np.zeros((2, 3, 3)))
    save_gray(f"{d}/labels/0.png", RAW)
    result = convert("gta", d, "--nproc", "1", "--label-set", "dada7", check=False)
    assert result.returncode != 0 and "has no table for gta" in result.stderr
    with pytest.raises(datasets.DatasetError, match="no table for dataset 'gta'"):
        datasets.list_files(str(tmp_path), "gta", label_set="dada7")


def test_mapillary_label_set_full_and_half_size(tmp_path):
    d = tmp_path / "mapillary"
    json.dump({"labels": [{"readable": n} for n in MAPILLARY_READABLE]},
              open(_mkdir(d) / "config_v1.2.json", "w"))  # fmt: skip
    terrain, curb, bird = (MAPILLARY_READABLE.index(n) for n in ("Terrain", "Curb", "Bird"))
    raw = np.repeat(np.array([[terrain, terrain, curb, curb], [bird, bird, 13, 13]]), 2, 0)
    for split in ("training", "validation"):
        save_rgb(f"{d}/{split}/images/a.jpg", np.zeros((4, 4, 3)))
        save_gray(f"{d}/{split}/v1.2/labels/a.png", raw)
    convert("mapillary", d, "--nproc", "1", "--label-set", "mtaf7")
    full = np.repeat([[0, 0, 1, 1], [255, 255, 0, 0]], 2, 0)
    np.testing.assert_array_equal(read(d / "mtaf7_label/train/label/a.png"), full)
    np.testing.assert_array_equal(read(d / "half/val_label_mtaf7/a.png"), [[0, 1], [255, 0]])
    assert len(datasets.list_files(str(tmp_path), "mapillary", "train", label_set="mtaf7")) == 1
    assert len(datasets.list_files(str(tmp_path), "mapillary", "val", label_set="mtaf7")) == 1


def _mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


def test_synthia_writes_dada7_from_the_first_channel(tmp_path):
    import tensorflow as tf

    d = tmp_path / "synthia"
    ids = np.array([[3, 21, 22], [1, 12, 8]], np.uint16)  # road, wall, lane marking / sky, ...
    os.makedirs(d / "GT/LABELS")
    png = tf.io.encode_png(np.stack([ids, ids + 1000, ids + 1000], -1))
    tf.io.write_file(str(d / "GT/LABELS/0000000.png"), png)
    save_rgb(f"{d}/RGB/0000000.png", np.zeros((2, 3, 3)))
    convert("synthia", d, "--nproc", "1", "--label-set", "dada7")
    out = read(d / "GT/LABELS/0000000_labelTrainIds_dada7.png")
    np.testing.assert_array_equal(out, [[0, 255, 0], [4, 255, 6]])  # motorcycle (12) out
    assert len(datasets.list_files(str(tmp_path), "synthia", label_set="dada7")) == 1
