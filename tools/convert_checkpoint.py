"""Converts a PyTorch checkpoint (DDB, mmseg segmentor, or ImageNet backbone) to a model directory.

  python tools/convert_checkpoint.py weights/gta2cs/r2-ckd-pro-bs1x4/weight.pth runs/ddb_r2_ckd
  python tools/convert_checkpoint.py resnet101_v1c.pth pretrained/resnet101_v1c
  python tools/convert_checkpoint.py mit_b5.pth pretrained/mit_b5 --backbone=mit_b5 --head=daformer
  python tools/convert_checkpoint.py segformer.pth runs/segformer_b0 --backbone=mit_b0 \
      --head=mmseg_segformer
  python tools/convert_checkpoint.py gta2cityscapes_advent.pth runs/advent \
      --backbone=resnet101_caffe
  python tools/convert_checkpoint.py DeepLab_resnet_pretrained_imagenet.pth \
      pretrained/advent_imagenet --backbone=resnet101_caffe
  python tools/convert_checkpoint.py gta2cityscapes_mapillary_mtkt.pth runs/mtaf_mtkt \
      --backbone=resnet101_caffe --num-classes=7
  python tools/convert_checkpoint.py from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl \
      runs/proda_stage3 --backbone=resnet101_proda --allow-pickle
  python tools/convert_checkpoint.py resnet101-5d3b4d8f.pth pretrained/proda_imagenet \
      --backbone=resnet101_proda
  python tools/convert_checkpoint.py gtaHR2csHR_mic_hrda.pth runs/mic_hrda --backbone=mit_b5
  python tools/convert_checkpoint.py gtaHR2csHR_hrda_r101.pth runs/hrda_dlv2 \
      --backbone=resnet101_v1c --head=dlv2_sum

MiT heads: ``segformer`` (DAFormer/NVlabs all-MLP head), ``daformer`` (default) and
``mmseg_segformer`` (mmseg 0.x's SegformerHead); a segmentor checkpoint holding another
head than ``--head`` fails with the value it needs.

HRDA (and MIC(HRDA)) checkpoints are told by their scale-attention head
(``decode_head.scale_attention.*``): the model directory gets ``hrda.enabled=True`` (with the
attention's width and class-wise output from the file); their single-scale head is
``daformer`` (MiT) or ``dlv2_sum`` (DAFormer's DLV2Head, ResNetV1c), which ``--head`` must
name.

ADVENT's and MTAF's networks (``--backbone=resnet101_caffe``) take their levels from the
file, and MTAF's MTKT its classifier heads (``aux_classifier_list`` / ``main_classifier_list``:
``advent_heads`` in model.json, head 0 the one evaluated); MTAF's files have 7 classes.

A DDB checkpoint (or a DAFormer/HRDA/MIC one: ``model``, ``ema_model``, ``imnet_model``)
holds several models; ``--which`` picks one (default: the deployable
student, ``stu_model`` for CKD and ``model`` for self-training). Every tensor must be
used exactly once; on any mismatch the error lists missing/unexpected keys and shape
conflicts and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from configs import default
from ddb_jax import checkpoints, errors, models
from ddb_jax.convert import convert_torch_checkpoint
from ddb_jax.convert.torch_io import MODEL_PREFIXES
from ddb_jax.runtime import deadline


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="input .pth file")
    parser.add_argument("out", help="output model directory")
    parser.add_argument("--which", choices=MODEL_PREFIXES, default=None)
    parser.add_argument(
        "--backbone",
        default="resnet101_v1c",
        help="e.g. resnet101_v1c, mit_b5, resnet101_caffe (ADVENT's DeepLabV2), "
        "resnet101_proda (ProDA's)",
    )
    parser.add_argument(
        "--head",
        default=None,
        help="dlv2 | dlv2_sum | segformer | daformer | mmseg_segformer | advent_aspp | proda_aspp",
    )
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--head-channels", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load files that hold Python objects besides tensors (only for files you trust)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    model_cfg = default.get_model_config()
    model_cfg.backbone = args.backbone
    model_cfg.head = args.head or models.default_head(args.backbone)
    model_cfg.num_classes = args.num_classes
    if args.head_channels is not None:
        model_cfg.head_channels = args.head_channels
    try:
        models.build_model(model_cfg)
        with deadline.storage(args.checkpoint, "reading the checkpoint"):
            variables, model_cfg, provenance = convert_torch_checkpoint(
                args.checkpoint, model_cfg, which=args.which, allow_pickle=args.allow_pickle
            )
        with deadline.storage(args.out, "writing the model directory"):
            checkpoints.save_model_dir(
                args.out, variables, model_cfg, provenance, overwrite=args.overwrite
            )
    except Exception as err:  # a bad file or flag: one line (exit 1 or 2); a bug: traceback
        return errors.report(err)
    hrda = model_cfg.get("hrda")
    wrapper = "HRDA " if hrda is not None and hrda.get("enabled", False) else ""
    print(
        f"wrote {args.out}: {provenance['kind']} {wrapper}{model_cfg.backbone}+{model_cfg.head} "
        f"from {args.checkpoint} (prefix {provenance['prefix'] or 'none'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
