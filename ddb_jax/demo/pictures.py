"""The demo's two pictures, drawn from a finished pipeline workdir with Pillow alone.

- ``predictions.png``: a grid, one row per validation image of the (first) target, columns
  image | ground truth | source-only | r1_cu | r1_ca | r2_ckd (the stages that exist), each
  model's prediction computed here as the evaluate stage computes it
  (:mod:`ddb_jax.inference.predictor`, with the pipeline's eval settings and the dataset's
  eval scale);
- ``miou.png``: each stage's mIoU (``summary.json``) as horizontal bars, the source-only
  and oracle rows in their own colours and the gap between them shaded.

    python -m ddb_jax.demo.pictures --workdir runs/demo [--docs docs]

No matplotlib: the project does not depend on it, and two fixed layouts need little.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddb_jax import paths
from ddb_jax.inference import label_images

PREDICTIONS_PNG = "predictions.png"
MIOU_PNG = "miou.png"
STAGES = ("source_only", "r1_cu", "r1_ca", "r2_ckd")
TITLES = {"source_only": "source-only", "oracle": "oracle"}

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GAP_SHADE = (255, 236, 179)
BAR_COLOURS = {"source_only": (200, 80, 70), "oracle": (70, 150, 80)}
DDB_BAR = (60, 110, 190)
GRID = (200, 200, 200)


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` (bitmap fallback without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def text_width(draw: ImageDraw.ImageDraw, text: str, face) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=face)
    return int(right - left)


# --- predictions.png ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where the panels of a grid of equally sized images go."""

    rows: int
    columns: int
    panel: tuple[int, int]  # (height, width)
    header: int = 24
    gap: int = 4

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture."""
        h, w = self.panel
        return (
            self.columns * w + (self.columns + 1) * self.gap,
            self.header + self.rows * h + (self.rows + 1) * self.gap,
        )

    def origin(self, row: int, column: int) -> tuple[int, int]:
        """(x, y) of a panel's top-left pixel."""
        h, w = self.panel
        return (self.gap + column * (w + self.gap), self.header + self.gap + row * (h + self.gap))


def grid_picture(panels: Sequence[Sequence[np.ndarray]], titles: Sequence[str]) -> Image.Image:
    """``panels[row][column]``, (H, W, 3) uint8 arrays of one size, under column titles."""
    height, width = panels[0][0].shape[:2]
    grid = Grid(len(panels), len(titles), (height, width))
    picture = Image.new("RGB", grid.size, BACKGROUND)
    draw = ImageDraw.Draw(picture)
    face = font(14)
    for column, title in enumerate(titles):
        x, _ = grid.origin(0, column)
        tx = x + max(0, (width - text_width(draw, title, face)) // 2)
        draw.text((tx, 4), title, fill=INK, font=face)
    for row, row_panels in enumerate(panels):
        for column, panel in enumerate(row_panels):
            if panel.shape[:2] != (height, width):
                raise ValueError(
                    f"panel ({row}, {column}) is {panel.shape[:2]}, not {height, width}"
                )
            picture.paste(Image.fromarray(panel), grid.origin(row, column))
    return picture


def fit_width(array: np.ndarray, width: int, nearest: bool) -> np.ndarray:
    """``array`` scaled to ``width`` (label maps nearest, photos bilinear); unchanged when it
    is that wide already."""
    h, w = array.shape[:2]
    if w == width:
        return array
    size = (width, max(1, round(h * width / w)))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize(size, resample))


