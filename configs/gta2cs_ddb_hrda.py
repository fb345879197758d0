"""DDB on HRDA, GTA5 -> Cityscapes: DDB's two rounds (cut-mix and class-mix paths,
prototypes, cross-path distillation) with HRDA's multi-resolution student in every
self-training and CKD stage (configs/hrda_recipe.py on DAFormer's recipe: MiT-B5, 1024x1024
crops at full resolution, a 512x512 detail crop, pseudo-label margins, RCS with crop ratio
2.0, sliding 1024x1024 evaluation). No anchor publishes this setting.

The teachers of CKD are HRDA models: their pseudo-labels come from the context and the
overlapping detail windows, and the prototypes are their context heads' features (HRDA's
scale attention is class-wise, so there is no fused feature).

    python -m ddb_jax.main --config=configs/gta2cs_ddb_hrda.py --workdir=runs/gta2cs_ddb_hrda
    python -m ddb_jax.main --config=configs/gta2cs_ddb_hrda.py:r1_cu --workdir=runs/x/r1_cu
"""

from configs import gta2cs, hrda_recipe
from ddb_jax.graph import stage_graph

NAME = "gta2cs_ddb_hrda"


def setting():
    return hrda_recipe.apply(gta2cs.setting())


def get_config(stage: str = "pipeline"):
    return stage_graph.config_for(setting(), stage, f"runs/{NAME}")
