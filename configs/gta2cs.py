"""GTA5 -> Cityscapes with DeepLabV2 ResNet-101: every stage of DDB (the reference's
configs/gta2city/; AdamW 6e-5, head x10, 1500 warm-up iterations then poly to 40k, batch 4).

    python -m ddb_jax.main --config=configs/gta2cs.py --workdir=runs/gta2cs        # all rounds
    python -m ddb_jax.main --config=configs/gta2cs.py:r1_cu --workdir=runs/gta2cs/r1_cu

The stages and their wiring are ddb_jax/graph/rounds.py's graph. ``init_from``: the ImageNet
ResNetV1c-101, converted with ``python tools/convert_checkpoint.py resnet101_v1c.pth
pretrained/resnet101_v1c``.
"""

from configs import default
from ddb_jax.graph import stage_graph

NAME = "gta2cs"


def setting():
    config = default.get_config()
    config.init_from = "pretrained/resnet101_v1c"
    config.data.source = ("gta",)
    config.data.target = ("cityscapes",)
    return config


def get_config(stage: str = "pipeline"):
    return stage_graph.config_for(setting(), stage, f"runs/{NAME}")
