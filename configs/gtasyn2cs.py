"""GTA5 + Synscapes -> Cityscapes (multi-source: the source set is their concatenation),
DeepLabV2 ResNet-101 (the reference's configs/gta+syns2city/). As configs/gta2cs.py.
"""

from configs import gta2cs
from ddb_jax.graph import stage_graph

NAME = "gtasyn2cs"


def setting():
    config = gta2cs.setting()
    config.data.source = ("gta", "synscapes")
    return config


def get_config(stage: str = "pipeline"):
    return stage_graph.config_for(setting(), stage, f"runs/{NAME}")
