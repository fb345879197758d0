"""SYNTHIA -> Cityscapes with DeepLabV2 ResNet-101: every stage of DDB, reported over 19, 16
and 13 classes and the 7 Cityscapes categories. As configs/gta2cs.py.

DDB publishes no SYNTHIA config (its README and configs/ cover GTA -> CS, GTA + Synscapes ->
CS and GTA -> CS + Mapillary), so this is DDB's GTA5 recipe (AdamW 6e-5, head x10, 1500
warm-up iterations then poly to 40k, batch 4, 512x512 crops) with DAFormer's SYNTHIA source
pipeline (configs/_base_/datasets/uda_synthia_to_cityscapes_512x512.py: SYNTHIA-RAND-CITYSCAPES
resized to (1280, 760), the 'synthia' entry of input_pipeline/datasets.py). The model keeps
19 outputs as DAFormer's; SYNTHIA never labels terrain, truck or train, so the usual numbers
are the extra mIoUs of config.eval.miou_protocols (ddb_jax/labels.py), computed from the same
confusion matrix: 'synthia16' (mIoU16), 'synthia13' (mIoU13), 'categories7' (mIoU7).

    python tools/convert_datasets/synthia.py data/synthia
    python -m ddb_jax.main --config=configs/synthia2cs.py --workdir=runs/synthia2cs
"""

from configs import gta2cs
from ddb_jax.graph import stage_graph

NAME = "synthia2cs"
MIOU_PROTOCOLS = ("synthia16", "synthia13", "categories7")


def setting():
    config = gta2cs.setting()
    config.data.source = ("synthia",)
    config.eval.miou_protocols = MIOU_PROTOCOLS
    return config


def get_config(stage: str = "pipeline"):
    return stage_graph.config_for(setting(), stage, f"runs/{NAME}")
