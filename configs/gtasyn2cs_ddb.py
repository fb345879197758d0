"""GTA5 + Synscapes -> Cityscapes: all of DDB in one command (configs/gtasyn2cs.py)."""

from configs import gtasyn2cs


def get_config():
    return gtasyn2cs.get_config()
