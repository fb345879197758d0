"""ProDA's whole pipeline on the embedded toy domains: warm-up, soft labels and prototypes,
stage 1, then two rounds of pseudo-labels and self-distillation.

    python -m input_pipeline.toy --out data/toy
    python -m ddb_jax.main --config=configs/proda_demo.py --workdir=runs/proda_demo
    python -m ddb_jax.main --config=configs/proda_demo.py:5 --workdir=/tmp/x   # 5 steps each

ProDA's network at toy size (one block per stage, width 16, a 32-channel head) from random
weights: toy images 256x128 (the loaders' fixed size), resized to a long side of 275 x
U[0.5, 1.5] (the reference's 2200 / 2048), 112x64 crops, batch 4. The toy model learns
nothing at ProDA's rates in a few hundred steps, so every stage trains at 1e-2; everything
else (losses, weights, prototypes, EMA, the strong view, the listed SGD group) is the
reference's. Stage 2's student starts from random weights (no ImageNet here).
"""

from configs import default, proda_gta2cs, toy_runs

NAME = "proda_demo"
STEPS = 300


def setting(steps: int = STEPS):
    config = default.get_config()
    config.graph = "proda"
    proda_gta2cs.proda_model(config)
    config.model.proda_blocks = (1, 1, 1, 1)
    config.model.base_channels = 16
    config.model.head_channels = 32
    config.model.conv_impl = "im2col"
    config.optim.lr = 1e-2
    config.optim.max_iters = 0  # poly over the run
    config.proda.distill_lr = 1e-2
    config.data.source = ("toy_source",)
    config.data.target = ("toy_target",)
    config.data.crop_size = (64, 112)
    config.data.flip_prob = 0.5
    config.data.proda_resize = 275
    config.data.proda_full_size = (128, 256)
    config.data.proda_source_size = (128, 256)
    config.prototypes.batch_size = 4
    config.batch_size = 4
    toy_runs.cadence(config, steps)
    config.baselines = ()
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
