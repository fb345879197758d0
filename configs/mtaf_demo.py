"""MTAF's multi-target baseline, MDis and MTKT on the toy domains, beside the source-only
row (config.graph = 'mtaf', ddb_jax/graph/mtaf.py).

    python -m input_pipeline.toy --out data/toy --extra-targets idd
    python -m ddb_jax.main --config=configs/mtaf_demo.py --workdir=runs/mtaf_demo
    python -m ddb_jax.main --config=configs/mtaf_demo.py:5 --workdir=/tmp/x   # 5 steps each

Two targets: the toy target and the toy IDD (input_pipeline/toy_idd.py: the same layouts
under a stronger appearance shift), each a stream and a batch key of its own. ADVENT's
DeepLabV2 at toy size (one block per stage, width 16) from random weights on whole 256x128
images, batch 4, at 1e-2 (classifiers x10) as the ADVENT demo; MTKT distils from a third of
the run on. Everything else is the reference's.
"""

from configs import advent_gta2cs, default, toy_runs

NAME = "mtaf_demo"
STEPS = 300
TARGETS = ("toy_target", "toy_idd")


def setting(steps: int = STEPS):
    config = default.get_config()
    config.graph = "mtaf"
    advent_gta2cs.advent_model(config)
    toy_runs.caffe_resnet_toy(config, steps)
    config.mtaf.optim_d.max_iters = 0
    config.mtaf.teacher_iters = steps // 3
    config.data.source = ("toy_source",)
    config.data.target = TARGETS
    config.data.per_target_streams = True
    config.data.keep_ratio = False
    config.baselines = ("source_only",)
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
