"""High-resolution toy domains: scenes whose labels need full-resolution detail AND context
from beyond a local crop, the two things HRDA combines (a detail crop at full resolution,
a larger context crop at half resolution).

    python -m input_pipeline.toy --out data/toy --hr [--hr-num-train N] [--hr-num-val M]

writes toy/gta_hr ("toy_hr_source", GTA layout) and toy/cityscapes_hr ("toy_hr_target",
Cityscapes layout) at 512x256, twice the toy size, from a random stream of their own (the
other toy files do not change). Each scene is a toy scene (:func:`toy.draw_scene` at this
size, rendered by :func:`toy.render`, so the layout statistics and the domain gap are the
toy's: clean palette in the source; hue-shifted, textured, noisy, blurred with a hood in the
target) with three additions:

- Detail. Bare poles 1-2 px wide and a picket fence of 1 px posts 3-5 px apart under a
  1 px rail. Halving the resolution (bilinear for images) turns a 1 px post into a
  half-contrast smear, and the label at half resolution keeps every other column, so only
  a full-resolution input can delineate them. Every horizontal run of pole pixels is at
  most 2 px wide (side-by-side poles are split).
- Context. In the bottom quarter of the image the ground beside the road (sidewalk and
  verge there; "the lot") is drawn in one look of its own, a sand colour, whatever its
  label. Its label is sidewalk when the image's marker is a traffic sign and terrain when
  it is a traffic light: locally the two are identical. The marker is one large plate
  (20-28 px square) on a 2 px post in rows 4-31, so at least 160 rows (5/8 of the height)
  lie between marker and lot: beyond a detail crop of half the crop size, within one
  context crop of the whole height. No other sign or light is half that large.
- The domain gap is the toy's, so adaptation still matters.
"""

from __future__ import annotations

import os

import numpy as np

from input_pipeline import toy

WIDTH, HEIGHT = 512, 256
HR_STREAM = 100  # the random stream's key next to the seed (extra sources use 1, 2)
NAMES = ("gta_hr", "cityscapes_hr")  # the dataset directories under the toy root
MAX_POLE_WIDTH = 2
MARKER_TOP, MARKER_SIZES = 4, (20, 28)  # the plate's rows lie in the top quarter
MARKER_CLASSES = {toy.SIGN: toy.SIDEWALK, toy.LIGHT: toy.TERRAIN}  # marker -> lot's label
LOT_ROW = HEIGHT * 3 // 4  # the lot: ground beside the road from this row down
MIN_LOT = 1500  # pixels of the lot above the target's hood; fewer: the scene is redrawn
LOT_LOOK = 250  # an appearance id beyond the train ids: the lot's one colour
LOT_COLOUR = (230, 200, 150)
GROUND = (toy.SIDEWALK, toy.TERRAIN)


def _horizon(label: np.ndarray) -> int:
    """First row with ground (within 3 rows of draw_scene's horizon, under buildings)."""
    rows = np.isin(label, (toy.ROAD, *GROUND)).any(axis=1)
    return int(np.argmax(rows))


def _thin_details(rng: np.random.Generator, label: np.ndarray, horizon: int) -> None:
    """Bare poles 1-2 px wide standing on the ground, and maybe a picket fence."""
    height, width = label.shape
    for _ in range(int(rng.integers(3, 7))):
        bottom = int(rng.integers(horizon + 6, height))
        d = (bottom - horizon) / (height - horizon)
        top = max(0, bottom - int((0.3 + 0.4 * d) * height * 0.8))
        x = int(rng.integers(2, width - 3))
        label[top:bottom, x : x + int(rng.integers(1, MAX_POLE_WIDTH + 1))] = toy.POLE
    if rng.random() < 0.7:
        x0 = int(rng.integers(0, width // 2))
        x1 = x0 + int(rng.integers(width // 6, width // 3))
        top = horizon - int(rng.integers(8, 17))
        label[top : horizon + 2, x0 : x1 : int(rng.integers(3, 6))] = toy.FENCE  # posts
        label[top, x0:x1] = toy.FENCE  # rail


def _marker(rng: np.random.Generator, label: np.ndarray, horizon: int) -> int:
    """Draws the marker plate on its post; returns its class (sign or light)."""
    cls = int(rng.choice(list(MARKER_CLASSES)))
    size = int(rng.integers(MARKER_SIZES[0], MARKER_SIZES[1] + 1))
    x = int(rng.integers(4, label.shape[1] - size - 4))
    post = x + size // 2 - 1
    label[MARKER_TOP + size : horizon + 4, post : post + 2] = toy.POLE
    label[MARKER_TOP : MARKER_TOP + size, x : x + size] = cls
    return cls


def limit_runs(label: np.ndarray, cls: int, width: int) -> None:
    """In each row, a run of ``cls`` wider than ``width`` keeps its first ``width`` pixels;
    the rest take the label just after the run (before it at the right edge)."""
    mask = np.pad(label == cls, ((0, 0), (1, 1)))
    edges = np.diff(mask.astype(np.int8), axis=1)
    for y, x0 in zip(*np.nonzero(edges == 1), strict=True):
        x1 = x0 + int(np.argmax(edges[y, x0:] == -1))  # end of the run (exclusive)
        if x1 - x0 > width:
            fill = label[y, x1] if x1 < label.shape[1] else label[y, x0 - 1]
            label[y, x0 + width : x1] = fill


def draw_hr_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(train ids, appearance ids, marker class) of one scene; the appearance is the
    label with the lot's pixels set to :data:`LOT_LOOK`."""
    rows = np.arange(HEIGHT)[:, None]
    while True:
        label = toy.draw_scene(rng, WIDTH, HEIGHT)
        horizon = _horizon(label)
        _thin_details(rng, label, horizon)
        marker = _marker(rng, label, horizon)
        limit_runs(label, toy.POLE, MAX_POLE_WIDTH)
        lot = (rows >= LOT_ROW) & np.isin(label, GROUND)
        if lot[: HEIGHT - HEIGHT // 16].sum() >= MIN_LOT:
            break
    appearance = label.copy()
    appearance[lot] = LOT_LOOK
    label[lot] = MARKER_CLASSES[marker]
    return label, appearance, marker


def hr_scene(rng: np.random.Generator, domain: str, shift: float):
    """(train ids, image) of one high-resolution scene (:func:`toy.write_domains`)."""
    label, appearance, _ = draw_hr_scene(rng)
    return label, toy.render(rng, appearance, domain, shift, {LOT_LOOK: LOT_COLOUR})


def generate(
    out: str, seed: int = 0, num_train: int = 200, num_val: int = 50, shift: float = 1.0
) -> list[str]:
    """Writes out/gta_hr (source, num_train) and out/cityscapes_hr (target, train + val)
    with their class statistics; returns the two directories."""
    rng = np.random.default_rng([seed, HR_STREAM])
    toy.write_domains(rng, out, num_train, num_val, shift, hr_scene, NAMES)
    return [os.path.join(out, name) for name in NAMES]
