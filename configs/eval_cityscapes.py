"""Evaluate a model directory on Cityscapes val (whole image at 1024x512, as the reference).

  python tools/convert_checkpoint.py weights/gta2cs/r2-ckd-pro-bs1x4/weight.pth runs/ddb_gta2cs
  python -m ddb_jax.main --config=configs/eval_cityscapes.py --workdir=runs/eval \
      --config.checkpoint=runs/ddb_gta2cs
"""

from configs import default


def get_config():
    config = default.get_config()
    config.stage = "evaluate"
    config.data.target = ("cityscapes",)
    config.eval.mode = "whole"
    return config
