"""GTA5 -> Cityscapes + Mapillary (multi-target): all of DDB in one command (two rounds).

    python -m ddb_jax.main --config=configs/gta2csmap_ddb.py --workdir=runs/gta2csmap

Stages, each in runs/gta2csmap/<stage>/: r1_cu, r1_ca, r1_proto_cu, r1_proto_ca, r1_ckd,
r2_cu, r2_ca, r2_proto_cu, r2_proto_ca, r2_ckd; a summary table at the end. Any stage's
key can be overridden (--config.pipeline.r1_cu.batch_size=2); --config.stages=r2_ckd runs
a subset. Round 1 starts from the ImageNet ResNetV1c-101 in pretrained/resnet101_v1c.
"""

from configs import default, gta2csmap_r1_ca, gta2csmap_r1_ckd, gta2csmap_r1_cu, rounds


def get_config():
    return rounds.pipeline(
        default.get_config(),
        gta2csmap_r1_cu.get_config(),
        gta2csmap_r1_ca.get_config(),
        gta2csmap_r1_ckd.get_config(),
        workdir_hint="runs/gta2csmap",
    )
