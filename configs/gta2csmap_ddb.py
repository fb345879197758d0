"""GTA5 -> Cityscapes + Mapillary: all of DDB in one command (configs/gta2csmap.py)."""

from configs import gta2csmap


def get_config():
    return gta2csmap.get_config()
