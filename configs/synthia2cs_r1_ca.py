"""SYNTHIA -> Cityscapes, round 1, fine class path (class-mix): stage r1_ca of
configs/synthia2cs.py (its inputs are read from runs/synthia2cs/<stage>/)."""

from configs import synthia2cs


def get_config():
    return synthia2cs.get_config("r1_ca")
