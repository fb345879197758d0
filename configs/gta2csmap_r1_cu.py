"""GTA5 -> Cityscapes + Mapillary (multi-target), round 1, cut path, DeepLabV2 R101."""

from configs import gta2csmap_r1_ca


def get_config():
    config = gta2csmap_r1_ca.get_config()
    config.st.mask = "cut"
    return config
