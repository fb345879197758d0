"""Synscapes -> Cityscapes, round 1, coarse region path (cut-mix): stage r1_cu of
configs/syns2cs.py (its inputs are read from runs/syns2cs/<stage>/)."""

from configs import syns2cs


def get_config():
    return syns2cs.get_config("r1_cu")
