"""GTA5 -> Cityscapes, round 1, ca path with MiT-B5 + DAFormer head
(configs/gta2cs_ddb_daformer.py)."""

from configs import gta2cs_ddb_daformer


def get_config():
    return gta2cs_ddb_daformer.get_config("r1_ca")
