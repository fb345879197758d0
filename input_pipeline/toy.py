"""Toy domains: procedurally generated street scenes for the end-to-end demo and tests.

    python -m input_pipeline.toy --out data/toy [--seed 0] [--num-train 200] [--num-val 50]
        [--extra-sources synthia,synscapes] [--hr [--hr-num-train N] [--hr-num-val M]]

Both domains draw scenes from the same layout distribution (sky, buildings, trees,
road with sidewalks, terrain, fences, poles with signs and lights, cars, people), so the
label statistics match; only the appearance differs, as between GTA5 and Cityscapes:
- source ("toy_source", GTA layout): clean saturated palette, sharp edges, faint noise;
- target ("toy_target", Cityscapes layout): a hue-rotated, desaturated, lower-contrast
  palette, textures (brick stripes, asphalt grain, foliage speckle), an illumination
  gradient, stronger sensor noise and blur, and an ego-vehicle hood (ignored in labels).
Layout cues (sky on top, road at the bottom, shapes) are shared, so a model can bridge
the gap by adaptation; the colour and texture shift makes a source-only model lose.
Raw Cityscapes *ids* are written too, so the dataset converters can be run on the output.

Two more sources on request (``--extra-sources synthia,synscapes``), drawn and rendered as the
toy source but from their own random streams (toy/gta and toy/cityscapes stay the same files):
- "toy_synthia" (SYNTHIA layout): labels as SYNTHIA ships them, 16-bit RGB PNGs with SYNTHIA's
  class ids in the first channel, and no terrain, truck or train (toy terrain is SYNTHIA's
  void: drawn, but unlabelled);
- "toy_synscapes" (Synscapes layout): class maps in Cityscapes ids.
Their train ids are written by the real converters, run as a user runs them
(``python tools/convert_datasets/synthia.py``, ``synscapes.py``; a subprocess, since the input
pipeline imports nothing of tools/), so the toy chain goes through the converters' path.

``--hr`` also writes 512x256 domains whose labels need full-resolution detail and distant
context ("toy_hr_source", "toy_hr_target"; input_pipeline/toy_hr.py explains them).
"""

from __future__ import annotations

import argparse
import colorsys
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageFilter

from ddb_jax import labels as label_tables
from input_pipeline import conversion, rcs, toy_depth

WIDTH, HEIGHT = 256, 128
ROAD, SIDEWALK, BUILDING, FENCE, POLE, LIGHT, SIGN, VEGETATION = 0, 1, 2, 4, 5, 6, 7, 8
TERRAIN, SKY, PERSON, CAR = 9, 10, 11, 13
IGNORE = label_tables.IGNORE_LABEL
EGO_VEHICLE_ID = 1  # Cityscapes id of the ego vehicle (no train id)
SYNTHIA_VOID_ID = 0  # SYNTHIA's void class (no train id)
EXTRA_SOURCES = ("synthia", "synscapes")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE_PALETTE = {
    ROAD: (70, 70, 78),
    SIDEWALK: (200, 120, 200),
    BUILDING: (150, 90, 60),
    FENCE: (190, 150, 110),
    POLE: (250, 250, 60),
    LIGHT: (255, 140, 0),
    SIGN: (230, 40, 40),
    VEGETATION: (40, 170, 40),
    TERRAIN: (150, 220, 110),
    SKY: (60, 130, 240),
    PERSON: (240, 30, 90),
    CAR: (20, 40, 200),
}


def _target_palette(shift: float, colours: Mapping = SOURCE_PALETTE) -> dict:
    """Source colours hue-rotated, desaturated and compressed towards grey."""
    palette = {}
    for c, rgb in colours.items():
        h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in rgb))
        h = (h + 0.12 * shift) % 1.0
        s *= 1 - 0.45 * shift
        v = 0.5 + (v - 0.5) * (1 - 0.35 * shift)
        palette[c] = tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h, s, min(max(v, 0), 1)))
    return palette


