"""SYNTHIA -> Cityscapes, round 2, coarse region path (cut-mix): stage r2_cu of
configs/synthia2cs.py (its inputs are read from runs/synthia2cs/<stage>/)."""

from configs import synthia2cs


def get_config():
    return synthia2cs.get_config("r2_cu")
