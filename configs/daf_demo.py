"""DAF/IDA's whole pipeline on the embedded toy domains: source-only with DAF's network, DAF
on the SYNTHIA-like source with depth, two ISL rounds with their pseudo-labels, the
ranking, IDA.

    python -m input_pipeline.toy --out data/toy --extra-sources synthia
    python -m ddb_jax.main --config=configs/daf_demo.py --workdir=runs/daf_demo
    python -m ddb_jax.main --config=configs/daf_demo.py:5 --workdir=/tmp/x   # 5 steps each

DAF's network at toy size (one block per stage, width 16, a small depth head) from random
weights on whole 256x128 toy images, batch 4, at 1e-2 (the toy learns nothing at the
reference's rate); the toy model is rarely confident, so the ISL threshold is 0.5.
Everything else is the reference's.
"""

from configs import daf_synthia2cs, default, synthia2cs, toy_runs

NAME = "daf_demo"
STEPS = 300


def setting(steps: int = STEPS):
    config = default.get_config()
    config.graph = "daf"
    daf_synthia2cs.daf_model(config)
    toy_runs.caffe_resnet_toy(config, steps)
    config.model.daf_depth_features = 4
    config.model.daf_depth_size = ()
    config.daf.optim_d.max_iters = 0
    config.daf.ida_optim_d.max_iters = 0
    config.daf.isl_max_iters = 0
    config.daf.ida_max_iters = 0
    config.daf.isl_round_steps = (steps, steps)
    config.daf.ida_steps = steps
    config.daf.isl_threshold = 0.5
    config.daf.full_size = (128, 256)
    config.data.source = ("toy_synthia",)
    config.data.target = ("toy_target",)
    config.data.source_depth = True
    config.eval.miou_protocols = synthia2cs.MIOU_PROTOCOLS  # as configs/demo_synthia.py
    config.baselines = ("source_only",)
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
