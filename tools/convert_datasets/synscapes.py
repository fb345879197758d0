"""Converts Synscapes class maps (Cityscapes ids) to train ids and writes RCS statistics.

    python tools/convert_datasets/synscapes.py data/synscapes [--nproc 4]

Reads data/synscapes/img/class/*.png, writes img/class/*_gt_labelTrainIds.png (the
reference's name) and the class statistics JSON files in data/synscapes.
"""

from __future__ import annotations

import functools
import os

from input_pipeline import conversion

SUFFIX = "_gt_labelTrainIds.png"


def main() -> None:
    args = conversion.base_parser(__doc__.splitlines()[0], "synscapes").parse_args()
    class_dir = os.path.join(args.data_dir, "img", "class")
    raw = conversion.find_files(class_dir, ".png", ("_labelTrainIds.png", "_gt_color.png"))
    tasks = [(f, f[: -len(".png")] + SUFFIX) for f in raw]
    fn = functools.partial(
        conversion.cityscapes_ids_to_train_ids, unknown_to_ignore=args.unknown_to_ignore
    )
    conversion.convert_and_write_stats(tasks, fn, args.data_dir, args.nproc, "synscapes")


if __name__ == "__main__":
    main()
