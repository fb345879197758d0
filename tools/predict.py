"""Predicts segmentation maps for image files: no labels needed.

  python tools/predict.py runs/gta2cs/r2_ckd/export photos/ --out runs/pred
  python tools/predict.py weight.pth 'frames/*.jpg' --out runs/pred --backbone=resnet101_v1c
  python tools/predict.py runs/ddb_gta2cs data/cityscapes/leftImg8bit/test --out runs/cs_test \
      --format cityscapes                    # + labelIds/<city>/*.png for the benchmark server

MODEL is a model directory (a stage's export/, tools/convert_checkpoint.py's output) or a
DDB / mmseg .pth, converted in memory (--which, --backbone, --head, --num-classes,
--head-channels as tools/convert_checkpoint.py). INPUTs are image files, folders (searched
recursively) or glob patterns. Per image: OUT/color/NAME.png (Cityscapes palette; with
--label-set, that set's: a 7-class model's mtaf7 or dada7), OUT/overlay/NAME.png,
OUT/trainIds/NAME.png, and with --format cityscapes OUT/labelIds/CITY/NAME.png (label ids;
zip that folder alone for the server).

Inference is the evaluate stage's (--mode whole|slide|whole_corners, --crop, --stride, --flip as
config.eval); --scale resizes each image keep-ratio before inference, as the eval pipeline
does for a dataset: LONG,SHORT, a dataset name (its evaluation scale: cityscapes is
1024,512), or none (default; cityscapes with --format cityscapes). Predictions come back at
each image's own size. A file that cannot be read or decoded is named and skipped (counted
at the end; exit 1 if no image was written); --strict stops at it instead (exit 1). Usage
errors (a missing input, a bad flag, names --format cityscapes cannot hold, an OUT that an
INPUT reaches: a folder holding it, a pattern matching it, whose next run would read the
predictions as images) exit 2 before any work. An OUT that cannot be created and written
and a gs:// bucket that does not exist are found before any work too, and exit 1. Every
error is one line that names its path. A bucket that stops answering ends the run within
DDB_JAX_STORAGE_TIMEOUT_S seconds (default 180), in one line, exit 1.
"""

from __future__ import annotations

import argparse
import sys

from ddb_jax import errors
from ddb_jax.runtime import deadline


def pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not H,W (two integers)") from None
    if a <= 0 or b <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be positive")
    return a, b


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use 1 or more")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in 0..1")
    return value


