"""MIC's published masking as ddb-jax settings (lhoyer/MIC's seg/experiments.py, mask_mode
'separatetrgaug'): the host method's teacher and pseudo-label weights, the colour-augmented
target with blocks hidden at ratio 0.7, loss weight 1. The block is 64 pixels with HRDA at
full resolution and 32 for 512x512 crops of half-resolution images ("use half the patch
size when training with half resolution")."""

import ml_collections

HALF_RESOLUTION_BLOCK = 32
FULL_RESOLUTION_BLOCK = 64


def apply(config: ml_collections.ConfigDict, block_size: int) -> ml_collections.ConfigDict:
    config.mic.enabled = True
    config.mic.block_size = block_size
    config.mic.mask_ratio = 0.7
    config.mic.weight = 1.0
    return config
