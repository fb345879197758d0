"""GTA5 -> Cityscapes, round 1, cut path with MiT-B5 + DAFormer head (SegFormer variant)."""

from configs import gta2cs_r1_ca_daformer


def get_config():
    config = gta2cs_r1_ca_daformer.get_config()
    config.st.mask = "cut"
    return config
