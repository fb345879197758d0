"""DDB's multi-target chain on the toy domains, the row MTAF's demo (configs/mtaf_demo.py) is
compared with: the toy source to the toy target and the toy IDD together (the target set is
their concatenation and evaluation reports each target and their mean, as
configs/gta2csmap.py), with the DDB demo's network and schedule (configs/demo.py).

    python -m input_pipeline.toy --out data/toy --extra-targets idd
    python -m ddb_jax.main --config=configs/demo_multitarget.py --workdir=runs/demo_multitarget
"""

from configs import demo, mtaf_demo, toy_runs

NAME = "demo_multitarget"


def setting(steps: int = demo.STEPS):
    config = demo.setting(steps)
    config.data.target = mtaf_demo.TARGETS
    config.baselines = ("source_only",)  # no oracle: it would train on one target's labels
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
