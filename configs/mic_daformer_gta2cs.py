"""MIC on DAFormer, GTA5 -> Cityscapes (Hoyer et al., CVPR 2023; lhoyer/MIC's
seg/experiments.py, experiment 81, the daformer_sepaspp/mitb5 row): DAFormer's one
self-training stage (configs/daformer_gta2cs.py: MiT-B5 + DAFormer head, DACS class-mix,
feature distance on thing classes, RCS at T 0.01, pseudo-label crop, AdamW 6e-5 with the
head at 10x, 40k iterations of batch 2, 512x512 crops of half-resolution images) with
masked image consistency: the colour-augmented target, 32x32 blocks hidden at ratio 0.7
(MIC halves its 64-pixel blocks for half resolution), loss weight 1.

    python tools/convert_checkpoint.py mit_b5.pth pretrained/mit_b5 --backbone=mit_b5
    python -m ddb_jax.main --config=configs/mic_daformer_gta2cs.py --workdir=runs/mic_daformer

MIC on HRDA (its published 75.9): configs/mic_hrda_gta2cs.py.
"""

from configs import daformer_gta2cs, mic_recipe

NAME = "mic_daformer_gta2cs"


def get_config():
    return mic_recipe.apply(daformer_gta2cs.get_config(), mic_recipe.HALF_RESOLUTION_BLOCK)