def predictions_picture(
    workdir: str,
    stages: Sequence[str] = STAGES,
    num_images: int = 3,
    max_panel_width: int = 320,
) -> Image.Image:
    """The grid of ``predictions.png`` for the pipeline in ``workdir``: the first
    ``num_images`` validation images of its first target, with their ground truth and the
    prediction of each stage of ``stages`` that has an exported model."""
    from ddb_jax import pipeline
    from ddb_jax.inference.batching import predict_images
    from ddb_jax.inference.image_input import read_image
    from ddb_jax.inference.predictor import Predictor, load_model
    from ddb_jax.train import workdir as workdir_lib
    from input_pipeline import datasets

    config = paths.read_json(paths.join(workdir, pipeline.PIPELINE_JSON))
    data, evaluation = config["data"], config["eval"]
    target = data["target"][0]
    files = datasets.with_scale_overrides(
        datasets.list_files(data["root"], target, evaluation["split"], with_labels=True),
        data.get("resize_scales") or None,
    )
    chosen = list(zip(files.images, files.labels, strict=True))[:num_images]
    images = [read_image(image) for image, _ in chosen]
    truths = [label_images.read_png(label) for _, label in chosen]
    columns = [s for s in stages if paths.isdir(paths.join(workdir, s, workdir_lib.EXPORT_DIR))]
    if not columns:
        raise FileNotFoundError(f"{workdir}: none of {list(stages)} has an export/ model yet")
    predictions = {}
    for stage in columns:
        variables, model_cfg, _ = load_model(paths.join(workdir, stage, workdir_lib.EXPORT_DIR))
        predictor = Predictor.from_model(
            variables, model_cfg, mode=evaluation["mode"], crop=tuple(evaluation["crop_size"]),
            stride=tuple(evaluation["stride"]), flip=evaluation["flip"],
        )  # fmt: skip
        predictions[stage] = predict_images(predictor, images, files.scale)
    width = min(images[0].shape[1], max_panel_width)
    rows = []
    for i, image in enumerate(images):
        row = [fit_width(image, width, nearest=False)]
        row.append(fit_width(label_images.colorize(truths[i]), width, nearest=True))
        row += [
            fit_width(label_images.colorize(predictions[s][i]), width, nearest=True)
            for s in columns
        ]
        rows.append(row)
    titles = ["image", "ground truth"] + [TITLES.get(s, s) for s in columns]
    return grid_picture(rows, titles)


