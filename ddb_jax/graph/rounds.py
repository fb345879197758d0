"""DDB's stage graph: its rounds as data (config.graph = 'ddb', the default).

A setting (one file under ``configs/``: data, model, schedule) runs these stages:

    source_only, oracle            optional baselines (kind 'supervised'; the oracle trains
                                   on the target's own labels)
    r{n}_cu, r{n}_ca               self-training paths of round n: cut-mix / class-mix
                                   bridging; from round 2 on, student and EMA teacher start
                                   from r{n-1}_ckd's student at round2_lr_scale x the rate
    r{n}_proto_cu, r{n}_proto_ca   prototypes of the round's two path models
    r{n}_ckd                       cross-path distillation from both paths and their
                                   prototypes; the student starts from config.init_from
                                   (ImageNet) in every round, as in the reference

Everything that differs between DDB's stages is here; the pipeline and the per-stage
configs derive from it (:mod:`ddb_jax.graph.stage_graph`).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from ddb_jax.graph.stage_graph import (
    EXPORT,
    PROTOTYPES,
    GraphError,
    Input,
    Stage,
    baseline_stages,
    register_graph,
)  # fmt: skip

PATHS = ("cu", "ca")


MASKS = {"cu": "cut", "ca": "class"}


def graph(rounds: int = 2, baselines: Sequence[str] = ()) -> list[Stage]:
    """The stages of ``rounds`` DDB rounds (and the baselines), in running order."""
    if rounds < 1:
        raise GraphError(f"config.rounds={rounds}; DDB needs at least one round")
    stages = baseline_stages(baselines)
    for n in range(1, rounds + 1):
        for path in PATHS:
            init = (Input("init_from", f"r{n - 1}_ckd", EXPORT),) if n > 1 else ()
            stages.append(
                Stage(f"r{n}_{path}", "self_training", (("st.mask", MASKS[path]),), init, n > 1)
            )
        for path in PATHS:
            model = Input("checkpoint", f"r{n}_{path}", EXPORT)
            stages.append(Stage(f"r{n}_proto_{path}", "prototypes", (("init_from", ""),), (model,)))
        teachers = tuple(
            Input(f"ckd.{what}_{path}", producer, artifact, when)
            for path in PATHS
            for what, producer, artifact, when in (
                ("teacher", f"r{n}_{path}", EXPORT, ""),
                ("prototypes", f"r{n}_proto_{path}", PROTOTYPES, "ckd.proto_rectify"),
            )
        )
        # The reference's CKD data configs add PhotoMetricDistortion to the source images.
        settings = (("st.mask", "zero"), ("data.photometric_distortion", True))
        stages.append(Stage(f"r{n}_ckd", "ckd", settings, teachers))
    return stages


def produced_by(key: str) -> str:
    """What writes the input ``key`` (for error messages), e.g. for 'ckd.teacher_cu': the
    export/ of the cut-path self-training stage, r1_cu or r2_cu."""
    producers = sorted({i.producer for s in graph(rounds=2) for i in s.inputs if i.key == key})
    artifact = next((i.artifact for s in graph(2) for i in s.inputs if i.key == key), None)
    if not producers:
        return "an earlier stage"
    names = " or ".join(producers)
    kind = producers[0].split("_", 1)[1]  # cu | ca | proto_cu | proto_ca | ckd
    if artifact == PROTOTYPES:
        path = "cut" if kind.endswith("cu") else "class"
        return (
            f"stage 'prototypes' run on the {path}-path model (pipeline stage {names}; by "
            "hand: tools/calc_prototypes.py)"
        )
    what = {"cu": "cut-path self-training", "ca": "class-path self-training", "ckd": "CKD"}[kind]
    return f"the export/ directory of the {what} stage (pipeline stage {names})"


@register_graph("ddb")
def ddb_graph(config: ml_collections.ConfigDict) -> list[Stage]:
    """``config.rounds`` rounds of DDB after ``config.baselines``."""
    return graph(config.rounds, tuple(config.baselines))
