"""Computes the class prototypes of a model on the target training set (stage 'prototypes').

  python tools/calc_prototypes.py --model runs/gta2cs_r1_cu/export --data-root data \\
      --target cityscapes            # -> runs/gta2cs_r1_cu/prototypes.npz
  python tools/calc_prototypes.py --from-pth prototypes/cu_round1/x.pth --out cu.npz

``--from-pth`` converts a file of the reference's ``tools/cal_prototypes/cal_prototype.py``
(a torch tensor, classes x channels) into this project's ``prototypes.npz``. Bad input
(missing model or data, unreadable file) exits with status 1, one line on stderr, and
writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

import ml_collections

from configs import default
from ddb_jax import checkpoints, errors
from ddb_jax.offline import prototype_io, prototype_stage
from ddb_jax.runtime import deadline


class UsageError(errors.UsageError, ValueError):
    """A command-line value is malformed."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model directory (a stage's export/)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--target", default="cityscapes", help="dataset name(s), comma-separated")
    parser.add_argument("--out", default="", help="default: <parent of --model>/prototypes.npz")
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch")
    parser.add_argument("--crop", default="512,512", help="H,W of the training crop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--from-pth", default="", help="convert a reference .pth instead")
    return parser.parse_args(argv)


def parse_crop(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--crop={text!r}: expected H,W, e.g. 512,512") from None
    if h < 1 or w < 1:
        raise UsageError(f"--crop={text!r}: sizes must be positive")
    return h, w


def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """configs/default.py with the stage's keys set from the command line."""
    config = default.get_config()
    config.stage = "prototypes"
    config.checkpoint = args.model
    config.seed = args.seed
    config.model.num_classes = args.num_classes
    config.data.root = args.data_root
    config.data.target = tuple(t for t in args.target.split(",") if t)
    config.data.crop_size = parse_crop(args.crop)
    config.prototypes.num_passes = args.passes
    config.prototypes.batch_size = args.batch_size
    return config


def default_out(model_dir: str) -> str:
    """``<parent of the model dir>/prototypes.npz`` (a stage's workdir, beside export/)."""
    parent = os.path.dirname(os.path.abspath(model_dir.rstrip(os.sep)))
    return os.path.join(parent, prototype_io.PROTOTYPES_FILE)


def convert_pth(args: argparse.Namespace) -> str:
    """Reference .pth -> npz; checked against --model's class count when given."""
    with deadline.storage(args.from_pth, "reading the prototypes"):
        table, counts = prototype_io.load_reference_pth(args.from_pth)
    if args.model:
        with deadline.storage(args.model, "reading the model's config"):
            stored, _ = checkpoints.read_model_config(args.model)
        if stored.num_classes != table.shape[0]:
            raise prototype_io.PrototypeError(
                f"{args.from_pth} has {table.shape[0]} rows but {args.model} predicts "
                f"{stored.num_classes} classes"
            )
    out = args.out or (
        default_out(args.model)
        if args.model
        else os.path.join(os.path.dirname(os.path.abspath(args.from_pth)), "prototypes.npz")
    )
    title = f"prototypes converted from {args.from_pth} (the reference stores no counts)"
    with deadline.storage(out, "writing the prototypes"):
        return prototype_stage.write_prototypes(out, table, counts, args.model, title)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.from_pth:
            out = convert_pth(args)
        else:
            if not args.model:
                raise UsageError("--model MODEL_DIR is required (or --from-pth FILE)")
            config = build_config(args)
            out = args.out or default_out(args.model)
            table, counts = prototype_stage.compute_prototypes(config)  # reads bounded there
            with deadline.storage(out, "writing the prototypes"):
                prototype_stage.write_prototypes(
                    out, table, counts, args.model, prototype_stage.describe(config)
                )
    except Exception as err:  # a bad file or flag: one line (exit 1 or 2); a bug: traceback
        return errors.report(err)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
