"""ADVENT's AdvEnt and MinEnt on the embedded toy domains, beside the source-only row.

    python -m input_pipeline.toy --out data/toy
    python -m ddb_jax.main --config=configs/advent_demo.py --workdir=runs/advent_demo
    python -m ddb_jax.main --config=configs/advent_demo.py:5 --workdir=/tmp/x   # 5 steps each

ADVENT's DeepLabV2 at toy size (one block per stage, width 16) from random weights on whole
256x128 toy images, batch 4; the toy model learns nothing at ADVENT's SGD rate in 300
steps, so it trains at 1e-2 (classifiers x10). Everything else is the reference's: the
discriminators, the loss weights, the listed SGD group, no flip.
"""

from configs import advent_gta2cs, default, toy_runs

NAME = "advent_demo"
STEPS = 300


def setting(steps: int = STEPS):
    config = default.get_config()
    config.graph = "advent"
    advent_gta2cs.advent_model(config)
    toy_runs.caffe_resnet_toy(config, steps)
    config.advent.optim_d.max_iters = 0
    config.data.source = ("toy_source",)
    config.data.target = ("toy_target",)
    config.baselines = ("source_only",)
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