class UsageError(errors.UsageError):
    """A bad command line; :func:`main` prints it in one line and returns 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors reach :func:`main` (one line, exit status 2) instead of exiting
    with a usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    from ddb_jax.convert.torch_io import MODEL_PREFIXES
    from ddb_jax.label_sets import LABEL_SETS

    parser = Parser(
        prog="tools/predict.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="model directory or .pth file")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs")
    parser.add_argument("--out", "-o", required=True, help="output folder (local or gs://)")
    parser.add_argument("--format", choices=("default", "cityscapes"), default="default")
    parser.add_argument("--mode", choices=("whole", "slide", "whole_corners"), default="whole")
    parser.add_argument("--crop", type=pair, default=(512, 512), help="slide window H,W")
    parser.add_argument("--stride", type=pair, default=(341, 341), help="slide stride H,W")
    parser.add_argument("--flip", action="store_true", help="average with the flipped image")
    parser.add_argument(
        "--scale", default=None, help="LONG,SHORT | none | dataset name (e.g. cityscapes)"
    )
    parser.add_argument("--batch-size", type=positive, default=1)
    parser.add_argument("--alpha", type=fraction, default=0.5, help="overlay colour opacity")
    parser.add_argument(
        "--label-set", default="", choices=("", *sorted(LABEL_SETS)),
        help="the model's class space (config.data.label_set), for the colours",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad image")
    parser.add_argument("--workers", type=positive, default=4, help="decode/encode threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    pth = parser.add_argument_group("a .pth MODEL (as tools/convert_checkpoint.py)")
    pth.add_argument("--which", choices=MODEL_PREFIXES, default=None)
    pth.add_argument("--backbone", default="resnet101_v1c")
    pth.add_argument(
        "--head", default=None, help="dlv2 | segformer | daformer | mmseg_segformer | advent_aspp"
    )
    pth.add_argument("--num-classes", type=positive, default=19)
    pth.add_argument("--head-channels", type=positive, default=None)
    pth.add_argument("--allow-pickle", action="store_true")
    args = parser.parse_args(argv)
    if args.scale is None:
        args.scale = "cityscapes" if args.format == "cityscapes" else "none"
    return args


def pth_model_config(args: argparse.Namespace):
    from configs import default
    from ddb_jax import models

    model_cfg = default.get_model_config()
    model_cfg.backbone = args.backbone
    model_cfg.head = args.head or models.default_head(args.backbone)
    model_cfg.num_classes = args.num_classes
    if args.head_channels is not None:
        model_cfg.head_channels = args.head_channels
    return model_cfg


def check_buckets(args: argparse.Namespace) -> None:
    """Names a gs:// MODEL's or INPUT's missing bucket at once: listing it would fail with
    an error that names no path."""
    from ddb_jax import paths

    checked = set()
    for path, what in [(args.model, "model"), *((p, "input") for p in args.inputs)]:
        if paths.bucket_of(path) not in checked:
            checked.add(paths.bucket_of(path))
            with deadline.storage(path, "checking the bucket"):
                paths.check_bucket(path, what)


def run(args: argparse.Namespace) -> int:
    """Checks everything it can before loading the model (inputs, names, MODEL, OUT), then
    predicts and writes every image; returns the exit status."""
    from tqdm import tqdm

    from ddb_jax import label_sets, paths
    from ddb_jax.inference import image_files, image_input, predict
    from ddb_jax.inference.errors import ImageError, InputError
    from ddb_jax.inference.outputs import OutputLayout
    from ddb_jax.inference.predictor import Predictor, load_model

    check_buckets(args)
    scale = image_input.scale_of(args.scale)
    with deadline.storage(args.inputs[0], "listing the input images"):
        files = image_files.list_images(args.inputs)
    layout = OutputLayout(args.out, args.format == "cityscapes", args.alpha, args.label_set)
    layout.check_names(files)
    with deadline.storage(args.model, "looking for the model"):
        if not (paths.isdir(args.model) or paths.isfile(args.model)):
            raise InputError(f"{args.model}: no such model directory or .pth file")
    with deadline.storage(args.out, "checking --out"):
        layout.check_location(args.inputs)
    with deadline.storage(args.model, "reading the model"):
        variables, model_cfg, description = load_model(
            args.model, pth_model_config(args), args.which, args.allow_pickle, args.dtype
        )
    if args.format == "cityscapes" and model_cfg.num_classes != 19:
        raise InputError(
            f"--format cityscapes needs a 19-class model; {args.model} has {model_cfg.num_classes}"
        )
    classes = label_sets.label_set(args.label_set).num_classes if args.label_set else None
    if classes is not None and model_cfg.num_classes != classes:
        raise InputError(
            f"--label-set {args.label_set} has {classes} classes; {args.model} has "
            f"{model_cfg.num_classes}"
        )
    predictor = Predictor.from_model(
        variables, model_cfg, mode=args.mode, crop=args.crop, stride=args.stride, flip=args.flip
    )
    settings = f"{args.mode}{' + flip' if args.flip else ''}, scale {scale or 'none'}"
    print(f"{len(files)} image(s); {description}; {settings}", file=sys.stderr)
    bar = tqdm(total=len(files), unit="img", disable=True if args.no_progress else None)
    try:
        counts = predict.predict_files(
            predictor, files, layout, scale=scale, batch_size=args.batch_size,
            strict=args.strict, workers=args.workers,
            on_skip=lambda message: bar.write(f"skipped {message}", file=sys.stderr),
            progress=bar.update,
        )  # fmt: skip
    except (ImageError, OSError) as err:
        bar.close()
        if isinstance(err, ImageError):
            print(f"error: {err} (--strict)", file=sys.stderr)
        else:
            print(f"error: writing the outputs failed: {errors.one_line(err)}", file=sys.stderr)
        return 1
    bar.close()
    skipped = len(counts.skipped)
    print(
        f"wrote {counts.written} image(s) to {args.out}; skipped {skipped}"
        + (" (named above)" if skipped else "")
    )
    return 1 if skipped and not counts.written else 0


def main(argv: list[str]) -> int:
    """Runs the tool; every user error ends in one ``error: ...`` line: exit 2 for a usage
    error, 1 for a file, bucket or model problem (:mod:`ddb_jax.errors`)."""
    try:
        return run(parse_args(argv))
    except (errors.UsageError, errors.InputError, OSError) as err:
        return errors.report(err)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
