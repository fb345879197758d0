"""Builds DDB's stage configs from a setting's round-1 path configs (used by *_ddb.py).

Round 2 of the reference (configs/gta2city/r2_st_*): the same self-training, started
(student and EMA teacher) from the round-1 CKD student, at a tenth of the learning
rate. A prototypes stage runs over the target training set with the path model's own
model and data settings.
"""

import ml_collections


def round2_path(r1_path: ml_collections.ConfigDict, distilled: str) -> ml_collections.ConfigDict:
    """Round-2 self-training path from its round-1 config; ``distilled``: the r1 CKD export."""
    config = ml_collections.ConfigDict(r1_path.to_dict())
    config.init_from = distilled
    config.optim.lr = r1_path.optim.lr / 10
    return config


def prototypes_stage(path: ml_collections.ConfigDict, model_dir: str) -> ml_collections.ConfigDict:
    """Stage 'prototypes' of the model ``model_dir`` trained with the path config ``path``."""
    config = ml_collections.ConfigDict(path.to_dict())
    config.stage = "prototypes"
    config.init_from = ""
    config.checkpoint = model_dir
    return config


def pipeline(
    base: ml_collections.ConfigDict,
    r1_cu: ml_collections.ConfigDict,
    r1_ca: ml_collections.ConfigDict,
    ckd: ml_collections.ConfigDict,
    workdir_hint: str,
    rounds: int = 2,
    baselines: dict | None = None,
) -> ml_collections.ConfigDict:
    """``base`` (a default config) turned into stage 'pipeline' holding every stage's config.

    Every round's CKD stage is ``ckd`` (the student starts from ImageNet in both rounds, as
    in the reference). Paths inside the stage configs are those of a hand-run in
    ``workdir_hint``; the pipeline rewires them to its own ``--workdir``.
    """
    stages = dict(baselines or {})
    stages["r1_cu"], stages["r1_ca"] = r1_cu, r1_ca
    for n in range(1, rounds + 1):
        if n > 1:
            distilled = f"{workdir_hint}/r{n - 1}_ckd/export"
            stages[f"r{n}_cu"] = round2_path(r1_cu, distilled)
            stages[f"r{n}_ca"] = round2_path(r1_ca, distilled)
        stages[f"r{n}_ckd"] = ml_collections.ConfigDict(ckd.to_dict())
        for p in ("cu", "ca"):
            stages[f"r{n}_proto_{p}"] = prototypes_stage(
                stages[f"r{n}_{p}"], f"{workdir_hint}/r{n}_{p}/export"
            )
    config = base
    config.stage = "pipeline"
    config.pipeline = ml_collections.ConfigDict(stages)
    return config
