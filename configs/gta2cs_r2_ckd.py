"""GTA5 -> Cityscapes, round 2, cross-path knowledge distillation (CKD), DeepLabV2 R101.

The reference: configs/gta2city/r2_ckd_dlv2_r101v1c_1x4_512x512_40k_gta2city.py: the same
numbers as round 1 (configs/gta2cs_r1_ckd.py); the student again starts from the ImageNet
weights (the reference's r2 CKD config loads no round-1 model into the student), while the
teachers are the round-2 paths.

Inputs (layout ``runs/gta2cs/<stage>/``): teachers from the ``export/`` of stages r2_cu and
r2_ca (round-2 self-training, initialised from the round-1 CKD student), prototypes from
stage 'prototypes' on each (r2_proto_cu, r2_proto_ca).
"""

from configs import gta2cs_r1_ckd


def get_config():
    config = gta2cs_r1_ckd.get_config()
    return gta2cs_r1_ckd.ckd_paths(config, "runs/gta2cs", "r2")
