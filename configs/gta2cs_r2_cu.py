"""GTA5 -> Cityscapes, round 2, coarse region path (cut-mix), DeepLabV2 R101.

As round 1 (configs/gta2cs_r1_cu.py) but the student and its EMA teacher start from
the round-1 CKD student, at a tenth of the learning rate (the reference's
configs/gta2city/r2_st_cu_*: lr 6e-6, distilled_model_path).
"""

from configs import gta2cs_r1_cu, rounds


def get_config():
    return rounds.round2_path(gta2cs_r1_cu.get_config(), "runs/gta2cs/r1_ckd/export")
