"""GTA5 -> Cityscapes + Mapillary (multi-target), round 1, class path, DeepLabV2 R101.

Evaluation reports each target separately and their mean.
"""

from configs import gta2cs_r1_ca


def get_config():
    config = gta2cs_r1_ca.get_config()
    config.data.target = ("cityscapes", "mapillary")
    return config
