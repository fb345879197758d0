"""DDB on HRDA on the toy high-resolution domains: DDB's rounds (config.graph='ddb') with
configs/hrda_demo.py's HRDA student in every self-training and CKD stage; the CKD teachers'
pseudo-labels are their HRDA inference, their prototypes the context heads' features.

    python -m input_pipeline.toy --out data/toy --hr
    python -m ddb_jax.main --config=configs/ddb_hrda_demo.py --workdir=runs/ddb_hrda_demo
    python -m ddb_jax.main --config=configs/ddb_hrda_demo.py:5 --workdir=/tmp/x  # 5 steps each
"""

from configs import hrda_demo, toy_runs

NAME = "ddb_hrda_demo"


def setting(steps: int = hrda_demo.STEPS):
    config = hrda_demo.setting(steps)
    config.graph = "ddb"
    config.baselines = ()
    return config


def get_config(arg: str | None = None):
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    return toy_runs.config_for_arg(setting, NAME, arg)
