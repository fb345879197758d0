"""DDB's stage graph as data, and the stage configs derived from it.

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

Everything that differs between stages is here: the one-command pipeline
(:mod:`ddb_jax.pipeline`) and every per-stage config (``configs/<setting>_r1_cu.py``...)
are derived from :func:`graph` and :func:`stage_config`, so a round's wiring lives in one
place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from ddb_jax import errors, paths

EXPORT = "export"  # a training stage's final student, a model directory
PROTOTYPES = "prototypes.npz"  # a prototypes stage's table
BASELINES = ("source_only", "oracle")
PATHS = ("cu", "ca")
MASKS = {"cu": "cut", "ca": "class"}
# Keys the graph sets per stage: at the top of a pipeline config they stay unset ('').
PER_STAGE_KEYS = (
    "st.mask", "checkpoint", "ckd.teacher_cu", "ckd.teacher_ca", "ckd.prototypes_cu",
    "ckd.prototypes_ca",
)  # fmt: skip
# Keys of a pipeline config that describe the pipeline, not its stages.
PIPELINE_KEYS = (
    "pipeline", "stages", "rounds", "baselines", "round2_lr_scale", "seeds", "concurrent_stages",
    "graph",
)  # fmt: skip


class GraphError(errors.UsageError, ValueError):
    """A stage name or a pipeline setting that the graph does not have."""


@dataclasses.dataclass(frozen=True)
class Input:
    """A config key a stage reads from an earlier stage's output."""

    key: str  # dotted config key, e.g. 'ckd.teacher_cu'
    producer: str  # the stage that writes it
    artifact: str  # EXPORT or PROTOTYPES
    when: str = ""  # a boolean config key that must be on for the input to be read


@dataclasses.dataclass(frozen=True)
class CopyKey:
    """A setting whose value is another key's (the oracle's source is the target)."""

    key: str


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # the config.stage it runs
    settings: tuple[tuple[str, Any], ...] = ()  # (dotted key, value or CopyKey)
    inputs: tuple[Input, ...] = ()
    round2_lr: bool = False  # learning rate x config.round2_lr_scale


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


def baseline_stages(baselines: Sequence[str]) -> list[Stage]:
    """The reference rows every table has: source-only, and the oracle (trained on the
    target's own labels)."""
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise GraphError(f"config.baselines={tuple(baselines)}: {unknown} not in {BASELINES}")
    return [
        Stage(name, "supervised", (("data.source", CopyKey("data.target")),) * (name == "oracle"))
        for name in BASELINES
        if name in baselines
    ]


def advent_graph(config: ml_collections.ConfigDict) -> list[Stage]:
    """ADVENT's rows: AdvEnt and MinEnt, independent stages of one setting."""
    return [*baseline_stages(tuple(config.baselines)), Stage("advent", "advent"),
            Stage("minent", "minent")]  # fmt: skip


# config.graph -> the stages of that method's pipeline, in running order (producers first).
GRAPHS = {
    "ddb": lambda config: graph(config.rounds, tuple(config.baselines)),
    "advent": advent_graph,
}


def graph_of(config: ml_collections.ConfigDict) -> list[Stage]:
    """The stages of the pipeline ``config.graph`` names (DDB's rounds by default)."""
    name = config.get("graph", "ddb")
    if name not in GRAPHS:
        raise GraphError(f"config.graph={name!r}; known pipelines: {list(GRAPHS)}")
    return GRAPHS[name](config)


def find(stages: Sequence[Stage], name: str) -> Stage:
    for stage in stages:
        if stage.name == name:
            return stage
    raise GraphError(f"{name!r} is not a stage here; the stages: {[s.name for s in stages]}")


def artifact_path(workdir: str, stage: str, artifact: str) -> str:
    return paths.join(workdir, stage, artifact)


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


def _get(config: ml_collections.ConfigDict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        config = config[part]
    with config.unlocked():
        config[leaf] = value


def is_needed(stage_config: ml_collections.ConfigDict, item: Input) -> bool:
    return not item.when or bool(_get(stage_config, item.when))


def stage_config(
    setting: ml_collections.ConfigDict,
    stage: Stage,
    workdir: str,
    overrides: ml_collections.ConfigDict | None = None,
) -> ml_collections.ConfigDict:
    """The complete config of ``stage``: the setting, the stage's own keys, its inputs in
    ``workdir/<producer>/``, then ``overrides`` (a placeholder tree: its set leaves)."""
    config = ml_collections.ConfigDict(
        {k: v for k, v in setting.to_dict().items() if k not in PIPELINE_KEYS}
    )
    config.stage = stage.kind
    for key, value in stage.settings:
        _set(config, key, _get(config, value.key) if isinstance(value, CopyKey) else value)
    if stage.round2_lr:
        config.optim.lr = config.optim.lr * setting.round2_lr_scale
    wired = {item.key for item in stage.inputs}
    for key, value in set_leaves(overrides):
        if key in wired or key == "stage":
            raise GraphError(
                f"config.pipeline.{stage.name}.{key} is wired by the pipeline (it is "
                f"{'the stage kind' if key == 'stage' else 'an earlier stage output'}); run the "
                "stage by hand (its configs/<setting>_*.py) to use another value"
            )
        _set(config, key, value)
    for item in stage.inputs:
        if is_needed(config, item):
            _set(config, item.key, artifact_path(workdir, item.producer, item.artifact))
    return config


def set_leaves(tree: ml_collections.ConfigDict | None, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of ``tree`` that is not None (an override)."""
    if tree is None:
        return []
    out = []
    for key, value in tree.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += set_leaves(value, f"{prefix}{key}.")
        elif value is not None:
            out.append((f"{prefix}{key}", value))
    return out


def placeholders(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A tree of unset (None) leaves of ``config``'s keys and types: per-stage overrides that
    the command line can set (``--config.pipeline.r1_cu.batch_size=2``)."""
    out = ml_collections.ConfigDict()
    for key, value in config.items():
        if key in PIPELINE_KEYS or key == "stage":
            continue
        if isinstance(value, ml_collections.ConfigDict):
            out[key] = placeholders(value)
        else:
            out[key] = config_dict.placeholder(type(value))
    return out


def pipeline_config(setting: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``setting`` as stage 'pipeline': every stage of :func:`graph_of`, each with a tree of
    per-stage overrides; the keys the graph sets per stage left unset at the top."""
    config = ml_collections.ConfigDict(setting.to_dict())
    config.stage = "pipeline"
    for key in PER_STAGE_KEYS:
        _set(config, key, "")
    config.pipeline = ml_collections.ConfigDict(
        {stage.name: placeholders(setting) for stage in graph_of(setting)}
    )
    return config


def config_for(setting: ml_collections.ConfigDict, name: str, hand_workdir: str):
    """``name`` = 'pipeline' (all stages) or a stage name: the config a setting file returns.

    A single stage reads its inputs from ``hand_workdir/<producer>/``: the pipeline's layout
    when it runs in ``hand_workdir``, so stages can be run one by one by hand.
    """
    if name == "pipeline":
        return pipeline_config(setting)
    return stage_config(setting, find(graph_of(setting), name), hand_workdir)
