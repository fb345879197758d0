"""ADVENT on GTA5 -> Cityscapes, stage advent of configs/advent_gta2cs.py."""

from configs import advent_gta2cs


def get_config():
    return advent_gta2cs.get_config("advent")
