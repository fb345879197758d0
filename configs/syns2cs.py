"""Synscapes -> Cityscapes (single source) with DeepLabV2 ResNet-101: every stage of DDB. As
configs/gta2cs.py.

The reference has this setting's dataset configs but no experiment configs: its
configs/_base_/datasets/{st,ckd,so}_syns2city_512x512.py (Synscapes resized to (1280, 720)
as GTA5, PhotoMetricDistortion on the source in the CKD data config, as ddb_jax/graph/rounds.py
sets for every CKD stage), with the GTA5 schedule of configs/gta2city/.

    python tools/convert_datasets/synscapes.py data/synscapes
    python -m ddb_jax.main --config=configs/syns2cs.py --workdir=runs/syns2cs
"""

from configs import gta2cs
from ddb_jax.graph import stage_graph

NAME = "syns2cs"


def setting():
    config = gta2cs.setting()
    config.data.source = ("synscapes",)
    return config


def get_config(stage: str = "pipeline"):
    return stage_graph.config_for(setting(), stage, f"runs/{NAME}")
