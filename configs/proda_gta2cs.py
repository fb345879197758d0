"""ProDA on GTA5 -> Cityscapes (Zhang et al., CVPR 2021; microsoft/ProDA's README commands):
the warm-up, the offline soft labels and prototypes, stage 1 (denoising + structure
learning), then two rounds of pseudo-labels and self-distillation, as one pipeline.

    python tools/convert_checkpoint.py resnet101-5d3b4d8f.pth pretrained/proda_imagenet \
        --backbone=resnet101_proda                      # torchvision's ImageNet ResNet-101
    python -m ddb_jax.main --config=configs/proda_gta2cs.py --workdir=runs/proda_gta2cs
    python -m ddb_jax.main --config=configs/proda_gta2cs.py:stage1 --workdir=runs/proda_gta2cs

From the released warm-up model instead of training one (its stages read it directly):

    python tools/convert_checkpoint.py from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl \
        pretrained/proda_gta_warmup --backbone=resnet101_proda --allow-pickle
    python -m ddb_jax.main --config=configs/proda_gta2cs.py --workdir=runs/proda_gta2cs \
        --config.proda.warmup_from=pretrained/proda_gta_warmup

ProDA's DeepLabV2 (every BN trained, GroupNorm + SE head) from ImageNet; both domains
resized to a long side of 2200 x U[0.5, 1.5], 896x512 crops, flip, batch 4; SGD (momentum
0.9, weight decay 2e-4) at 1e-4, poly 0.9 over 90k iterations, 84 epochs of the target
(62412 iterations) run: the warm-up and stages 2/3 with the head at 10x and the
reference's listed 1x group, stages 2/3 at 6e-4. Stage 2's student starts from
``proda.student_init`` (ImageNet here; the reference: SimCLRv2 weights, convertible with
--backbone=resnet101_proda, then --config.proda.student_init=<that directory>
--config.pipeline.stage2.model.proda_bn_clr=True
--config.pipeline.stage3.model.proda_bn_clr=True).
Evaluation: whole 2048x1024 images every 1000 iterations; best/ keeps the best.
"""

from configs import default
from ddb_jax.graph import stage_graph

NAME = "proda_gta2cs"
EPOCH_ITERATIONS = 2975 // 4  # Cityscapes train / batch, the last partial batch dropped


def proda_model(config) -> None:
    """ProDA's DeepLabV2 and the warm-up's SGD (models/adaptation_modelv2.py)."""
    config.model.backbone = "resnet101_proda"
    config.model.head = "proda_aspp"
    optim = config.optim
    optim.kind, optim.lr, optim.momentum, optim.weight_decay = "sgd", 1e-4, 0.9, 2e-4
    optim.head_keys = ("layer5", "bn_pretrain")  # the classifier: 10x
    optim.head_lr_mult, optim.warmup_iters, optim.poly_power = 10.0, 0, 0.9
    optim.max_iters = 90_000  # --train_iters; training stops after 84 epochs (num_steps)
    optim.listed_times = "proda_1x"  # the 1x group's nested listings, as torch 1.x stepped


def setting():
    config = default.get_config()
    config.graph = "proda"
    proda_model(config)
    config.init_from = "pretrained/proda_imagenet"
    config.proda.student_init = "pretrained/proda_imagenet"
    config.data.source = ("gta",)
    config.data.target = ("cityscapes",)
    config.data.crop_size = (512, 896)
    config.data.flip_prob = 0.5
    config.data.proda_resize = 2200
    config.data.proda_full_size = (1024, 2048)
    config.data.proda_source_size = (1052, 1914)
    config.data.resize_scales = {"cityscapes": (2048, 1024)}  # evaluation at full size
    config.batch_size = 4
    config.num_steps = 84 * EPOCH_ITERATIONS
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.image_summary_every = 1000
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage (warmup, soft, protos, stage1, labels1, stage2, labels2, stage3), or
    nothing for the whole pipeline."""
    return stage_graph.config_for(setting(), arg or "pipeline", f"runs/{NAME}")
