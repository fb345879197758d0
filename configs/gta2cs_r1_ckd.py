"""GTA5 -> Cityscapes, round 1, cross-path knowledge distillation (CKD), DeepLabV2 R101.

The reference: configs/gta2city/r1_ckd_dlv2_r101v1c_1x4_512x512_40k_gta2city.py (CKD with
``proto_rectify=True``, rectification on probabilities, hard pseudo-labels of weight 1;
AdamW 6e-5, head x10, poly with 1500 warmup iterations, 40k iterations, batch 4; the
student's target input is the strongly augmented target image, bridging mask 'zero').

Inputs, in the one-command pipeline's layout ``runs/gta2cs/<stage>/``:
  - ``init_from``: the ImageNet ResNetV1c-101 (``python tools/convert_checkpoint.py
    resnet101_v1c.pth pretrained/resnet101_v1c``); the student starts fresh from it.
  - teachers: the ``export/`` directories of the round-1 self-training stages
    (configs/gta2cs_r1_cu.py -> r1_cu, configs/gta2cs_r1_ca.py -> r1_ca).
  - prototypes: stage 'prototypes' run on each teacher (r1_proto_cu, r1_proto_ca).
"""

from configs import default


def ckd_paths(config, workdir: str, round_name: str):
    """Points config.ckd at the pipeline's stage directories ``workdir/<round>_<stage>/``."""
    for path in ("cu", "ca"):
        config.ckd[f"teacher_{path}"] = f"{workdir}/{round_name}_{path}/export"
        config.ckd[f"prototypes_{path}"] = f"{workdir}/{round_name}_proto_{path}/prototypes.npz"
    return config


def get_config():
    config = default.get_config()
    config.stage = "ckd"
    config.init_from = "pretrained/resnet101_v1c"
    config.data.source = ("gta",)
    config.data.target = ("cityscapes",)
    config.st.mask = "zero"
    config.ckd.proto_rectify = True
    config.ckd.rectify_on_prob = True
    return ckd_paths(config, "runs/gta2cs", "r1")
