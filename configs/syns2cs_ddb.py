"""Synscapes -> Cityscapes: all of DDB in one command (configs/syns2cs.py)."""

from configs import syns2cs


def get_config():
    return syns2cs.get_config()
