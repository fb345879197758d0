"""GTA5 + Synscapes -> Cityscapes (multi-source), round 2, fine class path (class-mix),
DeepLabV2 R101.

As round 1 (configs/gtasyn2cs_r1_ca.py) but the student and its EMA teacher start from
the round-1 CKD student, at a tenth of the learning rate (the reference's
configs/gta2city/r2_st_ca_*: lr 6e-6, distilled_model_path).
"""

from configs import gtasyn2cs_r1_ca, rounds


def get_config():
    return rounds.round2_path(gtasyn2cs_r1_ca.get_config(), "runs/gtasyn2cs/r1_ckd/export")
