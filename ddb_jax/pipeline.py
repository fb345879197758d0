"""Stage 'pipeline': all of DDB's rounds in one command, resumable stage by stage.

The stages and their wiring are :mod:`ddb_jax.rounds`' graph; the top of the config is the
setting every stage shares (a top-level override, ``--config.seed=1``, reaches every stage
it applies to), and ``config.pipeline.<stage>`` holds that stage's own overrides
(``--config.pipeline.r1_cu.batch_size=2``). Each stage runs in ``workdir/<stage>/``. A
stage whose deliverable exists (``export/`` + ``result.json``, or ``prototypes.npz``) is
skipped, an interrupted one resumes from its checkpoints, and ``--config.stages=a,b`` runs
a subset. The reference needs a person to rename and move checkpoints between stages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import ml_collections
from absl import logging

from ddb_jax import rounds
from ddb_jax.train import workdir as workdir_lib

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
PIPELINE_JSON = "pipeline.json"
COMPILATION_CACHE = "compilation_cache"


class PipelineError(ValueError):
    """The pipeline config or the state of its workdir does not allow the requested run."""


def deliverables(workdir: str, name: str, stage_cfg) -> list[str]:
    """The files whose presence means the stage finished."""
    if stage_cfg.stage == "prototypes":
        return [rounds.artifact_path(workdir, name, rounds.PROTOTYPES)]
    return [
        os.path.join(rounds.artifact_path(workdir, name, rounds.EXPORT), "model.json"),
        os.path.join(workdir, name, workdir_lib.RESULT_JSON),
    ]


def is_finished(workdir: str, name: str, stage_cfg) -> bool:
    return all(os.path.exists(p) for p in deliverables(workdir, name, stage_cfg))


def check_top_level(config: ml_collections.ConfigDict, names: list[str]) -> None:
    """Refuses settings that would otherwise be ignored: a per-stage key set at the top,
    or overrides of a stage that is not in this graph."""
    for key in rounds.PER_STAGE_KEYS:
        value = config
        for part in key.split("."):
            value = value[part]
        if value:
            raise PipelineError(
                f"config.{key}={value!r} is set per stage by the pipeline (see "
                f"ddb_jax/rounds.py); set it for one stage: --config.pipeline.<stage>.{key}=..."
            )
    for name in config.pipeline.keys():
        if name not in names and rounds.set_leaves(config.pipeline[name]):
            raise PipelineError(
                f"config.pipeline.{name} has overrides, but {name} is not a stage of this "
                f"pipeline (config.rounds={config.rounds}, config.baselines="
                f"{tuple(config.baselines)}): {names}"
            )


def selected(config, names: list[str]) -> list[str]:
    if not config.stages:
        return names
    wanted = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise PipelineError(f"--config.stages names {unknown}, not stages of this pipeline {names}")
    return [n for n in names if n in wanted]


def check_inputs(plan, workdir: str) -> None:
    """Every input of every stage to run exists or is produced earlier in this run."""
    produced: set[str] = set()
    for stage, stage_cfg, _ in plan:
        for item in stage.inputs:
            if not rounds.is_needed(stage_cfg, item):
                continue
            path = rounds.artifact_path(workdir, item.producer, item.artifact)
            if item.producer not in produced and not os.path.exists(path):
                raise PipelineError(
                    f"stage {stage.name} needs {item.key}={path}, which stage {item.producer} "
                    f"produces; it does not exist: run {item.producer} first (include it in "
                    "--config.stages)"
                )
        produced.add(stage.name)


def check_unchanged(stage_dir: str, stage_cfg) -> None:
    """A stage that has run (or started) keeps its config: refuse a changed one."""
    try:
        workdir_lib.check_config(stage_dir, stage_cfg)
    except workdir_lib.WorkdirMismatchError as err:
        raise PipelineError(
            f"{err}. The pipeline config changed for a stage that has already run; to redo "
            f"it with the new config, delete {stage_dir} (and the stages after it)"
        ) from err


def summarize(plan_all, workdir: str) -> dict:
    """mIoU per target of every training stage that has a result (the student)."""
    targets: list[str] = []
    rows = {}
    for stage, stage_cfg, _ in plan_all:
        path = os.path.join(workdir, stage.name, workdir_lib.RESULT_JSON)
        if stage_cfg.stage == "prototypes" or not os.path.exists(path):
            continue
        with open(path) as f:
            result = json.load(f)
        for target in stage_cfg.data.target:
            if target not in targets:
                targets.append(target)
        rows[stage.name] = {
            "stage": stage_cfg.stage,
            "steps": result.get("step"),
            **{t: result.get(t) for t in stage_cfg.data.target},
            "miou": result.get("miou"),
        }
    return {"targets": targets, "stages": rows}


def format_summary(summary: dict) -> str:
    targets = summary["targets"]
    columns = targets + (["mean"] if len(targets) > 1 else [])
    lines = [
        "| stage | kind | steps | " + " | ".join(f"{c} mIoU" for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]

    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}"

    for name, row in summary["stages"].items():
        values = [row.get(t) for t in targets] + ([row["miou"]] if len(targets) > 1 else [])
        lines.append(
            f"| {name} | {row['stage']} | {row['steps']} | "
            + " | ".join(pct(v) for v in values)
            + " |"
        )
    return "\n".join(lines) + "\n\nmIoU of the student of each stage on the validation set(s)."


def write_summary(workdir: str, summary: dict) -> str:
    table = format_summary(summary)
    workdir_lib.write_text(os.path.join(workdir, SUMMARY_MD), table + "\n")
    workdir_lib.write_json(os.path.join(workdir, SUMMARY_JSON), summary)
    return table


def enable_compilation_cache(workdir: str) -> None:
    """Caches compiled programs in the workdir: the paths of a round (and the rounds) run
    the same programs, so every stage after the first of its kind skips compilation.
    A cache the user configured (JAX_COMPILATION_CACHE_DIR) is left alone."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, COMPILATION_CACHE))


