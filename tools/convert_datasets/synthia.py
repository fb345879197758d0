"""Converts SYNTHIA-RAND-CITYSCAPES labels to train ids and writes RCS statistics.

    python tools/convert_datasets/synthia.py data/synthia [--nproc 4]

SYNTHIA's GT/LABELS/*.png are 16-bit RGB PNGs with the class id in the first (red)
channel; PIL truncates 16-bit RGB to 8 bits, so they are decoded with TensorFlow.
Writes GT/LABELS/*_labelTrainIds.png (19-class id space; the 16-class protocol is an
evaluation choice) and the class statistics in data/synthia.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ddb_jax import labels as label_tables
from input_pipeline import conversion

SUFFIX = "_labelTrainIds.png"


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


def main() -> None:
    args = conversion.base_parser(__doc__.splitlines()[0], "synthia").parse_args()
    raw = conversion.find_files(os.path.join(args.data_dir, "GT", "LABELS"), ".png", (SUFFIX,))
    tasks = [(f, f[: -len(".png")] + SUFFIX) for f in raw]
    fn = functools.partial(to_train_ids, unknown_to_ignore=args.unknown_to_ignore)
    conversion.convert_and_write_stats(tasks, fn, args.data_dir, args.nproc, "synthia")


if __name__ == "__main__":
    main()
