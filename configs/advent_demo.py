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
    config.model.advent_blocks = (1, 1, 1, 1)
    config.model.base_channels = 16
    config.model.conv_impl = "im2col"
    config.optim.lr = 1e-2
    config.optim.max_iters = 0  # poly over the run
    config.advent.optim_d.max_iters = 0
    config.data.source = ("toy_source",)
    config.data.target = ("toy_target",)
    config.data.crop_size = (128, 256)
    config.data.flip_prob = 0.0
    config.data.cat_max_ratio = 1.0
    config.batch_size = 4
    toy_runs.cadence(config, steps)
    config.eval.mode = "whole_corners"
    config.baselines = ("source_only",)
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
