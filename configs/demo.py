"""``make demo``: all of DDB on the embedded toy domains, with its two reference rows.

    python -m input_pipeline.toy --out data/toy
    python -m ddb_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m ddb_jax.main --config=configs/demo.py:5 --workdir=/tmp/x       # 5 steps per stage
    python -m ddb_jax.main --config=configs/demo.py:r1_cu --workdir=runs/demo/r1_cu

Stages: source_only (trained on the toy source only), oracle (trained on the toy
target's labels), then DDB's two rounds (r1_cu, r1_ca, prototypes, r1_ckd, r2_cu,
r2_ca, prototypes, r2_ckd). A tiny ResNet-18 (width 16) at 128x128 crops keeps each
stage to about a minute on a 2-core CPU. Toy models start from random weights (there
is no ImageNet model at this size), so round 1 and the CKD students start from scratch.
"""

from configs import default, toy_runs

NAME = "demo"
STEPS = 300  # per training stage


def setting(steps: int = STEPS):
    """The toy domains with the tiny model, the demo's numbers."""
    config = default.get_config()
    config.model.backbone = "resnet18_v1c"
    config.model.base_channels = 16
    config.model.head_channels = 32
    config.model.conv_impl = "im2col"  # ~2x faster training on CPU
    config.data.source = ("toy_source",)
    config.data.target = ("toy_target",)
    config.data.crop_size = (128, 128)
    config.batch_size = 4
    toy_runs.cadence(config, steps)
    config.optim.lr = 1e-3
    config.optim.warmup_iters = max(1, steps // 10)
    config.prototypes.batch_size = 8
    config.baselines = ("source_only", "oracle")
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
