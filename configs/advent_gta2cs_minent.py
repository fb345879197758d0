"""ADVENT on GTA5 -> Cityscapes, stage minent of configs/advent_gta2cs.py."""

from configs import advent_gta2cs


def get_config():
    return advent_gta2cs.get_config("minent")
