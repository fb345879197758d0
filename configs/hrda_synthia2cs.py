"""HRDA on SYNTHIA -> Cityscapes (lhoyer/HRDA's SYNTHIA row: uda_synthiaHR_to_cityscapesHR
data, SYNTHIA resized to 2560x1520): configs/hrda_gta2cs.py with SYNTHIA as the source and
the 16- and 13-class mIoUs reported (configs/synthia2cs.py). Published: 65.8 mIoU16.

    python -m ddb_jax.main --config=configs/hrda_synthia2cs.py --workdir=runs/hrda_synthia2cs
"""

from configs import hrda_recipe, synthia2cs
from ddb_jax.graph import stage_graph

NAME = "hrda_synthia2cs"


def setting():
    return hrda_recipe.apply(synthia2cs.setting())


def get_config():
    stage = stage_graph.Stage(NAME, "self_training", (("st.mask", "class"),))
    return stage_graph.stage_config(setting(), stage, f"runs/{NAME}")