def plan_stages(config: ml_collections.ConfigDict, workdir: str) -> list:
    """(stage, its complete config, finished?) for every stage of the graph, in order."""
    if "pipeline" not in config or config.pipeline is None:
        raise PipelineError("stage 'pipeline' needs config.pipeline (see configs/gta2cs.py)")
    try:
        graph = rounds.graph_of(config)
    except rounds.GraphError as err:
        raise PipelineError(str(err)) from err
    names = [s.name for s in graph]
    check_top_level(config, names)
    plan = []
    for stage in graph:
        overrides = config.pipeline.get(stage.name)
        try:
            stage_cfg = rounds.stage_config(config, stage, workdir, overrides)
        except rounds.GraphError as err:
            raise PipelineError(str(err)) from err
        plan.append((stage, stage_cfg, is_finished(workdir, stage.name, stage_cfg)))
    return plan


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    run_stage: Callable[[ml_collections.ConfigDict, str], object] | None = None,
) -> dict:
    """Runs the pipeline's stages in order (skipping finished ones); returns the summary."""
    if run_stage is None:
        from ddb_jax import stages

        def run_stage(stage_cfg, stage_dir):
            return stages.resolve_stage(stage_cfg.stage)(stage_cfg, stage_dir)

    plan_all = plan_stages(config, workdir)
    wanted = selected(config, [stage.name for stage, _, _ in plan_all])
    plan = [p for p in plan_all if p[0].name in wanted]
    for stage, stage_cfg, _ in plan:
        check_unchanged(os.path.join(workdir, stage.name), stage_cfg)
    check_inputs([p for p in plan if not p[2]], workdir)
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_json(os.path.join(workdir, PIPELINE_JSON), workdir_lib.config_as_json(config))
    enable_compilation_cache(workdir)
    for stage, stage_cfg, finished in plan:
        if finished:
            logging.info("pipeline: %s finished earlier, skipped", stage.name)
            print(f"[pipeline] {stage.name}: done earlier, skipped", flush=True)
            continue
        print(f"[pipeline] {stage.name}: running ({stage_cfg.stage})", flush=True)
        run_stage(stage_cfg, os.path.join(workdir, stage.name))
        if not is_finished(workdir, stage.name, stage_cfg):
            # Stopped on request (SIGTERM): later stages must not start.
            message = f"[pipeline] {stage.name} stopped before finishing; rerun to continue"
            print(message, flush=True)
            return {}
    summary = summarize(plan_all, workdir)
    table = write_summary(workdir, summary)
    print(table, flush=True)
    return summary
