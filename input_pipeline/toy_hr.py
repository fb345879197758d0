"""High-resolution toy domains: scenes whose labels need full-resolution detail AND context
from beyond a local crop, the two things HRDA combines (a detail crop at full resolution,
a larger context crop at half resolution).

    python -m input_pipeline.toy --out data/toy --hr [--hr-num-train N] [--hr-num-val M]

writes toy/gta_hr ("toy_hr_source", GTA layout) and toy/cityscapes_hr ("toy_hr_target",
Cityscapes layout) at 512x256, twice the toy size, from a random stream of their own (the
other toy files do not change). Each scene is a toy scene (:func:`toy.draw_scene` at this
size, rendered by :func:`toy.render`, so the layout statistics and the domain gap are the
toy's, at half its strength: clean palette in the source; hue-shifted, textured, noisy,
blurred with a hood in the target) with three additions:

- Detail. Bare poles 5-6 px wide (6-10 of them) and a picket fence of 5 px posts 16-24
  px apart under a 3 px rail. A model of output stride 8 predicts one cell per 8x8 pixels:
  at full resolution such a pole fills most of a cell and the fence's period is two or
  three cells; on the image at half resolution a cell covers 16x16 pixels of the original,
  the pole is a minority of any cell and the fence's period one or one and a half cells:
  only a full-resolution input can delineate them. Every horizontal run of pole pixels is
  at most 6 px wide (side-by-side poles are split).
- Context. From row 160 down (the bottom three eighths) the ground beside the road
  (sidewalk and verge there; "the lot") is drawn in one look of its own, a sand colour,
  whatever its label. Its label is sidewalk when the image's marker is a traffic sign and
  terrain when it is a traffic light: locally the two are identical. The marker is a
  gantry plate across the whole width in rows 4 to 19-27, so more than 128 rows lie
  between marker and lot: no 128x128 detail crop holds both, and every crop of the whole
  height (HRDA's context crop, the half-resolution model's crop) holds both. No other
  sign or light is a tenth as tall.
- The domain gap is the toy's at half strength (:data:`SHIFT`), so adaptation still
  matters. At full strength the target's hue shift turns the yellow poles the source's
  green of terrain and vegetation, and no model of the demo learns target poles at all.
"""

from __future__ import annotations

import os

import numpy as np

from input_pipeline import toy

WIDTH, HEIGHT = 512, 256
HR_STREAM = 100  # the random stream's key next to the seed (extra sources use 1, 2)
NAMES = ("gta_hr", "cityscapes_hr")  # the dataset directories under the toy root
POLE_WIDTHS = (5, 6)  # the bare poles' widths; toy.draw_scene's own poles are 1-3 px
MAX_POLE_WIDTH = 6
POLES = (6, 10)  # bare poles per scene, fewest and most
FENCE_POST, FENCE_GAPS, FENCE_RAIL = 5, (11, 19), 3  # picket fence: post and rail widths
MARKER_TOP, MARKER_HEIGHTS = 4, (16, 24)  # the gantry plate's first row and its heights
MARKER_CLASSES = {toy.SIGN: toy.SIDEWALK, toy.LIGHT: toy.TERRAIN}  # marker -> lot's label
LOT_ROW = 160  # the lot: ground beside the road from this row down
MIN_LOT = 3000  # pixels of the lot above the target's hood; fewer: the scene is redrawn
LOT_LOOK = 250  # an appearance id beyond the train ids: the lot's one colour
LOT_COLOUR = (230, 200, 150)
SHIFT = 0.5  # the domain shift relative to the toy's (``generate``'s ``shift``)
GROUND = (toy.SIDEWALK, toy.TERRAIN)


def _horizon(label: np.ndarray) -> int:
    """First row with ground (within 3 rows of draw_scene's horizon, under buildings)."""
    rows = np.isin(label, (toy.ROAD, *GROUND)).any(axis=1)
    return int(np.argmax(rows))


def _thin_details(rng: np.random.Generator, label: np.ndarray, horizon: int) -> None:
    """Bare poles 5-6 px wide standing on the ground, and maybe a picket fence."""
    height, width = label.shape
    for _ in range(int(rng.integers(POLES[0], POLES[1] + 1))):
        bottom = int(rng.integers(horizon + 6, height))
        d = (bottom - horizon) / (height - horizon)
        top = max(0, bottom - int((0.3 + 0.4 * d) * height * 0.8))
        x = int(rng.integers(2, width - MAX_POLE_WIDTH - 1))
        pole_width = int(rng.integers(POLE_WIDTHS[0], POLE_WIDTHS[1] + 1))
        label[top:bottom, x : x + pole_width] = toy.POLE
    if rng.random() < 0.7:
        x0 = int(rng.integers(0, width // 2))
        x1 = x0 + int(rng.integers(width // 5, width // 3))
        top = horizon - int(rng.integers(14, 25))
        period = FENCE_POST + int(rng.integers(FENCE_GAPS[0], FENCE_GAPS[1] + 1))
        for x in range(x0, x1 - FENCE_POST + 1, period):
            label[top : horizon + 2, x : x + FENCE_POST] = toy.FENCE  # posts
        label[top : top + FENCE_RAIL, x0:x1] = toy.FENCE  # rail


def _marker(rng: np.random.Generator, label: np.ndarray) -> int:
    """Draws the marker, a gantry plate across the top; returns its class (sign or light)."""
    cls = int(rng.choice(list(MARKER_CLASSES)))
    size = int(rng.integers(MARKER_HEIGHTS[0], MARKER_HEIGHTS[1] + 1))
    label[MARKER_TOP : MARKER_TOP + size] = cls
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
        limit_runs(label, toy.POLE, MAX_POLE_WIDTH)
        marker = _marker(rng, label)
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
    with their class statistics, at :data:`SHIFT` times the toy's domain shift ``shift``;
    returns the two directories."""
    rng = np.random.default_rng([seed, HR_STREAM])
    toy.write_domains(rng, out, num_train, num_val, SHIFT * shift, hr_scene, NAMES)
    return [os.path.join(out, name) for name in NAMES]
