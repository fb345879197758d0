"""Synscapes -> Cityscapes, round 2, coarse region path (cut-mix): stage r2_cu of
configs/syns2cs.py (its inputs are read from runs/syns2cs/<stage>/)."""

from configs import syns2cs


def get_config():
    return syns2cs.get_config("r2_cu")
