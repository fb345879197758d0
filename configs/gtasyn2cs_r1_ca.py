"""GTA5 + Synscapes -> Cityscapes, round 1, fine class path (class-mix): stage r1_ca of
configs/gtasyn2cs.py (its inputs are read from runs/gtasyn2cs/<stage>/)."""

from configs import gtasyn2cs


def get_config():
    return gtasyn2cs.get_config("r1_ca")
