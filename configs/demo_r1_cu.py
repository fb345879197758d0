"""Toy domains, round 1, cut path alone: the demo's r1_cu stage (configs/demo.py) as a
single-stage config, for trying self-training by hand in a couple of minutes on a CPU.

Generate the data first: ``python -m input_pipeline.toy --out data/toy``.
"""

from configs import demo


def get_config():
    return demo.get_config("r1_cu")
