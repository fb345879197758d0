"""SYNTHIA -> Cityscapes: all of DDB in one command (configs/synthia2cs.py)."""

from configs import synthia2cs


def get_config():
    return synthia2cs.get_config()
