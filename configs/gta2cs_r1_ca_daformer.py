"""GTA5 -> Cityscapes, round 1, class path with MiT-B5 + DAFormer head (SegFormer variant).

``init_from``: ImageNet MiT-B5 converted with
``python tools/convert_checkpoint.py mit_b5.pth pretrained/mit_b5 --backbone=mit_b5``.
Set ``--config.model.remat=True`` / ``--config.model.dtype=bfloat16`` on small GPUs.
"""

from configs import gta2cs_r1_ca


def get_config():
    config = gta2cs_r1_ca.get_config()
    config.model.backbone = "mit_b5"
    config.model.head = "daformer"
    config.model.head_channels = 256
    config.init_from = "pretrained/mit_b5"
    return config
