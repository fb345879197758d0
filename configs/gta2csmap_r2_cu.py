"""GTA5 -> Cityscapes + Mapillary, round 2, coarse region path (cut-mix): stage r2_cu of
configs/gta2csmap.py (its inputs are read from runs/gta2csmap/<stage>/)."""

from configs import gta2csmap


def get_config():
    return gta2csmap.get_config("r2_cu")