def draw_scene(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A train-id label map (H, W) uint8 of one street scene."""
    ys, xs = np.mgrid[0:height, 0:width]
    label = np.full((height, width), SKY, np.uint8)
    horizon = int(height * rng.uniform(0.38, 0.52))
    ground = ys >= horizon

    # Road: a trapezoid from a vanishing point on the horizon; sidewalks, then terrain.
    vx = width * rng.uniform(0.35, 0.65)
    depth = np.maximum(ys - horizon, 0) / max(height - horizon, 1)
    half_road = depth * width * rng.uniform(0.45, 0.7)
    half_walk = half_road + depth * width * rng.uniform(0.15, 0.3)
    dist = np.abs(xs - vx)
    label[ground] = TERRAIN
    label[ground & (dist < half_walk)] = SIDEWALK
    label[ground & (dist < half_road)] = ROAD

    # Buildings and trees along the horizon.
    x = 0
    while x < width:
        w = int(rng.integers(width // 12, width // 4))
        if rng.random() < 0.7:
            top = horizon - int(rng.integers(height // 10, int(height * 0.4)))
            label[max(top, 0) : horizon + 2, x : x + w] = BUILDING
        else:
            cx, cy = x + w / 2, horizon - rng.uniform(0.05, 0.2) * height
            r = w * rng.uniform(0.4, 0.7)
            label[((xs - cx) ** 2 + (ys - cy) ** 2 < r * r) & (ys < horizon + 3)] = VEGETATION
        x += w
    if rng.random() < 0.5:  # a fence along one side of the road
        x0 = int(rng.integers(0, width // 2))
        label[horizon - height // 20 : horizon + 1, x0 : x0 + width // 3] = FENCE

    # Poles with a sign or a traffic light, standing on the sidewalk.
    for _ in range(int(rng.integers(1, 4))):
        bottom = int(rng.integers(horizon + 4, height))
        d = (bottom - horizon) / (height - horizon)
        side = rng.choice([-1, 1])
        px = int(vx + side * (d * width * 0.62))
        if not 0 <= px < width - 2:
            continue
        pw = max(1, int(3 * d))
        top = max(0, int(bottom - (0.6 + 0.5 * d) * height * 0.6))
        label[top:bottom, px : px + pw] = POLE
        box = max(2, int(8 * d))
        label[top : top + box, px - box // 2 : px + pw + box // 2] = (
            SIGN if rng.random() < 0.5 else LIGHT
        )

    # Cars on the road and people on the sidewalks, scaled by perspective.
    for _ in range(int(rng.integers(1, 5))):
        bottom = int(rng.integers(horizon + 6, height))
        d = (bottom - horizon) / (height - horizon)
        h = max(3, int(d * height * 0.35))
        w = int(h * rng.uniform(1.6, 2.4))
        cx = int(vx + rng.uniform(-0.5, 0.5) * 2 * d * width * 0.45)
        label[max(bottom - h, 0) : bottom, max(cx - w // 2, 0) : max(cx + w // 2, 0)] = CAR
    for _ in range(int(rng.integers(0, 4))):
        bottom = int(rng.integers(horizon + 4, height))
        d = (bottom - horizon) / (height - horizon)
        h = max(4, int(d * height * 0.45))
        w = max(2, h // 3)
        px = int(vx + rng.choice([-1, 1]) * d * width * rng.uniform(0.5, 0.8))
        label[max(bottom - h, 0) : bottom, max(px, 0) : max(px + w, 0)] = PERSON
    return label


def _texture(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """Per-pixel brightness modulation: brick stripes, asphalt grain, foliage speckle."""
    height, width = label.shape
    ys, xs = np.mgrid[0:height, 0:width]
    tex = np.zeros(label.shape, np.float32)
    bricks = 18 * ((ys // 3 + (xs // 7) % 2) % 2 - 0.5)
    tex = np.where(label == BUILDING, bricks, tex)
    tex = np.where(label == ROAD, rng.normal(0, 10, label.shape), tex)
    tex = np.where(label == VEGETATION, 25 * (rng.random(label.shape) - 0.5), tex)
    return tex.astype(np.float32)


def render(
    rng: np.random.Generator,
    label: np.ndarray,
    domain: str,
    shift: float = 1.0,
    extra_colours: Mapping[int, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """RGB uint8 image of a label map in the ``source`` or ``target`` appearance;
    ``extra_colours``: source colours of ids beyond the palette's (a look of no class)."""
    colours = {**SOURCE_PALETTE, **(extra_colours or {})}  # the palette's draws come first
    palette = colours if domain == "source" else _target_palette(shift, colours)
    lut = np.zeros((256, 3), np.float32)
    for c, rgb in palette.items():
        # Per-image colour jitter per class, so colour alone is not a perfect cue.
        lut[c] = np.clip(np.asarray(rgb) + rng.normal(0, 12, 3), 0, 255)
    image = lut[label]
    height, width = label.shape
    if domain == "source":
        image = image * rng.uniform(0.9, 1.1) + rng.normal(0, 4, image.shape)
    else:
        image = image + shift * _texture(rng, label)[..., None]
        ramp = np.linspace(rng.uniform(0.6, 0.9), rng.uniform(1.0, 1.2), width)[None, :, None]
        image = image * (1 - shift + shift * ramp) + rng.normal(0, 12 * shift, image.shape)
        image[height - height // 16 :] = (30, 30, 34)  # ego-vehicle hood
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if domain == "target" and shift > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=0.8 * shift))
    return np.asarray(pil)