# --- miou.png ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MiouChart:
    """Horizontal bars of mIoU (percent) per stage, in ``summary.json``'s order."""

    names: tuple[str, ...]
    values: tuple[float, ...]  # percent
    title: str = ""
    width: int = 640
    label_width: int = 110
    row_height: int = 26
    bar_height: int = 16
    top: int = 52
    bottom: int = 30

    @classmethod
    def from_summary(cls, summary: dict, **layout) -> MiouChart:
        rows = [(n, r["miou"]) for n, r in summary["stages"].items() if r.get("miou") is not None]
        if not rows:
            raise ValueError("the summary has no stage with an mIoU")
        targets = " + ".join(summary.get("targets", [])) or "target"
        title = f"{targets}: mIoU (%) of each stage's student"
        names, values = zip(*rows, strict=True)
        return cls(tuple(names), tuple(100 * v for v in values), title, **layout)

    @property
    def axis_max(self) -> float:
        """The axis ends at the next multiple of 10 above every value."""
        return max(10.0, 10 * math.ceil(max(self.values) / 10 + 1e-9))

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.top + len(self.names) * self.row_height + self.bottom

    def x(self, value: float) -> int:
        """The x pixel of an mIoU value (percent)."""
        span = self.width - self.label_width - 60  # room for the value after the longest bar
        return self.label_width + round(span * value / self.axis_max)

    def bar_box(self, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a stage's bar, inclusive."""
        y0 = self.top + row * self.row_height + (self.row_height - self.bar_height) // 2
        return self.x(0), y0, max(self.x(self.values[row]) - 1, self.x(0)), y0 + self.bar_height - 1

    def gap(self) -> tuple[float, float] | None:
        """(source-only, oracle) mIoU when both rows are there."""
        if "source_only" not in self.names or "oracle" not in self.names:
            return None
        value = dict(zip(self.names, self.values, strict=True))
        return value["source_only"], value["oracle"]

    def colour(self, name: str) -> tuple[int, int, int]:
        return BAR_COLOURS.get(name, DDB_BAR)

    def draw(self) -> Image.Image:
        picture = Image.new("RGB", self.size, BACKGROUND)
        draw = ImageDraw.Draw(picture)
        small, face = font(12), font(14)
        bottom = self.top + len(self.names) * self.row_height
        draw.text((8, 6), self.title, fill=INK, font=face)
        gap = self.gap()
        if gap is not None:
            low, high = self.x(min(gap)), self.x(max(gap))
            draw.rectangle((low, self.top - 4, high, bottom + 2), fill=GAP_SHADE)
            for value, name in zip(gap, ("source_only", "oracle"), strict=True):
                for y in range(self.top - 4, bottom + 2, 6):  # dashed
                    draw.line((self.x(value), y, self.x(value), y + 2), fill=self.colour(name))
            label = f"domain gap {gap[1] - gap[0]:.1f}"
            tx = (low + high - text_width(draw, label, small)) // 2
            draw.text((max(tx, self.label_width), self.top - 20), label, fill=INK, font=small)
        for tick in range(0, int(self.axis_max) + 1, 10):
            x = self.x(tick)
            draw.line((x, bottom + 2, x, bottom + 6), fill=INK)
            draw.text((x - text_width(draw, str(tick), small) // 2, bottom + 8), str(tick),
                      fill=INK, font=small)  # fmt: skip
        draw.line((self.x(0), self.top - 4, self.x(0), bottom + 2), fill=INK)
        for row, (name, value) in enumerate(zip(self.names, self.values, strict=True)):
            x0, y0, x1, y1 = self.bar_box(row)
            draw.rectangle((x0, y0, x1, y1), fill=self.colour(name))
            title = TITLES.get(name, name)
            draw.text((self.label_width - 8 - text_width(draw, title, face), y0), title,
                      fill=INK, font=face)  # fmt: skip
            draw.text((x1 + 6, y0 + 1), f"{value:.1f}", fill=INK, font=small)
        return picture


def miou_picture(summary: dict) -> Image.Image:
    return MiouChart.from_summary(summary).draw()


# --- files ------------------------------------------------------------------------------------


def png_bytes(picture: Image.Image) -> bytes:
    return label_images.png_bytes(np.asarray(picture.convert("RGB")))


def write_demo_pictures(workdir: str) -> list[str]:
    """Writes ``predictions.png`` and ``miou.png`` into a finished pipeline's workdir."""
    from ddb_jax import pipeline

    pipeline.enable_compilation_cache(workdir)  # the stages compiled these programs already
    summary = paths.read_json(paths.join(workdir, pipeline.SUMMARY_JSON))
    written = []
    for name, picture in (
        (PREDICTIONS_PNG, predictions_picture(workdir)),
        (MIOU_PNG, miou_picture(summary)),
    ):
        path = paths.join(workdir, name)
        paths.write_bytes(path, png_bytes(picture))
        written.append(path)
    return written


def small_copy(source: str, target: str, max_width: int = 800) -> None:
    """A copy of a picture no wider than ``max_width`` (for docs/)."""
    with Image.open(io.BytesIO(paths.read_bytes(source))) as picture:
        picture = picture.convert("RGB")
        if picture.width > max_width:
            height = round(picture.height * max_width / picture.width)
            picture = picture.resize((max_width, height), Image.Resampling.LANCZOS)
        paths.write_bytes(target, png_bytes(picture))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="a finished pipeline's workdir")
    parser.add_argument("--docs", default=None, help="also write small copies here")
    args = parser.parse_args(argv)
    for path in write_demo_pictures(args.workdir):
        print(f"wrote {path}")
        if args.docs:
            copy = paths.join(args.docs, f"demo_{paths.basename(path)}")
            small_copy(path, copy)
            print(f"wrote {copy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
