"""GTA5 -> Cityscapes, round 1, coarse region path (cut-mix): stage r1_cu of
configs/gta2cs.py (its inputs are read from runs/gta2cs/<stage>/)."""

from configs import gta2cs


def get_config():
    return gta2cs.get_config("r1_cu")
