"""GTA5 + Synscapes -> Cityscapes (multi-source), round 1, CKD, DeepLabV2 R101.

The reference: configs/gta+syns2city/r1_ckd_dlv2_r101v1c_1x4_512x512_40k_gta+syns2city.py
(as configs/gta2cs_r1_ckd.py, with the source set GTA5 + Synscapes concatenated).

Inputs (layout ``runs/gtasyn2cs/<stage>/``): teachers from the ``export/`` of
configs/gtasyn2cs_r1_cu.py (r1_cu) and configs/gtasyn2cs_r1_ca.py (r1_ca); prototypes from
stage 'prototypes' on each (r1_proto_cu, r1_proto_ca).
"""

from configs import gta2cs_r1_ckd


def get_config():
    config = gta2cs_r1_ckd.get_config()
    config.data.source = ("gta", "synscapes")
    return gta2cs_r1_ckd.ckd_paths(config, "runs/gtasyn2cs", "r1")
