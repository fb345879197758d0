"""DAF/IDA on SYNTHIA -> Cityscapes (3D-Vision-Lab-of-JUST/dg_ljw's README): DAF, three ISL
rounds with their pseudo-labels, the depth-aware ranking, IDA (docs/method.md §7).

    python tools/convert_datasets/synthia.py data/synthia --depth yes
    python -m ddb_jax.main --config=configs/daf_synthia2cs.py --workdir=runs/daf_synthia2cs

ADVENT's DeepLabV2 with dg_ljw's depth head from ImageNet weights, SGD 2.5e-4 (heads and
the depth head x10), whole SYNTHIA images (1280x760) and Cityscapes at 1024x512, batch 1,
no flip. DAF: 90k iterations; ISL: rounds of 10001, 10000 and 5000 (the regenerations at
0, 10001, 20001, stop at 25000), poly over 90k; IDA: 120k iterations, poly over 250k. The
head keeps Cityscapes' 19 outputs (the reference: 16), reported over 16 and 13 classes.
"""

from configs import advent_gta2cs, default
from ddb_jax import models
from ddb_jax.graph import stage_graph

NAME = "daf_synthia2cs"


def daf_model(config) -> None:
    """dg_ljw's network and SGD: ADVENT's with the depth head in the 10x group."""
    advent_gta2cs.advent_model(config)
    config.model.backbone, config.model.head = models.DAF_BACKBONE, "daf_aspp"
    config.model.advent_multi_level = False
    config.optim.head_keys = ("layer5", "layer6", "depth_head")
    config.optim.max_iters = 90_000
    config.optim.listed_times = "proda_1x"  # PyTorch 1.7.1's SGD over the listed 1x group


def setting():
    config = default.get_config()
    config.graph = "daf"
    daf_model(config)
    config.init_from = "pretrained/advent_imagenet"
    config.data.source = ("synthia",)
    config.data.target = ("cityscapes",)
    config.data.source_depth = True
    config.data.keep_ratio = False
    config.data.crop_size = (760, 1280)  # whole images
    config.data.target_crop_size = (512, 1024)
    config.data.flip_prob = 0.0
    config.data.cat_max_ratio = 1.0
    config.batch_size = 1
    config.num_steps = 90_000  # DAF's EARLY_STOP = MAX_ITERS
    config.eval.mode = "whole_corners"
    config.eval.miou_protocols = ("synthia16", "synthia13")
    config.eval_every = 1000  # EVAL_EVERY: the best model feeds the next stages
    config.checkpoint_every = 2000
    config.image_summary_every = 2000
    config.baselines = ()
    return config


def get_config(arg: str | None = None):
    return stage_graph.config_for(setting(), arg or "pipeline", f"runs/{NAME}")
