"""GTA5 + Synscapes -> Cityscapes (multi-source), round 1, class path, DeepLabV2 R101."""

from configs import gta2cs_r1_ca


def get_config():
    config = gta2cs_r1_ca.get_config()
    config.data.source = ("gta", "synscapes")
    return config
