"""Label sets: the papers' own class spaces besides the 19 Cityscapes train ids.

DADA (Vu et al., ICCV 2019) and MTAF (Saporta et al., ICCV 2021) report 7-class numbers
from *7-class models*: each dataset's raw ids are mapped to flat, construction, object,
nature, sky, human, vehicle by a table of the paper's own, the model has 7 outputs and is
trained and evaluated on those labels. The tables differ per dataset and per paper (MTAF
puts GTA5's terrain in flat but Cityscapes' in nature; DADA's SYNTHIA table maps lane
marking to flat and leaves wall, rider, bus and motorcycle out), so they are not a merge
of the 19-class confusion matrix (that is ``labels.MIOU_PROTOCOLS['categories7_merged']``).

A label set's labels are written next to the 19-class ones by the converters
(``--label-set NAME``, file names :func:`label_suffix`) and read when
``config.data.label_set`` names it. A leaf module (NumPy only), as :mod:`ddb_jax.labels`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ddb_jax import labels

SEVEN_CLASSES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
# One Cityscapes colour per category (road, building, pole, vegetation, sky, person, car):
# the references' info7class.json palettes are the first seven Cityscapes colours, unused.
SEVEN_PALETTE = np.array(
    [(128, 64, 128), (70, 70, 70), (153, 153, 153), (107, 142, 35), (70, 130, 180),
     (220, 20, 60), (0, 0, 142)],
    np.uint8,
)  # fmt: skip
_FLAT, _CONSTRUCTION, _OBJECT, _NATURE, _SKY, _HUMAN, _VEHICLE = range(7)


def _ids(*groups: tuple[int, tuple[int, ...]]) -> dict[int, int]:
    return {raw: cls for cls, raws in groups for raw in raws}


# MTAF, mtaf/dataset/gta5.py (num_classes == 7): Cityscapes ids of GTA5, terrain (22) flat.
MTAF_GTA = _ids((_FLAT, (7, 8, 22)), (_CONSTRUCTION, (11, 12, 13)), (_OBJECT, (17, 19, 20)),
                (_NATURE, (21,)), (_SKY, (23,)), (_HUMAN, (24, 25)),
                (_VEHICLE, (26, 27, 28, 31, 32, 33)))  # fmt: skip
# MTAF, mtaf/dataset/cityscapes_list/info7class.json: terrain (22) nature, caravan (29)
# and trailer (30) vehicle; parking, rail track, guard rail, bridge, tunnel, polegroup out.
MTAF_CITYSCAPES = _ids((_FLAT, (7, 8)), (_CONSTRUCTION, (11, 12, 13)),
                       (_OBJECT, (17, 19, 20)), (_NATURE, (21, 22)), (_SKY, (23,)),
                       (_HUMAN, (24, 25)), (_VEHICLE, tuple(range(26, 34))))  # fmt: skip
# MTAF, mtaf/dataset/idd_list/info7class.json over IDD's fine ``id`` column (0..39, the
# ``*_gtFine_labelids.png`` MTAF's idd.py reads): drivable fallback flat, curb construction,
# billboard object; parking, rail track, non-drivable fallback, animal, guard rail,
# polegroup, obs-str-bar-fallback, bridge, tunnel and the void ids out.
MTAF_IDD = _ids((_FLAT, (0, 2, 3)), (_CONSTRUCTION, (19, 20, 21, 29)),
                (_OBJECT, (23, 24, 25, 26)), (_NATURE, (32,)), (_SKY, (33,)),
                (_HUMAN, (6, 8)), (_VEHICLE, tuple(range(9, 19))))  # fmt: skip
# DADA, dada/dataset/synthia.py (num_classes == 7): SYNTHIA ids; lane marking (22) flat;
# wall (21), rider (17), bus (19), motorcycle (12) and the rest out.
DADA_SYNTHIA = _ids((_FLAT, (3, 4, 22)), (_CONSTRUCTION, (2, 5)), (_OBJECT, (7, 9, 15)),
                    (_NATURE, (6,)), (_SKY, (1,)), (_HUMAN, (10,)),
                    (_VEHICLE, (8, 11)))  # fmt: skip

# Mapillary Vistas readable names (lower case) -> class; DADA's dada/dataset/mapillary.py
# and MTAF's mtaf/dataset/mapillary.py hold the same table. Every name of the v1.x config
# is listed; 'other' ones are ignored (255). Curb and barrier are construction, terrain is
# flat, pothole object.
_MAPILLARY_GROUPS = {
    _FLAT: ("bike lane", "crosswalk - plain", "curb cut", "parking", "pedestrian area",
            "rail track", "road", "service lane", "sidewalk", "lane marking - crosswalk",
            "lane marking - general", "terrain"),
    _CONSTRUCTION: ("curb", "fence", "guard rail", "barrier", "wall", "bridge", "building",
                    "tunnel"),
    _OBJECT: ("pothole", "street light", "pole", "traffic sign frame", "utility pole",
              "traffic light", "traffic sign (back)", "traffic sign (front)"),
    _NATURE: ("vegetation",),
    _SKY: ("sky",),
    _HUMAN: ("person", "bicyclist", "motorcyclist", "other rider"),
    _VEHICLE: ("bicycle", "boat", "bus", "car", "caravan", "motorcycle", "on rails",
               "other vehicle", "trailer", "truck", "wheeled slow"),
    labels.IGNORE_LABEL: ("bird", "ground animal", "mountain", "sand", "snow", "water",
                          "banner", "bench", "bike rack", "billboard", "catch basin",
                          "cctv camera", "fire hydrant", "junction box", "mailbox", "manhole",
                          "phone booth", "trash can", "car mount", "ego vehicle", "unlabeled"),
}  # fmt: skip
MAPILLARY_7 = {name: cls for cls, names in _MAPILLARY_GROUPS.items() for name in names}


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """A class space with a raw-id table per dataset layout it covers."""

    name: str
    class_names: tuple[str, ...]
    palette: np.ndarray  # (num_classes, 3) uint8 RGB
    raw_ids: Mapping[str, Mapping[int, int]]  # layout ('gta', ...) -> raw id -> class
    mapillary_names: Mapping[str, int] | None  # lower-case readable name -> class or 255
    source: str  # where the tables come from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def covers(self, layout: str) -> bool:
        return layout in self.raw_ids or (layout == "mapillary" and bool(self.mapillary_names))


LABEL_SETS: Mapping[str, LabelSet] = {
    "mtaf7": LabelSet(
        "mtaf7", SEVEN_CLASSES, SEVEN_PALETTE,
        {"gta": MTAF_GTA, "cityscapes": MTAF_CITYSCAPES, "idd": MTAF_IDD}, MAPILLARY_7,
        "valeoai/MTAF mtaf/dataset: gta5.py, cityscapes_list/ and idd_list/info7class.json, "
        "mapillary.py",
    ),
    # DADA ships no 7-class Cityscapes table (cityscapes_list holds info16class.json only):
    # the same group's MTAF table stands in for it.
    "dada7": LabelSet(
        "dada7", SEVEN_CLASSES, SEVEN_PALETTE,
        {"synthia": DADA_SYNTHIA, "cityscapes": MTAF_CITYSCAPES}, MAPILLARY_7,
        "valeoai/DADA dada/dataset: synthia.py, mapillary.py; Cityscapes: MTAF's info7class",
    ),
}  # fmt: skip


class LabelSetError(ValueError):
    """An unknown label set, or one without a table for a dataset."""


def label_set(name: str) -> LabelSet:
    """The set ``name`` (config.data.label_set / a converter's --label-set)."""
    if name not in LABEL_SETS:
        raise LabelSetError(f"unknown label set {name!r}; known: {sorted(LABEL_SETS)}")
    return LABEL_SETS[name]


def class_names(name: str) -> tuple[str, ...]:
    """Class names of ``name`` ('' = the 19 Cityscapes train ids)."""
    return label_set(name).class_names if name else labels.CITYSCAPES_CLASSES


def palette_256(name: str) -> np.ndarray:
    """(256, 3) uint8 palette indexed by class id ('' = Cityscapes'), other ids black."""
    if not name:
        return labels.palette_256()
    table = np.zeros((256, 3), np.uint8)
    colours = label_set(name).palette
    table[: len(colours)] = colours
    return table


def label_suffix(name: str) -> str:
    """What a label set appends to a 19-class label's stem ('' for the 19 classes)."""
    return f"_{name}" if name else ""


def raw_table(name: str, layout: str) -> Mapping[int, int]:
    """Raw id -> class of set ``name`` for a dataset ``layout``; a missing table raises."""
    tables = label_set(name).raw_ids
    if layout not in tables:
        raise LabelSetError(
            f"label set {name!r} has no table for {layout} (it covers {sorted(tables)}"
            f"{' and mapillary' if label_set(name).mapillary_names else ''})"
        )
    return tables[layout]


def mapillary_table(name: str, readable_names: list[str]) -> np.ndarray:
    """Class per Mapillary label index (uint8) for set ``name``; unknown names raise."""
    names = label_set(name).mapillary_names
    if not names:
        raise LabelSetError(f"label set {name!r} has no table for mapillary")
    missing = [n for n in readable_names if n.lower() not in names]
    if missing:
        raise LabelSetError(
            f"label set {name!r}: Mapillary classes {missing[:5]} are not in its table "
            "(it follows Mapillary Vistas v1.x's 66 names)"
        )
    return np.array([names[n.lower()] for n in readable_names], np.uint8)
