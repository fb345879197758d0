"""SYNTHIA -> Cityscapes, round 1, coarse region path (cut-mix): stage r1_cu of
configs/synthia2cs.py (its inputs are read from runs/synthia2cs/<stage>/)."""

from configs import synthia2cs


def get_config():
    return synthia2cs.get_config("r1_cu")
