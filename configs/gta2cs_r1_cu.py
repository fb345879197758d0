"""GTA5 -> Cityscapes, round 1, coarse region path (cross-domain cut-mix), DeepLabV2 R101."""

from configs import gta2cs_r1_ca


def get_config():
    config = gta2cs_r1_ca.get_config()
    config.st.mask = "cut"
    return config
