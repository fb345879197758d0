"""Throughput of the source+target training pipeline on generated full-size PNGs.

    python benchmarks/input_pipeline.py [--count 32] [--batch 4] [--steps 20]
        [--source-size 1914x1052] [--target-size 2048x1024]

Writes ``count`` GTA-like and Cityscapes-like PNGs (noisy, so decoding cost is
realistic) to a temp dir, then times the pipeline after one warm-up batch. One
"image" is one (source, target) pair of the batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# This file shares its name with the package: drop benchmarks/ from the import path.
sys.path = [
    p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))
]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from configs.default import get_config  # noqa: E402
from input_pipeline import train  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def write_fake_data(root: str, count: int, source_size, target_size) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        for layout, (w, h) in (("gta", source_size), ("cityscapes", target_size)):
            base = np.repeat(np.linspace(0, 255, w, dtype=np.uint8)[None], h, 0)
            image = np.stack([base, base[::-1], rng.integers(0, 255, (h, w), np.uint8)], -1)
            label = ((np.arange(w)[None] // 97 + np.arange(h)[:, None] // 61) % 19).astype(np.uint8)
            if layout == "gta":
                paths = (
                    f"{root}/gta/images/{i:05d}.png",
                    f"{root}/gta/labels/{i:05d}_labelTrainIds.png",
                )
            else:
                stem = f"{root}/cityscapes/%s/train/bench/bench_{i:06d}_000019"
                paths = (
                    stem % "leftImg8bit" + "_leftImg8bit.png",
                    stem % "gtFine" + "_gtFine_labelTrainIds.png",
                )
            for p in paths:
                os.makedirs(os.path.dirname(p), exist_ok=True)
            Image.fromarray(image).save(paths[0], compress_level=1)
            Image.fromarray(label, mode="L").save(paths[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--source-size", type=_size, default=(1914, 1052))
    parser.add_argument("--target-size", type=_size, default=(2048, 1024))
    parser.add_argument("--crop", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        write_fake_data(root, args.count, args.source_size, args.target_size)
        cfg = get_config().data
        cfg.root, cfg.crop_size = root, (args.crop, args.crop)
        it = train.make_train_dataset(cfg, args.batch, seed=0).as_numpy_iterator()
        next(it)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        elapsed = time.perf_counter() - start
    pairs = args.steps * args.batch
    print(
        f"source {args.source_size} + target {args.target_size}, crop {args.crop}, "
        f"batch {args.batch}, {os.cpu_count()} CPUs: {pairs / elapsed:.2f} image pairs/s "
        f"({elapsed / args.steps * 1000:.0f} ms/batch)"
    )


if __name__ == "__main__":
    main()
