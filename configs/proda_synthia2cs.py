"""ProDA on SYNTHIA -> Cityscapes (microsoft/ProDA's README commands), as
configs/proda_gta2cs.py with SYNTHIA's loader size (1280x760) and no MRKLD regulariser
(the README's SYNTHIA stage 1 sets none), reported over 16 and 13 classes.

    python -m ddb_jax.main --config=configs/proda_synthia2cs.py --workdir=runs/proda_syn2cs

The reference trains a 16-class head (--n_class 16); here the head has Cityscapes' 19
classes, of which SYNTHIA labels 16 (the other three never get a source label), and the
mIoU over 16 and 13 classes comes from the 19-class confusion matrix, as for DDB's SYNTHIA
settings (docs/method.md §4).
"""

from configs import proda_gta2cs
from ddb_jax.graph import stage_graph

NAME = "proda_synthia2cs"


def setting():
    config = proda_gta2cs.setting()
    config.data.source = ("synthia",)
    config.data.proda_source_size = (760, 1280)
    config.proda.regular_weight = 0.0
    config.eval.miou_protocols = ("synthia16", "synthia13")
    return config


def get_config(arg: str | None = None):
    return stage_graph.config_for(setting(), arg or "pipeline", f"runs/{NAME}")
