"""Synscapes -> Cityscapes, round 2, cross-path distillation: stage r2_ckd of
configs/syns2cs.py (its inputs are read from runs/syns2cs/<stage>/)."""

from configs import syns2cs


def get_config():
    return syns2cs.get_config("r2_ckd")
