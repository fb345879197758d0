"""GTA5 -> Cityscapes + Mapillary (multi-target), round 1, CKD, DeepLabV2 R101.

The reference: configs/gta2city+mapi/r1_ckd_dlv2_r101v1c_1x4_512x512_40k_gta2city+mapi.py
(as configs/gta2cs_r1_ckd.py, with the target set Cityscapes + Mapillary concatenated).
Evaluation reports each target separately and their mean.

Inputs (layout ``runs/gta2csmap/<stage>/``): teachers from the ``export/`` of
configs/gta2csmap_r1_cu.py (r1_cu) and configs/gta2csmap_r1_ca.py (r1_ca); prototypes from
stage 'prototypes' on each (r1_proto_cu, r1_proto_ca).
"""

from configs import gta2cs_r1_ckd


def get_config():
    config = gta2cs_r1_ckd.get_config()
    config.data.target = ("cityscapes", "mapillary")
    return gta2cs_r1_ckd.ckd_paths(config, "runs/gta2csmap", "r1")
