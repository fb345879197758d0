"""HRDA on the toy high-resolution domains: single-resolution students at half and at full
resolution, HRDA and MIC on HRDA, beside the source-only row (config.graph = 'hrda',
ddb_jax/graph/hrda.py).

    python -m input_pipeline.toy --out data/toy --hr
    python -m ddb_jax.main --config=configs/hrda_demo.py --workdir=runs/hrda_demo
    python -m ddb_jax.main --config=configs/hrda_demo.py:5 --workdir=/tmp/x   # 5 steps each

The toy HR domains (512x256) hold poles and fence posts 5-6 px wide, most of a stride-8
cell at full resolution and a minority of one at half resolution, and a class decided by a
marker across the top of the image, more than a detail crop away from where the class is
(input_pipeline/toy_hr.py). HRDA at toy scale: 256x256 crops of the full-resolution images
(the whole height), a 128x128 detail crop, the context at 128x128, overlapping detail
windows (stride 64) for pseudo-labels and evaluation, the whole image at once (HRDA's
1024x1024 evaluation windows would hide the marker from half of them at this size). The
single-resolution rows: 'single' trains and evaluates on the images at half resolution
(128x128 crops, the context alone), 'single_hr' on the images at full resolution with
crops of the detail crop's size (128x128, the detail alone), evaluated on the whole image.
DAFormer's self-training (EMA 0.999, class-mix, the batch's coins) on the tiny ResNet-18 +
DLV2 of the other demos, from random weights (no ImageNet model at this size, so no
feature distance), 600 steps per stage at AdamW 2e-3 (at 300 steps and 1e-3 no model
learnt a pole; benchmarks/RESULTS.md, "HRDA on the toy high-resolution domains").
"""

from configs import default, hrda_recipe, mic_recipe, toy_runs

NAME = "hrda_demo"
STEPS = 600
FULL = (512, 256)


def setting(steps: int = STEPS):
    config = default.get_config()
    config.graph = "hrda"
    config.model.backbone = "resnet18_v1c"
    config.model.head = "dlv2"
    config.model.base_channels = 16
    config.model.head_channels = 32
    config.model.conv_impl = "im2col"
    config.data.source = ("toy_hr_source",)
    config.data.target = ("toy_hr_target",)
    config = hrda_recipe.apply_multi_resolution(config)
    config.model.hrda.detail_crop = (128, 128)
    config.data.resize_scales = {"toy_hr_source": FULL, "toy_hr_target": FULL}
    config.data.crop_size = (256, 256)
    config.data.rcs_min_crop_ratio = 0.5
    config.data.target_pseudo_margins = (4, 16, 4, 4)
    # The whole 512x256 image in one window (HRDA's own inference still runs the detail in
    # overlapping windows): 256x256 windows would hide the distant marker from half of them.
    config.eval.mode = "whole"
    config.st.mask = "class"
    config.st.ema_alpha = 0.999
    config.st.coins_per_batch = config.st.blur_2d = config.st.classes_from_batch = True
    mic_recipe.apply(config, block_size=16)
    config.mic.enabled = False  # the 'mic_hrda' stage turns it on
    config.batch_size = 2
    toy_runs.cadence(config, steps)
    config.optim.lr = 2e-3
    config.optim.warmup_iters = max(1, steps // 10)
    config.baselines = ("source_only",)
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
