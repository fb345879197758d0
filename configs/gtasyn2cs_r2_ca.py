"""GTA5 + Synscapes -> Cityscapes, round 2, fine class path (class-mix): stage r2_ca of
configs/gtasyn2cs.py (its inputs are read from runs/gtasyn2cs/<stage>/)."""

from configs import gtasyn2cs


def get_config():
    return gtasyn2cs.get_config("r2_ca")
