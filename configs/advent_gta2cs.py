"""ADVENT on GTA5 -> Cityscapes (Vu et al., CVPR 2019; valeoai/ADVENT's configs/advent.yml
and minent.yml): AdvEnt and MinEnt, each one stage, as the reference trains them.

    python tools/convert_checkpoint.py DeepLab_resnet_pretrained_imagenet.pth \
        pretrained/advent_imagenet --backbone=resnet101_caffe
    python -m ddb_jax.main --config=configs/advent_gta2cs.py --workdir=runs/advent_gta2cs
    python -m ddb_jax.main --config=configs/advent_gta2cs_advent.py --workdir=runs/x/advent

ADVENT's DeepLabV2 (Caffe-style ResNet-101, frozen BN affines, auxiliary layer-3
classifier) from ADVENT's ImageNet initialisation; whole images, GTA5 resized to 1280x720
and Cityscapes to 1024x512, no flip, batch 1; SGD 2.5e-4 (classifiers x10, poly 0.9 over
250k iterations, stopped at 120k), the discriminators' Adam 1e-4. Evaluation: the main
classifier at 1024x512, upsampled to the labels' 2048x1024 with align_corners=True, every
2000 iterations (the reference's snapshots; best/ keeps the best, as the reference picks
its best snapshot).
"""

from configs import default
from ddb_jax.graph import stage_graph

NAME = "advent_gta2cs"


def advent_model(config) -> None:
    """ADVENT's DeepLabV2 and its SGD (advent/domain_adaptation/config.py)."""
    config.model.backbone = "resnet101_caffe"
    config.model.head = "advent_aspp"
    optim = config.optim
    optim.kind, optim.lr, optim.momentum, optim.weight_decay = "sgd", 2.5e-4, 0.9, 5e-4
    optim.head_keys = ("layer5", "layer6")  # the classifiers: 10x
    optim.frozen_keys = ("bn", "downsample_1")  # BN scale and bias: requires_grad=False
    optim.head_lr_mult, optim.warmup_iters, optim.poly_power = 10.0, 0, 0.9
    optim.max_iters = 250_000  # MAX_ITERS; training stops at EARLY_STOP (num_steps)
    # The reference's 1x group lists a bottleneck conv 3 times (a shortcut conv 4), each
    # listing stepped by PyTorch 0.4.1's SGD; '' steps every parameter once.
    optim.listed_times = "advent_1x"


def setting():
    config = default.get_config()
    config.graph = "advent"
    advent_model(config)
    config.init_from = "pretrained/advent_imagenet"
    config.data.source = ("gta",)
    config.data.target = ("cityscapes",)
    config.data.keep_ratio = False  # GTA5 to exactly 1280x720
    config.data.crop_size = (720, 1280)  # whole images
    config.data.target_crop_size = (512, 1024)
    config.data.flip_prob = 0.0
    config.data.cat_max_ratio = 1.0
    config.batch_size = 1
    config.num_steps = 120_000  # EARLY_STOP
    config.eval.mode = "whole_corners"
    config.eval_every = 2000
    config.checkpoint_every = 2000
    config.image_summary_every = 2000
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage ('advent', 'minent'), or nothing for both."""
    return stage_graph.config_for(setting(), arg or "pipeline", f"runs/{NAME}")
