"""GTA5 -> Cityscapes + Mapillary (multi-target: the target set is their concatenation;
evaluation reports each target and their mean), DeepLabV2 ResNet-101 (the reference's
configs/gta2city+mapi/). As configs/gta2cs.py.
"""

from configs import gta2cs
from ddb_jax.graph import stage_graph

NAME = "gta2csmap"


def setting():
    config = gta2cs.setting()
    config.data.target = ("cityscapes", "mapillary")
    return config


def get_config(stage: str = "pipeline"):
    return stage_graph.config_for(setting(), stage, f"runs/{NAME}")
