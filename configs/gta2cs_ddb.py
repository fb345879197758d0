"""GTA5 -> Cityscapes: all of DDB in one command (configs/gta2cs.py)."""

from configs import gta2cs


def get_config():
    return gta2cs.get_config()