def to_raw_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> Cityscapes ids (the raw format the converters read)."""
    lut = np.zeros(256, np.uint8)
    for train_id, raw in label_tables.TRAIN_ID_TO_CITYSCAPES_ID.items():
        lut[train_id] = raw
    lut[IGNORE] = EGO_VEHICLE_ID
    return lut[train_ids]


def _save_rgb(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, compress_level=1)


def plain_scene(rng: np.random.Generator, domain: str, shift: float):
    """(train ids, image) of one scene of :func:`draw_scene`'s size."""
    train_ids = draw_scene(rng)
    return train_ids, render(rng, train_ids, domain, shift)


def _write_pair(rng, out_image, out_raw, out_train, domain, shift, scene) -> dict[int, int]:
    train_ids, image = scene(rng, domain, shift)
    if domain == "target":  # the ego-vehicle hood (render's last sixteenth of the rows)
        train_ids[len(train_ids) - len(train_ids) // 16 :] = IGNORE
    _save_rgb(image, out_image)
    conversion.save_label_png(to_raw_ids(train_ids), out_raw)
    conversion.save_label_png(train_ids, out_train)
    return rcs.class_pixel_counts(train_ids)


def generate(
    out: str,
    seed: int = 0,
    num_train: int = 200,
    num_val: int = 50,
    shift: float = 1.0,
    extra_sources: Sequence[str] = (),
) -> None:
    """Writes toy/gta (source, num_train) and toy/cityscapes (target, train + val), then
    toy/<name> (num_train) for each of ``extra_sources`` (:data:`EXTRA_SOURCES`)."""
    unknown = [name for name in extra_sources if name not in EXTRA_SOURCES]
    if unknown:
        raise ValueError(f"unknown toy sources {unknown}; the extra sources: {EXTRA_SOURCES}")
    write_domains(np.random.default_rng(seed), out, num_train, num_val, shift)
    for name in extra_sources:
        # A stream of its own per source: no file depends on which other sources are written.
        rng = np.random.default_rng([seed, 1 + EXTRA_SOURCES.index(name)])
        write = _write_synthia if name == "synthia" else _write_synscapes
        write(rng, os.path.join(out, name), num_train, shift)
        run_converter(name, os.path.join(out, name))


def write_domains(
    rng: np.random.Generator,
    out: str,
    num_train: int,
    num_val: int,
    shift: float,
    scene: Callable = plain_scene,
    names: tuple[str, str] = ("gta", "cityscapes"),
) -> None:
    """Writes out/<names[0]> (source, GTA layout, num_train) and out/<names[1]> (target,
    Cityscapes layout, train + val) with their class statistics; ``scene(rng, domain,
    shift)`` draws and renders one (train ids, image) pair."""
    gta = os.path.join(out, names[0])
    os.makedirs(os.path.join(gta, "labels"), exist_ok=True)
    stats = []
    for i in range(num_train):
        name = f"{i:05d}"
        counts = _write_pair(
            rng,
            os.path.join(gta, "images", name + ".png"),
            os.path.join(gta, "labels", name + ".png"),
            os.path.join(gta, "labels", name + "_labelTrainIds.png"),
            "source",
            shift,
            scene,
        )
        stats.append((os.path.join("labels", name + "_labelTrainIds.png"), counts))
    rcs.write_class_stats(gta, stats)

    city = os.path.join(out, names[1])
    for split, count in (("train", num_train), ("val", num_val)):
        stats = []
        label_dir = os.path.join(city, "gtFine", split, "toycity")
        os.makedirs(label_dir, exist_ok=True)
        for i in range(count):
            stem = f"toycity_{i:06d}_000019"
            counts = _write_pair(
                rng,
                os.path.join(city, "leftImg8bit", split, "toycity", stem + "_leftImg8bit.png"),
                os.path.join(label_dir, stem + "_gtFine_labelIds.png"),
                os.path.join(label_dir, stem + "_gtFine_labelTrainIds.png"),
                "target",
                shift,
                scene,
            )
            rel = os.path.relpath(os.path.join(label_dir, stem + "_gtFine_labelTrainIds.png"), city)
            stats.append((rel, counts))
        if split == "train":
            rcs.write_class_stats(city, stats)


def to_synthia_label(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> a SYNTHIA label (H, W, 3) uint16: the class id in channel 0 (ignore ->
    void), an instance id in channel 1 as the release has (the converter must skip it)."""
    lut = np.full(256, SYNTHIA_VOID_ID, np.uint16)
    for train_id, raw in label_tables.TRAIN_ID_TO_SYNTHIA_ID.items():
        lut[train_id] = raw
    ids = lut[train_ids]
    instance = np.where(np.isin(train_ids, (PERSON, CAR)), 1000, 0).astype(np.uint16)
    return np.stack([ids, instance, np.zeros_like(ids)], -1)


def save_synthia_label(label: np.ndarray, path: str) -> None:
    """A 16-bit RGB PNG (PIL cannot write one; TensorFlow can)."""
    import tensorflow as tf  # noqa: PLC0415  (heavy; only the SYNTHIA source needs it)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(label))


def _write_synthia(rng, directory: str, count: int, shift: float) -> None:
    for i in range(count):
        train_ids = draw_scene(rng)
        image = render(rng, train_ids, "source", shift)
        train_ids[train_ids == TERRAIN] = IGNORE  # SYNTHIA has no terrain class
        _save_rgb(image, os.path.join(directory, "RGB", f"{i:07d}.png"))
        save_synthia_label(
            to_synthia_label(train_ids), os.path.join(directory, "GT", "LABELS", f"{i:07d}.png")
        )
        toy_depth.write_depth(train_ids, directory, i)


def _write_synscapes(rng, directory: str, count: int, shift: float) -> None:
    class_dir = os.path.join(directory, "img", "class")
    os.makedirs(class_dir, exist_ok=True)
    for i in range(1, count + 1):
        train_ids = draw_scene(rng)
        _save_rgb(
            render(rng, train_ids, "source", shift),
            os.path.join(directory, "img", "rgb", f"{i}.png"),
        )
        conversion.save_label_png(to_raw_ids(train_ids), os.path.join(class_dir, f"{i}.png"))


def run_converter(name: str, directory: str) -> None:
    """``python tools/convert_datasets/<name>.py <directory>``: raw ids -> train ids and the
    class statistics, exactly as for the real dataset."""
    tool = os.path.join(REPO, "tools", "convert_datasets", f"{name}.py")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    )
    done = subprocess.run(
        [sys.executable, tool, directory, "--nproc", "1"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {directory} failed:\n{done.stderr[-3000:]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--shift", type=float, default=1.0, help="appearance shift strength")
    parser.add_argument(
        "--extra-sources",
        default="",
        help=f"comma-separated, of {','.join(EXTRA_SOURCES)}: SYNTHIA- / Synscapes-like sources",
    )
    parser.add_argument("--hr", action="store_true", help="also the 512x256 domains (toy_hr.py)")
    parser.add_argument("--hr-num-train", type=int, help="default: --num-train")
    parser.add_argument("--hr-num-val", type=int, help="default: --num-val")
    parser.add_argument("--extra-targets", default="", help="'idd': input_pipeline/toy_idd.py")
    args = parser.parse_args(argv)
    extra = [name for name in args.extra_sources.split(",") if name]
    generate(args.out, args.seed, args.num_train, args.num_val, args.shift, extra)
    written = [f"{args.out}/{name}" for name in ["gta", "cityscapes", *extra]]
    if args.hr:
        from input_pipeline import toy_hr  # noqa: PLC0415  (it imports this module)

        num_train, num_val = args.hr_num_train, args.hr_num_val
        written += toy_hr.generate(
            args.out,
            args.seed,
            args.num_train if num_train is None else num_train,
            args.num_val if num_val is None else num_val,
            args.shift,
        )
    if args.extra_targets:  # a second target (toy_idd.py imports this module)
        from input_pipeline import toy_idd  # noqa: PLC0415

        written += toy_idd.generate_extra_targets(
            args.extra_targets, args.out, args.seed, args.num_train, args.num_val, args.shift
        )
    print(f"wrote toy domains to {', '.join(written)}")


if __name__ == "__main__":
    main()
