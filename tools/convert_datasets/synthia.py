"""Converts SYNTHIA-RAND-CITYSCAPES labels to train ids and writes RCS statistics.

    python tools/convert_datasets/synthia.py data/synthia [--nproc 4]

SYNTHIA's GT/LABELS/*.png are 16-bit RGB PNGs with the class id in the first (red)
channel; PIL truncates 16-bit RGB to 8 bits, so they are decoded with TensorFlow.
Writes GT/LABELS/*_labelTrainIds.png (19-class id space; the 16-class protocol is an
evaluation choice) and the class statistics in data/synthia; with --label-set dada7 also
GT/LABELS/*_labelTrainIds_dada7.png (DADA's 7 classes).

Depth (``--depth auto|yes|no``; auto: when a Depth/ directory exists): each release file
Depth/<name>.png becomes Depth/<name>_depth16.png, one 16-bit channel holding what DADA's
loader reads (``cv2.imread(path, cv2.IMREAD_ANYDEPTH)``: a one-channel PNG as it is, a
colour one converted to gray with OpenCV's fixed-point BT.601 weights, i.e. the shared
value when the channels are equal); the input pipeline turns it into DADA's inverse depth
65536 / (d + 1) (``config.data.source_depth``).
"""

from __future__ import annotations

import functools
import os

import label_set_option
import numpy as np

from ddb_jax import labels as label_tables
from input_pipeline import conversion, transforms

SUFFIX = "_labelTrainIds.png"
DEPTH_SUFFIX = transforms.DEPTH_SUFFIX
# OpenCV's RGB -> gray for 16-bit images: (R*4899 + G*9617 + B*1868 + 2**13) >> 14.
GRAY_WEIGHTS = (4899, 9617, 1868)
GRAY_SHIFT = 14


def read_synthia_ids(path: str) -> np.ndarray:
    """Class ids of a SYNTHIA label: channel 0 of the 16-bit PNG."""
    import tensorflow as tf  # noqa: PLC0415  (heavy; only this converter needs it)

    data = tf.io.read_file(path)
    try:
        label = tf.io.decode_png(data, channels=0, dtype=tf.uint16).numpy()
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(f"{path}: cannot decode PNG ({e.message})") from None
    return label[..., 0].astype(np.int64)


def to_train_ids(path: str, unknown_to_ignore: bool):
    return label_tables.map_ids(
        read_synthia_ids(path),
        label_tables.SYNTHIA_ID_TO_TRAIN_ID,
        label_tables.SYNTHIA_VALID_IDS,
        path,
        unknown_to_ignore,
    )


def read_synthia_depth(path: str) -> np.ndarray:
    """uint16 (H, W): a SYNTHIA depth PNG as ``cv2.imread(path, IMREAD_ANYDEPTH)`` reads it."""
    import tensorflow as tf  # noqa: PLC0415

    try:
        depth = tf.io.decode_png(tf.io.read_file(path), channels=0, dtype=tf.uint16).numpy()
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(f"{path}: cannot decode PNG ({e.message})") from None
    if depth.shape[-1] in (1, 2):  # gray (and alpha)
        return depth[..., 0]
    rgb = depth[..., :3].astype(np.int64)
    gray = (rgb @ np.array(GRAY_WEIGHTS, np.int64) + (1 << (GRAY_SHIFT - 1))) >> GRAY_SHIFT
    return np.minimum(gray, 65535).astype(np.uint16)


def convert_depth(task: tuple[str, str]) -> None:
    """Release depth -> the one-channel 16-bit PNG the input pipeline reads (skips done ones)."""
    import tensorflow as tf  # noqa: PLC0415

    raw, out = task
    if os.path.exists(out):
        return
    depth = read_synthia_depth(raw)
    tf.io.write_file(out + ".tmp", tf.io.encode_png(depth[..., None]))
    os.replace(out + ".tmp", out)


def convert_depths(data_dir: str, mode: str, nproc: int) -> int:
    """Converts Depth/*.png (``mode``: auto, yes, no); returns how many files it covered."""
    depth_dir = os.path.join(data_dir, "Depth")
    if mode == "no" or (mode == "auto" and not os.path.isdir(depth_dir)):
        return 0
    raw = conversion.find_files(depth_dir, ".png", (DEPTH_SUFFIX,))
    if not raw:
        raise FileNotFoundError(f"--depth={mode}: no depth PNGs in {depth_dir}")
    tasks = [(f, f[: -len(".png")] + DEPTH_SUFFIX) for f in raw]
    conversion.parallel_map(convert_depth, tasks, nproc, "synthia depth")
    return len(tasks)


def main() -> None:
    parser = conversion.base_parser(__doc__.splitlines()[0], "synthia")
    parser.add_argument(
        "--depth",
        choices=("auto", "yes", "no"),
        default="auto",
        help="convert Depth/*.png for config.data.source_depth (auto: if Depth/ exists)",
    )
    args = label_set_option.add_flag(parser).parse_args()  # --label-set dada7
    convert_depths(args.data_dir, args.depth, args.nproc)
    raw = conversion.find_files(
        os.path.join(args.data_dir, "GT", "LABELS"), ".png", label_set_option.exclude(SUFFIX)
    )
    tasks = [(f, f[: -len(".png")] + SUFFIX) for f in raw]
    fn = functools.partial(to_train_ids, unknown_to_ignore=args.unknown_to_ignore)
    conversion.convert_and_write_stats(tasks, fn, args.data_dir, args.nproc, "synthia")
    if args.label_set:
        fn = label_set_option.id_mapper(
            args.label_set, "synthia", read_synthia_ids, label_tables.SYNTHIA_VALID_IDS,
            args.unknown_to_ignore,
        )  # fmt: skip
        label_set_option.write(args.label_set, tasks, fn, args.nproc, "synthia")


if __name__ == "__main__":
    main()
