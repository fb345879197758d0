"""Evaluate an HRDA or MIC(HRDA) model directory on Cityscapes val at full resolution, as
HRDA's test_cfg does: the 2048x1024 image in 1024x1024 windows with stride 512, batched,
each window the model's context + detail fusion.

  python tools/convert_checkpoint.py gtaHR2csHR_hrda_246ef/latest.pth runs/hrda_released \
      --backbone=mit_b5 --head=daformer
  python -m ddb_jax.main --config=configs/eval_cityscapes_hr.py --workdir=runs/eval_hrda \
      --config.checkpoint=runs/hrda_released
"""

from configs import default, hrda_recipe


def get_config():
    config = default.get_config()
    config.stage = "evaluate"
    config.data.target = ("cityscapes",)
    config.data.resize_scales = {"cityscapes": hrda_recipe.FULL_RESOLUTION["cityscapes"]}
    config.eval.mode = "slide"
    config.eval.crop_size = hrda_recipe.CROP
    config.eval.stride = (512, 512)
    return config
