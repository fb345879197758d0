"""GTA5 -> Cityscapes + Mapillary (multi-target), round 2, cross-path knowledge distillation,
DeepLabV2 R101.

As configs/gta2csmap_r1_ckd.py (the student again starts from ImageNet, as the reference's
r2 CKD) with the round-2 teachers and prototypes: runs/gta2csmap/r2_{cu,ca}/export and
runs/gta2csmap/r2_proto_{cu,ca}/prototypes.npz.
"""

from configs import gta2csmap_r1_ckd
from configs.gta2cs_r1_ckd import ckd_paths


def get_config():
    return ckd_paths(gta2csmap_r1_ckd.get_config(), "runs/gta2csmap", "r2")
