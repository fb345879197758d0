"""Converts Cityscapes gtFine label ids to train ids and writes RCS statistics.

    python tools/convert_datasets/cityscapes.py data/cityscapes [--nproc 4]

Reads gtFine/{train,val}/*/*_gtFine_labelIds.png (shipped in gtFine_trainvaltest.zip;
they are the rendering of the polygons, so mapping their ids equals cityscapesscripts'
json2labelImg with trainIds), writes *_gtFine_labelTrainIds.png next to them and the
class statistics of the train split in data/cityscapes; with --label-set mtaf7 also
*_gtFine_labelTrainIds_mtaf7.png (MTAF's 7 classes; dada7 uses the same table).
"""

from __future__ import annotations

import functools
import os

import label_set_option

from input_pipeline import conversion

RAW_SUFFIX = "_gtFine_labelIds.png"
SUFFIX = "_gtFine_labelTrainIds.png"


def main() -> None:
    parser = conversion.base_parser(__doc__.splitlines()[0], "cityscapes")
    args = label_set_option.add_flag(parser).parse_args()
    fn = functools.partial(
        conversion.cityscapes_ids_to_train_ids, unknown_to_ignore=args.unknown_to_ignore
    )
    for split in ("train", "val"):
        raw = conversion.find_files(os.path.join(args.data_dir, "gtFine", split), RAW_SUFFIX)
        tasks = [(f, f[: -len(RAW_SUFFIX)] + SUFFIX) for f in raw]
        if split == "train":
            conversion.convert_and_write_stats(tasks, fn, args.data_dir, args.nproc, split)
        else:
            conversion.convert_labels(tasks, fn, args.nproc, split)
        label_set_option.convert_cityscapes_ids(args, "cityscapes", tasks, split)


if __name__ == "__main__":
    main()
