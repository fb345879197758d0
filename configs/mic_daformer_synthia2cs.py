"""MIC on DAFormer, SYNTHIA -> Cityscapes: DAFormer's stage on SYNTHIA (configs/synthia2cs.py's
source and mIoU16/13, DAFormer's recipe) with masked image consistency (configs/mic_recipe.py)
for 512x512 crops of half-resolution images: 32x32 blocks.

    python -m ddb_jax.main --config=configs/mic_daformer_synthia2cs.py --workdir=runs/mic_syn
"""

from configs import daformer_recipe, mic_recipe, synthia2cs
from ddb_jax.graph import stage_graph

NAME = "mic_daformer_synthia2cs"


def get_config():
    setting = mic_recipe.apply(
        daformer_recipe.apply(synthia2cs.setting()), mic_recipe.HALF_RESOLUTION_BLOCK
    )
    stage = stage_graph.Stage(NAME, "self_training", (("st.mask", "class"),))
    return stage_graph.stage_config(setting, stage, f"runs/{NAME}")
