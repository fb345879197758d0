"""The pipeline's plan: every stage of the graph for every seed with its complete
config and directory, the subset to run, and the checks made before anything runs."""

from __future__ import annotations

import dataclasses

import ml_collections

from ddb_jax import errors, paths
from ddb_jax.graph import stage_graph
from ddb_jax.offline import daf_labels, proda_labels
from ddb_jax.train import workdir as workdir_lib


class PipelineError(errors.UsageError, ValueError):
    """The pipeline config or the state of its workdir does not allow the requested run."""


@dataclasses.dataclass
class Planned:
    """One stage of one seed: its graph node, complete config and directory."""

    stage: stage_graph.Stage
    config: ml_collections.ConfigDict
    base: str  # the directory of its seed's stages: workdir, or workdir/seed<s>
    seed: int | None  # None: the pipeline runs one seed (config.seed) in workdir
    level: int  # its wave: it depends on stages of lower levels only

    @property
    def name(self) -> str:
        return self.stage.name if self.seed is None else f"seed{self.seed}/{self.stage.name}"

    @property
    def dir(self) -> str:
        return paths.join(self.base, self.stage.name)

    def input_path(self, item: stage_graph.Input) -> str:
        return stage_graph.artifact_path(self.base, item.producer, item.artifact)

    def producer_name(self, item: stage_graph.Input) -> str:
        return item.producer if self.seed is None else f"seed{self.seed}/{item.producer}"


def deliverables(stage_dir: str, stage_cfg) -> list[str]:
    """The files whose presence means the stage finished."""
    if stage_cfg.stage == "prototypes":
        return [paths.join(stage_dir, stage_graph.PROTOTYPES)]
    if stage_cfg.stage == "evaluate":
        return [paths.join(stage_dir, workdir_lib.RESULT_JSON)]
    if stage_cfg.stage in proda_labels.FOLDERS:  # ProDA's label folders, marked done last
        folder = proda_labels.FOLDERS[stage_cfg.stage]
        return [paths.join(stage_dir, folder, proda_labels.DONE)]
    if stage_cfg.stage in daf_labels.FOLDERS:  # DAF's label and ranking folders, done last
        return [paths.join(stage_dir, daf_labels.FOLDERS[stage_cfg.stage], daf_labels.DONE)]
    return [
        paths.join(stage_dir, stage_graph.EXPORT, "model.json"),
        paths.join(stage_dir, workdir_lib.RESULT_JSON),
    ]


def is_finished(planned: Planned) -> bool:
    return all(paths.exists(p) for p in deliverables(planned.dir, planned.config))


def check_top_level(config: ml_collections.ConfigDict, names: list[str]) -> None:
    """Refuses settings that would otherwise be ignored: a per-stage key set at the top,
    or overrides of a stage that is not in this graph."""
    for key in stage_graph.per_stage_keys(config):
        value = config
        for part in key.split("."):
            value = value[part]
        if value:
            raise PipelineError(
                f"config.{key}={value!r} is set per stage by the pipeline (see "
                "ddb_jax/graph/rounds.py); set it for one stage: "
                f"--config.pipeline.<stage>.{key}=..."
            )
    for name in config.pipeline.keys():
        if name not in names and stage_graph.set_leaves(config.pipeline[name]):
            raise PipelineError(
                f"config.pipeline.{name} has overrides, but {name} is not a stage of this "
                f"pipeline (config.rounds={config.rounds}, config.baselines="
                f"{tuple(config.baselines)}): {names}"
            )


def selected(config, plan: list[Planned]) -> list[Planned]:
    """The stages ``--config.stages`` names: 'r1_cu' (of every seed) or 'seed1/r1_cu'."""
    if not config.stages:
        return plan
    wanted = {s.strip() for s in config.stages.split(",") if s.strip()}
    names = {p.name for p in plan} | {p.stage.name for p in plan}
    unknown = sorted(wanted - names)
    if unknown:
        known = list(dict.fromkeys(p.name for p in plan))
        raise PipelineError(f"--config.stages names {unknown}, not stages of this pipeline {known}")
    return [p for p in plan if p.name in wanted or p.stage.name in wanted]


def check_inputs(plan: list[Planned]) -> None:
    """Every input of every stage to run exists or is produced earlier in this run."""
    produced: set[str] = set()
    for planned in sorted(plan, key=lambda p: p.level):
        for item in planned.stage.inputs:
            if not stage_graph.is_needed(planned.config, item):
                continue
            path, producer = planned.input_path(item), planned.producer_name(item)
            if producer not in produced and not paths.exists(path):
                raise PipelineError(
                    f"stage {planned.name} needs {item.key}={path}, which stage {producer} "
                    f"produces; it does not exist: run {producer} first (include it in "
                    "--config.stages)"
                )
        produced.add(planned.name)


def check_unchanged(stage_dir: str, stage_cfg) -> None:
    """A stage that has run (or started) keeps its config: refuse a changed one."""
    try:
        workdir_lib.check_config(stage_dir, stage_cfg)
    except workdir_lib.WorkdirMismatchError as err:
        raise PipelineError(
            f"{err}. The pipeline config changed for a stage that has already run; to redo "
            f"it with the new config, delete {stage_dir} (and the stages after it)"
        ) from err


def levels(graph: list[stage_graph.Stage]) -> dict[str, int]:
    """Each stage's wave: 0 for a stage with no input from the graph, else one more than
    its latest producer."""
    level: dict[str, int] = {}
    for stage in graph:  # graph order lists producers first
        level[stage.name] = 1 + max((level[i.producer] for i in stage.inputs), default=-1)
    return level


def plan_stages(config: ml_collections.ConfigDict, workdir: str) -> list[Planned]:
    """Every stage of the graph for every seed, with its complete config, in order."""
    if "pipeline" not in config or config.pipeline is None:
        raise PipelineError("stage 'pipeline' needs config.pipeline (see configs/gta2cs.py)")
    try:
        graph = stage_graph.graph_of(config)
    except stage_graph.GraphError as err:
        raise PipelineError(str(err)) from err
    check_top_level(config, [s.name for s in graph])
    level = levels(graph)
    seeds = [int(s) for s in config.get("seeds", ())]
    if len(set(seeds)) != len(seeds):
        raise PipelineError(f"config.seeds={tuple(seeds)} repeats a seed")
    plan = []
    for seed in seeds or [None]:
        setting, base = config, workdir
        if seed is not None:
            setting = ml_collections.ConfigDict(config.to_dict())
            setting.seed = seed
            base = paths.join(workdir, f"seed{seed}")
        for stage in graph:
            overrides = config.pipeline.get(stage.name)
            try:
                stage_cfg = stage_graph.stage_config(setting, stage, base, overrides)
            except stage_graph.GraphError as err:
                raise PipelineError(str(err)) from err
            plan.append(Planned(stage, stage_cfg, base, seed, level[stage.name]))
    return plan
