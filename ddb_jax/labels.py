"""The label space: class names, colours and raw dataset ids -> the 19 Cityscapes train ids.

One place for every table so the five converters, the toy generator, evaluation,
image summaries and the tests agree (255 = ignore). A leaf module (NumPy only): the
input pipeline and the DDB ops may import it. The Cityscapes table is written out here
rather than imported from ``cityscapesscripts`` (its package pulls matplotlib and friends
for one dict); the values are the ``trainId`` column of cityscapesscripts' ``labels.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ddb_jax import errors

IGNORE_LABEL = 255
NUM_CLASSES = 19

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# The 19 train ids in the official colours (cityscapesScripts labels.py), RGB.
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    np.uint8,
)  # fmt: skip


def palette_256() -> np.ndarray:
    """(256, 3) uint8: the palette indexed by train id, ignore (255) and unknown ids black."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE
    return table


# Cityscapes label ids (also GTA5 and Synscapes class maps) -> train ids. Ids 0..33 are
# valid; ids not listed (void, ground, parking, rail track, guard rail, ...) become 255.
CITYSCAPES_ID_TO_TRAIN_ID: Mapping[int, int] = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
# License plate has id -1 in cityscapesscripts; an 8-bit PNG stores it as 255.
CITYSCAPES_VALID_IDS = tuple(range(34)) + (255,)
# DAFormer's 'thing' classes (traffic light, sign, person, rider and the vehicles): the cells
# its ImageNet feature distance is taken on.
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

# SYNTHIA-RAND-CITYSCAPES class ids (README of the release) -> train ids. Ids 0..22 are
# valid. Terrain, truck and train do not occur in SYNTHIA: the 16-class protocol drops them
# at evaluation time, the converted labels keep the 19-class id space.
SYNTHIA_ID_TO_TRAIN_ID: Mapping[int, int] = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    16: 9,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    18: 14,
    19: 15,
    20: 16,
    12: 17,
    11: 18,
}
SYNTHIA_VALID_IDS = tuple(range(23))
# Train ids that SYNTHIA-RAND-CITYSCAPES never yields: terrain, truck, train (ids 16, 18, 20
# above; DAFormer's and DDB's converters mark them "not present in synthia").
SYNTHIA_ABSENT_CLASSES = (9, 14, 16)

# IDD (India Driving Dataset) fine ids (the 'id' column of its anue_labels.py, 0..39, as
# *_gtFine_labelids.png hold them) -> train ids: its 'csTrainId' column. Non-drivable
# fallback is terrain; drivable fallback, autorickshaw, curb, billboard and the other
# IDD-only classes have none (255).
IDD_ID_TO_TRAIN_ID: Mapping[int, int] = {
    0: 0, 3: 1, 5: 9, 6: 11, 8: 12, 9: 17, 10: 18, 12: 13, 13: 14, 14: 15, 17: 16, 20: 3,
    21: 4, 24: 7, 25: 6, 26: 5, 29: 2, 32: 8, 33: 10,
}  # fmt: skip
IDD_VALID_IDS = tuple(range(40)) + (255,)

TRAIN_ID_TO_CITYSCAPES_ID: Mapping[int, int] = {v: k for k, v in CITYSCAPES_ID_TO_TRAIN_ID.items()}
TRAIN_ID_TO_SYNTHIA_ID: Mapping[int, int] = {v: k for k, v in SYNTHIA_ID_TO_TRAIN_ID.items()}

# --- Extra mIoUs of a setting, from the same 19-class confusion matrix ----------------------
#
# SYNTHIA->Cityscapes is reported over the 16 classes SYNTHIA has, and over 13 (without wall,
# fence and pole as well): the subsets of the UDA literature's evaluation code
# (synthia_set_16 / synthia_set_13 of ZJULearning/MaxSquareLoss utils/eval.py). The model keeps
# 19 outputs and the subset means are taken over the per-class IoUs of the 19-class confusion
# matrix, as DAFormer reports them (lhoyer/DAFormer README: "mIoU16 = mIoU19 * 19 / 16" when the
# three absent classes score 0).
SYNTHIA_16_CLASSES = tuple(c for c in range(NUM_CLASSES) if c not in SYNTHIA_ABSENT_CLASSES)
SYNTHIA_13_CLASSES = tuple(c for c in SYNTHIA_16_CLASSES if c not in (3, 4, 5))

