"""GTA5 -> Cityscapes with MiT-B5 + the DAFormer head (a SegFormer variant of the paths).

``init_from``: ImageNet MiT-B5 converted with
``python tools/convert_checkpoint.py mit_b5.pth pretrained/mit_b5 --backbone=mit_b5``.
Set ``--config.model.remat=True`` / ``--config.model.dtype=bfloat16`` on small GPUs.
"""

from configs import gta2cs
from ddb_jax import rounds

NAME = "gta2cs_daformer"


def setting():
    config = gta2cs.setting()
    config.model.backbone = "mit_b5"
    config.model.head = "daformer"
    config.model.head_channels = 256
    config.init_from = "pretrained/mit_b5"
    return config


def get_config(stage: str = "pipeline"):
    return rounds.config_for(setting(), stage, f"runs/{NAME}")
