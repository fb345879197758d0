"""DAFormer alone on GTA5 -> Cityscapes: one self-training stage with DAFormer's recipe
(configs/daformer_recipe.py; lhoyer/DAFormer's
gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py): MiT-B5 + DAFormer head,
class-mix (DACS), 40k iterations of batch 2.

    python tools/convert_checkpoint.py mit_b5.pth pretrained/mit_b5 --backbone=mit_b5
    python -m ddb_jax.main --config=configs/daformer_gta2cs.py --workdir=runs/daformer_gta2cs
    ... --config.mic.enabled=True          # MIC on top (masked image consistency)

``pretrained/mit_b5`` is both the student's initialisation and the frozen model of the
feature distance. Rare class sampling reads the class statistics the GTA converter writes.
"""

from configs import daformer_recipe, gta2cs
from ddb_jax.graph import stage_graph

NAME = "daformer_gta2cs"


def get_config():
    setting = daformer_recipe.apply(gta2cs.setting())
    stage = stage_graph.Stage(NAME, "self_training", (("st.mask", "class"),))
    return stage_graph.stage_config(setting, stage, f"runs/{NAME}")
