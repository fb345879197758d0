"""GTA5 -> Cityscapes with MiT-B5 + the DAFormer head: DDB's stages on DAFormer's recipe.

DDB publishes no MiT configs; these take DAFormer's settings (configs/daformer_recipe.py:
EMA 0.999, batch 2, rare class sampling, ImageNet feature distance on thing classes,
pseudo-label crop, no weight decay on norms, DACS's batch-wide draws and 2-D blur) for
every stage, each path keeping its own bridging (cut-mix or class-mix).

``init_from`` and the feature distance's frozen model: ImageNet MiT-B5 converted with
``python tools/convert_checkpoint.py mit_b5.pth pretrained/mit_b5 --backbone=mit_b5``.
Set ``--config.model.remat=True`` / ``--config.model.dtype=bfloat16`` on small GPUs.
"""

from configs import daformer_recipe, gta2cs
from ddb_jax.graph import stage_graph

NAME = "gta2cs_ddb_daformer"


def setting():
    return daformer_recipe.apply(gta2cs.setting())


def get_config(stage: str = "pipeline"):
    return stage_graph.config_for(setting(), stage, f"runs/{NAME}")
