"""Converts GTA5 labels (Cityscapes ids) to train ids and writes the RCS class statistics.

    python tools/convert_datasets/gta.py data/gta [--nproc 4]

Reads data/gta/labels/*.png, writes data/gta/labels/*_labelTrainIds.png and
data/gta/{sample_class_stats,sample_class_stats_dict,samples_with_class}.json; with
--label-set mtaf7 also labels/*_labelTrainIds_mtaf7.png (MTAF's 7 classes).
"""

from __future__ import annotations

import functools
import os

import label_set_option

from input_pipeline import conversion

SUFFIX = "_labelTrainIds.png"


def main() -> None:
    parser = conversion.base_parser(__doc__.splitlines()[0], "gta")
    args = label_set_option.add_flag(parser).parse_args()
    raw = conversion.find_files(
        os.path.join(args.data_dir, "labels"), ".png", label_set_option.exclude(SUFFIX)
    )
    tasks = [(f, f[: -len(".png")] + SUFFIX) for f in raw]
    fn = functools.partial(
        conversion.cityscapes_ids_to_train_ids, unknown_to_ignore=args.unknown_to_ignore
    )
    conversion.convert_and_write_stats(tasks, fn, args.data_dir, args.nproc, "gta")
    label_set_option.convert_cityscapes_ids(args, "gta", tasks, "gta")


if __name__ == "__main__":
    main()
