"""DDB on the toy SYNTHIA-like source, the row DAF/IDA's demo (configs/daf_demo.py) is
compared with: the toy SYNTHIA (SYNTHIA's label layout, no terrain, truck or train) to the
toy target, with the DDB demo's network and schedule (configs/demo.py), reported over 16
and 13 classes as configs/synthia2cs.py.

    python -m input_pipeline.toy --out data/toy --extra-sources synthia
    python -m ddb_jax.main --config=configs/demo_synthia.py --workdir=runs/demo_synthia
"""

from configs import demo, synthia2cs, toy_runs

NAME = "demo_synthia"


def setting(steps: int = demo.STEPS):
    config = demo.setting(steps)
    config.data.source = ("toy_synthia",)
    config.eval.miou_protocols = synthia2cs.MIOU_PROTOCOLS
    config.baselines = ("source_only",)
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
