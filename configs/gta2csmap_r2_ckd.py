"""GTA5 -> Cityscapes + Mapillary, round 2, cross-path distillation: stage r2_ckd of
configs/gta2csmap.py (its inputs are read from runs/gta2csmap/<stage>/)."""

from configs import gta2csmap


def get_config():
    return gta2csmap.get_config("r2_ckd")
