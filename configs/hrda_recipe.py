"""HRDA's training recipe as ddb-jax settings (lhoyer/HRDA, configs/hrda/gtaHR2csHR_hrda.py;
the same file in lhoyer/MIC): DAFormer's recipe (configs/daformer_recipe.py) on a
multi-resolution student, at full resolution.

What it changes from DAFormer: the segmentor (``config.model.hrda``): a context crop (the
whole 1024x1024 training crop at half resolution) and a 512x512 detail crop at full
resolution, offsets divisible by 8, fused by a learned class-wise scale attention; the
detail loss weight 0.1; pseudo-labels from the context and overlapping detail windows
(512, stride 256). The data at full resolution: GTA resized to 2560x1440 (SYNTHIA
2560x1520), Cityscapes 2048x1024, 1024x1024 crops; rare class sampling with a minimum crop
ratio of 2.0 (four times the pixels of DAFormer's crops); the pseudo-label margins of the
*original* target image (30 top, 240 bottom, 30 left and right rows and columns) instead of
DAFormer's crop rows; evaluation by 1024x1024 windows with stride 512 over 1024x2048, each
window a context + detail fusion. The feature distance runs on the context (HRDA's
``feature_scale=0.5``). Its schedule and optimiser are DAFormer's.
"""

import ml_collections

from configs import daformer_recipe

FULL_RESOLUTION = {"gta": (2560, 1440), "synthia": (2560, 1520), "cityscapes": (2048, 1024)}
CROP = (1024, 1024)
DETAIL_CROP = (512, 512)
PSEUDO_MARGINS = (30, 240, 30, 30)  # top, bottom, left, right


def apply(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with HRDA's recipe on DAFormer's (MiT-B5, DAFormer head, from ImageNet)."""
    config = daformer_recipe.apply(config)
    return apply_multi_resolution(config)


def apply_multi_resolution(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """HRDA's segmentor, data and evaluation on any setting (also DeepLabV2 or DDB's)."""
    config.model.hrda.enabled = True
    config.model.hrda.detail_crop = DETAIL_CROP
    config.model.hrda.crop_divisible = 8
    config.model.hrda.detail_loss_weight = 0.1
    config.model.hrda.attention_classwise = True
    config.model.hrda.slide_detail = True
    datasets = (*config.data.source, *config.data.target)
    config.data.resize_scales = {
        name: FULL_RESOLUTION[name] for name in datasets if name in FULL_RESOLUTION
    }
    config.data.crop_size = CROP
    config.data.rcs_min_crop_ratio = 2.0
    config.data.target_pseudo_margins = PSEUDO_MARGINS
    config.st.pseudo_weight_ignore_top = 0
    config.st.pseudo_weight_ignore_bottom = 0
    config.eval.mode = "slide"
    config.eval.crop_size = CROP
    config.eval.stride = (512, 512)
    return config
