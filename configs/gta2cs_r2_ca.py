"""GTA5 -> Cityscapes, round 2, fine class path (class-mix): stage r2_ca of
configs/gta2cs.py (its inputs are read from runs/gta2cs/<stage>/)."""

from configs import gta2cs


def get_config():
    return gta2cs.get_config("r2_ca")
