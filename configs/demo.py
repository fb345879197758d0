"""``make demo``: all of DDB on the embedded toy domains, with its two reference rows.

    python -m input_pipeline.toy --out data/toy
    python -m ddb_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m ddb_jax.main --config=configs/demo.py:5 --workdir=/tmp/x   # 5 steps per stage

Stages: source_only (trained on the toy source only), oracle (trained on the toy
target's labels), then DDB's two rounds (r1_cu, r1_ca, prototypes, r1_ckd, r2_cu,
r2_ca, prototypes, r2_ckd). A tiny ResNet-18 (width 16) at 128x128 crops keeps each
stage to about a minute on a 2-core CPU. Toy models start from random weights (there
is no ImageNet model at this size), so round 1 and the CKD students start from scratch.
"""

from configs import default, rounds

STEPS = {"supervised": 300, "self_training": 300, "ckd": 300}


def toy_stage(stage: str, steps: int):
    """A stage on the toy domains with the tiny model."""
    config = default.get_config()
    config.stage = stage
    config.model.backbone = "resnet18_v1c"
    config.model.base_channels = 16
    config.model.head_channels = 32
    config.model.conv_impl = "im2col"  # ~2x faster training on CPU
    config.data.source = ("toy_source",)
    config.data.target = ("toy_target",)
    config.data.crop_size = (128, 128)
    config.batch_size = 4
    config.mesh_devices = 1
    config.num_steps = steps
    config.optim.lr = 1e-3
    config.optim.warmup_iters = max(1, steps // 10)
    config.log_every = max(1, steps // 6)
    config.eval_every = steps
    config.checkpoint_every = max(1, steps // 2)
    config.image_summary_every = steps
    config.prototypes.batch_size = 8
    return config


def get_config(steps: str | None = None):
    """``steps``: steps per training stage (default: the demo's numbers)."""
    count = {k: int(steps) if steps else v for k, v in STEPS.items()}
    baselines = {
        "source_only": toy_stage("supervised", count["supervised"]),
        "oracle": toy_stage("supervised", count["supervised"]),
    }
    baselines["oracle"].data.source = ("toy_target",)
    cu = toy_stage("self_training", count["self_training"])
    ca = toy_stage("self_training", count["self_training"])
    ca.st.mask = "class"
    ckd = toy_stage("ckd", count["ckd"])
    ckd.st.mask = "zero"  # the student sees the strongly augmented target image alone
    config = rounds.pipeline(
        default.get_config(), cu, ca, ckd, workdir_hint="runs/demo", baselines=baselines
    )
    config.pipeline.r2_cu.optim.lr = config.pipeline.r2_ca.optim.lr = 1e-3 / 10
    return config
