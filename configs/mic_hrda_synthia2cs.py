"""MIC on HRDA, SYNTHIA -> Cityscapes (lhoyer/MIC's SYNTHIA row): configs/hrda_synthia2cs.py
with masked image consistency (configs/mic_recipe.py), 64x64 blocks. Published: 67.3 mIoU16.

    python -m ddb_jax.main --config=configs/mic_hrda_synthia2cs.py --workdir=runs/mic_hrda_syn
"""

from configs import hrda_synthia2cs, mic_recipe


def get_config():
    return mic_recipe.apply(hrda_synthia2cs.get_config(), mic_recipe.FULL_RESOLUTION_BLOCK)
