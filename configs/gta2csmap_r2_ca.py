"""GTA5 -> Cityscapes + Mapillary, round 2, fine class path (class-mix): stage r2_ca of
configs/gta2csmap.py (its inputs are read from runs/gta2csmap/<stage>/)."""

from configs import gta2csmap


def get_config():
    return gta2csmap.get_config("r2_ca")
