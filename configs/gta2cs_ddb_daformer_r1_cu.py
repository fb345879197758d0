"""GTA5 -> Cityscapes, round 1, cu path with MiT-B5 + DAFormer head
(configs/gta2cs_ddb_daformer.py)."""

from configs import gta2cs_ddb_daformer


def get_config():
    return gta2cs_ddb_daformer.get_config("r1_cu")
