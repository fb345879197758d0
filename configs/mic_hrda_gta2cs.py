"""MIC on HRDA, GTA5 -> Cityscapes (Hoyer et al., CVPR 2023; lhoyer/MIC's
seg/configs/mic/gtaHR2csHR_mic_hrda.py): HRDA's stage (configs/hrda_gta2cs.py) with masked
image consistency (configs/mic_recipe.py) at full resolution: 64x64 blocks. Published: 75.9
mIoU.

    python -m ddb_jax.main --config=configs/mic_hrda_gta2cs.py --workdir=runs/mic_hrda_gta2cs
"""

from configs import hrda_gta2cs, mic_recipe


def get_config():
    return mic_recipe.apply(hrda_gta2cs.get_config(), mic_recipe.FULL_RESOLUTION_BLOCK)
