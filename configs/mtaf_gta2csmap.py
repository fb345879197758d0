"""MTAF on GTA5 -> Cityscapes + Mapillary (Saporta et al., ICCV 2021; valeoai/MTAF's
scripts/configs/gta2cityscapes_mapillary_{baseline,mdis,mtkt}.yml): the multi-target
baseline, MDis and MTKT, each one stage (ddb_jax/graph/mtaf.py).

    python tools/convert_checkpoint.py DeepLab_resnet_pretrained_imagenet.pth \
        pretrained/advent_imagenet --backbone=resnet101_caffe
    python -m ddb_jax.main --config=configs/mtaf_gta2csmap.py --workdir=runs/mtaf_gta2csmap
    python -m ddb_jax.main --config=configs/mtaf_gta2csmap.py:mtkt --workdir=runs/x/mtkt

ADVENT's DeepLabV2 from the ImageNet initialisation and its SGD (2.5e-4, classifiers x10,
poly 0.9 over 250k iterations, stopped at 120k), the discriminators' Adam 1e-4. Every
image resized to 640x320 (INPUT_SIZE_SOURCE / _TARGET), whole, no flip; one batch of the
source and one of *each* target per iteration (``data.per_target_streams``). The setting
holds the reference's config.py defaults, which the baseline's yml keeps (batch 1,
weights 1 / 0.1 / 1e-3 / 2e-4); MDis and MTKT set batch 4 and four times the weights,
MTKT a distillation weight of 4 from iteration 20000 (:data:`STAGE_SETTINGS`). Evaluation:
each target apart, every 2000 iterations (the reference's snapshots), in MTAF's 7 classes
(``data.label_set = 'mtaf7'``: 7-class labels and a 7-class model, as the paper's tables).
"""

from configs import advent_gta2cs, default
from ddb_jax.graph import stage_graph

NAME = "mtaf_gta2csmap"
TARGETS = ("cityscapes", "mapillary")
INPUT_SIZE = (640, 320)  # (W, H): INPUT_SIZE_SOURCE = INPUT_SIZE_TARGET

# Each stage's own settings (its yml file). MDis and MTKT ran with apex AMP O2, which
# gives every listing of a parameter its own fp32 master copy; the copies step alike, so a
# listed parameter moves as if listed once: optim.listed_times ''. The baseline ran
# without AMP: ADVENT's listed 1x group on PyTorch 1.3.1's SGD (0.4.1's arithmetic).
FOUR_TIMES = {"mtaf.lambda_seg_main": 4.0, "mtaf.lambda_seg_aux": 0.4,
              "mtaf.lambda_adv_main": 4e-3, "mtaf.lambda_adv_aux": 8e-4}  # fmt: skip
STAGE_SETTINGS = {
    "mdis": {"batch_size": 4, "optim.listed_times": "", **FOUR_TIMES},
    "mtkt": {"batch_size": 4, "optim.listed_times": "", **FOUR_TIMES,
             "mtaf.lambda_kl_target": 4.0, "mtaf.teacher_iters": 20_000},
}  # fmt: skip


def setting():
    config = default.get_config()
    config.graph = "mtaf"
    advent_gta2cs.advent_model(config)
    config.init_from = "pretrained/advent_imagenet"
    config.data.source = ("gta",)
    config.data.target = TARGETS
    config.data.per_target_streams = True
    # MTAF's 7 classes (NUM_CLASSES = 7: flat, construction, object, nature, sky, human,
    # vehicle), each dataset by the reference's own table (ddb_jax/label_sets.py 'mtaf7';
    # convert with gta.py, cityscapes.py and mapillary.py --label-set mtaf7).
    config.data.label_set = "mtaf7"
    config.model.num_classes = 7
    # Resized to exactly 640x320 (the reference's GTA5 and Cityscapes loaders; its Mapillary
    # loader keeps the aspect ratio and pads, which this pipeline does not do yet).
    config.data.keep_ratio = False
    config.data.resize_scales = {name: INPUT_SIZE for name in ("gta", *TARGETS)}
    config.data.crop_size = INPUT_SIZE[::-1]
    config.data.flip_prob = 0.0
    config.data.cat_max_ratio = 1.0
    config.batch_size = 1
    config.num_steps = 120_000  # EARLY_STOP
    config.eval.mode = "whole_corners"
    config.eval_every = 2000
    config.checkpoint_every = 2000
    config.image_summary_every = 2000
    return config


def with_stage_settings(config, name: str):
    """``config`` (a stage's, or the pipeline's) with :data:`STAGE_SETTINGS`: a stage's own
    values, or each stage's as its ``config.pipeline.<stage>`` overrides."""
    for stage, values in STAGE_SETTINGS.items():
        if name not in ("pipeline", stage):
            continue
        tree = config.pipeline[stage] if name == "pipeline" else config
        for key, value in values.items():
            *parents, leaf = key.split(".")
            node = tree
            for part in parents:
                node = node[part]
            node[leaf] = value
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage ('baseline', 'mdis', 'mtkt'), or nothing for all."""
    name = arg or "pipeline"
    return with_stage_settings(stage_graph.config_for(setting(), name, f"runs/{NAME}"), name)