# 'categories7_merged': a 19-class model's confusion matrix merged into the categories of
# cityscapesScripts' labels.py ('category' column; 'void' has no train id), i.e. a pixel counts
# as correct when prediction and label share a category. Not the 7-class numbers of DADA or
# MTAF: those come from 7-class models trained on each paper's own tables, which differ from
# these categories (ddb_jax/label_sets.py, config.data.label_set).
CITYSCAPES_CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
TRAIN_ID_TO_CATEGORY = (
    0, 0,              # road, sidewalk: flat
    1, 1, 1,           # building, wall, fence: construction
    2, 2, 2,           # pole, traffic light, traffic sign: object
    3, 3,              # vegetation, terrain: nature
    4,                 # sky
    5, 5,              # person, rider: human
    6, 6, 6, 6, 6, 6,  # car, truck, bus, train, motorcycle, bicycle: vehicle
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MiouProtocol:
    """One extra mean IoU: the confusion matrix's rows and columns summed into groups
    (``group_of[train_id]``), IoU per group, mean over the ``averaged`` groups (NaN ones left
    out, as mmseg). A class subset keeps one group per class and averages some of them."""

    title: str  # the column / table row, e.g. 'mIoU16'
    group_names: tuple[str, ...]
    group_of: tuple[int, ...]  # one group index per train id
    averaged: tuple[int, ...]


_CLASSES_AS_GROUPS = tuple(range(NUM_CLASSES))
_MERGED7 = MiouProtocol(
    "mIoU7", CITYSCAPES_CATEGORIES, TRAIN_ID_TO_CATEGORY, tuple(range(len(CITYSCAPES_CATEGORIES)))
)
# config.eval.miou_protocols names these. 'categories7' is the former name of
# 'categories7_merged', kept as an alias (results are keyed by the name the config uses).
MIOU_PROTOCOLS: Mapping[str, MiouProtocol] = {
    "synthia16": MiouProtocol("mIoU16", CITYSCAPES_CLASSES, _CLASSES_AS_GROUPS, SYNTHIA_16_CLASSES),
    "synthia13": MiouProtocol("mIoU13", CITYSCAPES_CLASSES, _CLASSES_AS_GROUPS, SYNTHIA_13_CLASSES),
    "categories7_merged": _MERGED7,
    "categories7": _MERGED7,
}


def miou_protocol(name: str) -> MiouProtocol:
    """The protocol ``name`` (a config.eval.miou_protocols entry); unknown names raise."""
    if name not in MIOU_PROTOCOLS:
        raise ValueError(
            f"config.eval.miou_protocols: unknown {name!r}; known: {sorted(MIOU_PROTOCOLS)}"
        )
    return MIOU_PROTOCOLS[name]


class UnknownLabelError(errors.InputError, ValueError):
    """A label file holds ids outside the table's valid set."""


def build_lut(id_to_train_id: Mapping[int, int], size: int = 65536) -> np.ndarray:
    """A lookup table ``lut[raw_id] = train_id`` (255 for ids without a class)."""
    lut = np.full(size, IGNORE_LABEL, np.uint8)
    for raw_id, train_id in id_to_train_id.items():
        lut[raw_id] = train_id
    return lut


def map_ids(
    raw: np.ndarray,
    id_to_train_id: Mapping[int, int],
    valid_ids: Sequence[int],
    filename: str,
    unknown_to_ignore: bool = False,
) -> np.ndarray:
    """Maps raw ids to train ids; ids outside ``valid_ids`` raise naming ``filename``.

    Unknown ids usually mean the wrong label file (a colour PNG, the wrong channel), which
    would otherwise turn into silently ignored pixels.
    """
    present = np.unique(raw)
    unknown = np.setdiff1d(present, np.asarray(valid_ids))
    if unknown.size and not unknown_to_ignore:
        raise UnknownLabelError(
            f"{filename}: label ids {unknown.tolist()[:10]} are not valid for this dataset "
            f"(valid: {min(valid_ids)}..{max(valid_ids)})"
        )
    lut = build_lut(id_to_train_id, size=max(int(present.max()) + 1, 256))
    return lut[raw]


# Mapillary Vistas names -> Cityscapes classes. A Mapillary label is matched by its
# lower-case "readable" name with spaces and dashes removed: exact Cityscapes class names
# first, then the substring rules below in order (the mapping used by openseg/DDB).
_MAPILLARY_SUBSTRING_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("trafficsign", "front", "back"), "traffic sign"),
    (("onrail",), "train"),
    (("cyclist", "rider"), "rider"),
    (("pole", "streetlight"), "pole"),
    (("curb", "pedestrianarea"), "sidewalk"),
    (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), "road"),
)


def _squash(name: str) -> str:
    return name.lower().replace(" ", "").replace("-", "")


def mapillary_to_train_id(readable_names: Sequence[str]) -> np.ndarray:
    """Train id per Mapillary label index (uint8; 255 for classes without a counterpart)."""
    exact = {_squash(name): i for i, name in enumerate(CITYSCAPES_CLASSES)}
    table = np.full(len(readable_names), IGNORE_LABEL, np.uint8)
    for index, readable in enumerate(readable_names):
        name = _squash(readable)
        if name in exact:
            table[index] = exact[name]
            continue
        for needles, cls in _MAPILLARY_SUBSTRING_RULES:
            if any(needle in name for needle in needles):
                table[index] = CITYSCAPES_CLASSES.index(cls)
                break
    return table
