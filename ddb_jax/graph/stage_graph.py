"""What a stage graph is, and every stage config derived from one.

A method's pipeline is a list of :class:`Stage` (name, the stage kind it runs, the config
keys it sets, the inputs it reads from earlier stages' artifacts), producers first. The
graph modules of this package register theirs by name (``config.graph``): DDB's rounds
(:mod:`~ddb_jax.graph.rounds`), ADVENT's (:mod:`~ddb_jax.graph.advent`), ProDA's
(:mod:`~ddb_jax.graph.proda`). The one-command
pipeline (:mod:`ddb_jax.pipeline`) and every per-stage config (``configs/<setting>_<stage>.py``)
come from :func:`stage_config` and :func:`config_for`, so a stage's wiring lives in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from ddb_jax import errors, paths

EXPORT = "export"  # a training stage's final student, a model directory


PROTOTYPES = "prototypes.npz"  # a prototypes stage's table


BASELINES = ("source_only", "oracle")


# Keys the graph sets per stage: at the top of a pipeline config they stay unset ('').
PER_STAGE_KEYS = (
    "st.mask", "checkpoint", "ckd.teacher_cu", "ckd.teacher_ca", "ckd.prototypes_cu",
    "ckd.prototypes_ca", "eval.ensemble_checkpoint", "proda.soft_labels", "proda.prototypes",
    "proda.teacher", "proda.pseudo_labels",
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


# config.graph -> (config -> the stages of that method's pipeline, producers first).
GRAPHS: dict[str, Callable[[ml_collections.ConfigDict], list[Stage]]] = {}


def register_graph(name: str):
    """Declares a method's stage graph under ``config.graph = name``."""

    def add(build: Callable[[ml_collections.ConfigDict], list[Stage]]):
        GRAPHS[name] = build
        return build

    return add


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


def graph_of(config: ml_collections.ConfigDict) -> list[Stage]:
    """The stages of the pipeline ``config.graph`` names (DDB's rounds by default)."""
    import ddb_jax.graph  # noqa: F401  (its modules register their graphs)

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


def per_stage_keys(setting: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The keys of :data:`PER_STAGE_KEYS` that this setting's graph sets for its stages."""
    wired = set()
    for stage in graph_of(setting):
        wired |= {key for key, _ in stage.settings} | {item.key for item in stage.inputs}
    return tuple(key for key in PER_STAGE_KEYS if key in wired)


def pipeline_config(setting: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``setting`` as stage 'pipeline': every stage of :func:`graph_of`, each with a tree of
    per-stage overrides; the keys the graph sets per stage left unset at the top."""
    config = ml_collections.ConfigDict(setting.to_dict())
    config.stage = "pipeline"
    for key in per_stage_keys(setting):
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
