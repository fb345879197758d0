"""Synscapes -> Cityscapes, round 1, fine class path (class-mix): stage r1_ca of
configs/syns2cs.py (its inputs are read from runs/syns2cs/<stage>/)."""

from configs import syns2cs


def get_config():
    return syns2cs.get_config("r1_ca")
