"""HRDA with DeepLabV2 on GTA5 -> Cityscapes (lhoyer/MIC's seg/experiments.py, the
'hrda1-512-0.1_dlv2red' / r101v1c row with 'dacs_a999_fdthings', RCS and pseudo-label
margins): configs/hrda_gta2cs.py with ResNetV1c-101 and DAFormer's DeepLabV2 head (an ASPP of
dilations 6 and 12 straight to the classes, summed: 'dlv2_sum'; HRDA's attention is a second
copy of it), from ImageNet; the feature distance against the frozen ImageNet ResNet.

    python tools/convert_checkpoint.py resnet101_v1c.pth pretrained/resnet101_v1c
    python -m ddb_jax.main --config=configs/hrda_dlv2_gta2cs.py --workdir=runs/hrda_dlv2
"""

from configs import hrda_gta2cs
from ddb_jax.graph import stage_graph

NAME = "hrda_dlv2_gta2cs"
IMNET = "pretrained/resnet101_v1c"


def setting():
    config = hrda_gta2cs.setting()
    config.model.backbone = "resnet101_v1c"
    config.model.head = "dlv2_sum"
    config.init_from = IMNET
    config.fdist.imnet_from = IMNET
    return config


def get_config():
    stage = stage_graph.Stage(NAME, "self_training", (("st.mask", "class"),))
    return stage_graph.stage_config(setting(), stage, f"runs/{NAME}")
