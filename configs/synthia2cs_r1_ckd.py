"""SYNTHIA -> Cityscapes, round 1, cross-path distillation: stage r1_ckd of
configs/synthia2cs.py (its inputs are read from runs/synthia2cs/<stage>/)."""

from configs import synthia2cs


def get_config():
    return synthia2cs.get_config("r1_ckd")
