"""HRDA on GTA5 -> Cityscapes (Hoyer et al., ECCV 2022; lhoyer/HRDA's
configs/hrda/gtaHR2csHR_hrda.py): DAFormer's self-training (MiT-B5 + DAFormer head, DACS
class-mix, feature distance on thing classes, RCS) on HRDA's multi-resolution student at full
resolution (configs/hrda_recipe.py): 1024x1024 crops of 2560x1440 GTA and 2048x1024
Cityscapes images, a 512x512 detail crop, 40k iterations of batch 2; evaluation by
1024x1024 windows, stride 512. Published: 73.8 mIoU.

    python tools/convert_checkpoint.py mit_b5.pth pretrained/mit_b5 --backbone=mit_b5
    python -m ddb_jax.main --config=configs/hrda_gta2cs.py --workdir=runs/hrda_gta2cs
    ... --config.model.remat=True --config.model.dtype=bfloat16    # on a 24 GB GPU
"""

from configs import gta2cs, hrda_recipe
from ddb_jax.graph import stage_graph

NAME = "hrda_gta2cs"


def setting():
    return hrda_recipe.apply(gta2cs.setting())


def get_config():
    stage = stage_graph.Stage(NAME, "self_training", (("st.mask", "class"),))
    return stage_graph.stage_config(setting(), stage, f"runs/{NAME}")
