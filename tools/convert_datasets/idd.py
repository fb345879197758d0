"""Converts IDD (India Driving Dataset) fine ids to train ids and writes RCS statistics.

    python tools/convert_datasets/idd.py data/idd [--nproc 4] [--label-set mtaf7]

Reads gtFine/{train,val}/<sequence>/*_gtFine_labelids.png: the 40 fine ids (0..39) that
IDD's own tool writes (``createLabels.py --id-type id``) and MTAF's idd.py reads. Writes
*_gtFine_labelTrainIds.png next to them (IDD's csTrainId column, ddb_jax/labels.py; the
IDD-only classes are 255) and the class statistics of the train split in data/idd; with
--label-set mtaf7 also *_gtFine_labelTrainIds_mtaf7.png (MTAF's idd_list/info7class.json).
Images stay where IDD puts them: leftImg8bit/{train,val}/<sequence>/*_leftImg8bit.png.
"""

from __future__ import annotations

import functools
import os

import label_set_option

from ddb_jax import labels as label_tables
from input_pipeline import conversion

RAW_SUFFIX = "_gtFine_labelids.png"
SUFFIX = "_gtFine_labelTrainIds.png"


def to_train_ids(path: str, unknown_to_ignore: bool):
    return label_tables.map_ids(
        conversion.read_label_png(path),
        label_tables.IDD_ID_TO_TRAIN_ID,
        label_tables.IDD_VALID_IDS,
        path,
        unknown_to_ignore,
    )


def main() -> None:
    parser = conversion.base_parser(__doc__.splitlines()[0], "idd")
    args = label_set_option.add_flag(parser).parse_args()
    fn = functools.partial(to_train_ids, unknown_to_ignore=args.unknown_to_ignore)
    set_fn = None
    if args.label_set:
        set_fn = label_set_option.id_mapper(
            args.label_set,
            "idd",
            conversion.read_label_png,
            label_tables.IDD_VALID_IDS,
            args.unknown_to_ignore,
        )
    for split in ("train", "val"):
        raw = conversion.find_files(os.path.join(args.data_dir, "gtFine", split), RAW_SUFFIX)
        tasks = [(f, f[: -len(RAW_SUFFIX)] + SUFFIX) for f in raw]
        if split == "train":
            conversion.convert_and_write_stats(tasks, fn, args.data_dir, args.nproc, split)
        else:
            conversion.convert_labels(tasks, fn, args.nproc, split)
        if set_fn is not None:
            label_set_option.write(args.label_set, tasks, set_fn, args.nproc, split)


if __name__ == "__main__":
    main()
