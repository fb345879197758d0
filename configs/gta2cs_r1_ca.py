"""GTA5 -> Cityscapes, round 1, fine class path (cross-domain class-mix), DeepLabV2 R101.

The reference: configs/gta2city/r1_st_ca_dlv2_r101v1c_1x4_512x512_40k_gta2city.py
(AdamW 6e-5, head x10, poly with 1500 warmup iterations, 40k iterations, batch 4).
``init_from``: the ImageNet ResNetV1c-101 converted with
``python tools/convert_checkpoint.py resnet101_v1c.pth pretrained/resnet101_v1c``.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.stage = "self_training"
    config.init_from = "pretrained/resnet101_v1c"
    config.data.source = ("gta",)
    config.data.target = ("cityscapes",)
    config.st.mask = "class"
    return config
