"""GTA5 + Synscapes -> Cityscapes (multi-source), round 1, cut path, DeepLabV2 R101."""

from configs import gtasyn2cs_r1_ca


def get_config():
    config = gtasyn2cs_r1_ca.get_config()
    config.st.mask = "cut"
    return config
