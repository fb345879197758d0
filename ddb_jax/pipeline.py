"""Stage 'pipeline': all of DDB's rounds in one command, resumable stage by stage.

``config.pipeline`` holds one complete stage config per stage, by name:

    source_only, oracle            optional baselines (stage 'supervised')
    r{n}_cu, r{n}_ca               self-training paths of round n (n >= 2: init from r{n-1}_ckd)
    r{n}_proto_cu, r{n}_proto_ca   prototypes of the round's two path models
    r{n}_ckd                       cross-path distillation from the two paths and prototypes

Each stage runs in ``workdir/<name>/``; the paths between stages (``init_from``, the
CKD teachers and prototype tables, the model a prototype stage reads) are wired
here, overriding whatever the stage config holds for hand-runs. A stage whose
deliverable exists (``export/`` + ``result.json``, or ``prototypes.npz``) is skipped,
an interrupted one resumes from its checkpoints, and ``--config.stages=a,b`` runs a
subset. The reference needs a person to rename and move checkpoints between stages.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import ml_collections
from absl import logging

from ddb_jax import prototype_io
from ddb_jax.train import loop

BASELINES = ("source_only", "oracle")
ROUND_STEPS = ("cu", "ca", "proto_cu", "proto_ca", "ckd")
STAGE_NAME = re.compile(r"r(\d+)_(cu|ca|proto_cu|proto_ca|ckd)")
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
COMPILATION_CACHE = "compilation_cache"


class PipelineError(ValueError):
    """The pipeline config or the state of its workdir does not allow the requested run."""


def stage_order(names) -> list[str]:
    """Baselines first, then round by round: cu, ca, their prototypes, CKD."""

    def key(name: str):
        if name in BASELINES:
            return (0, BASELINES.index(name), 0)
        match = STAGE_NAME.fullmatch(name)
        if match is None:
            raise PipelineError(
                f"config.pipeline.{name}: not a pipeline stage name; use {list(BASELINES)} "
                "or r<round>_{cu,ca,proto_cu,proto_ca,ckd}"
            )
        return (1, int(match.group(1)), ROUND_STEPS.index(match.group(2)))

    return sorted(names, key=key)


def export_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, name, loop.EXPORT_DIR)


def prototypes_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, name, prototype_io.PROTOTYPES_FILE)


def deliverables(workdir: str, name: str, stage_cfg) -> list[str]:
    """The files whose presence means the stage finished."""
    if stage_cfg.stage == "prototypes":
        return [prototypes_path(workdir, name)]
    return [
        os.path.join(export_dir(workdir, name), "model.json"),
        os.path.join(workdir, name, loop.RESULT_JSON),
    ]


def is_finished(workdir: str, name: str, stage_cfg) -> bool:
    return all(os.path.exists(p) for p in deliverables(workdir, name, stage_cfg))


def wire(name: str, stage_cfg, workdir: str) -> dict[str, tuple[str, str]]:
    """Points the stage at its inputs; returns {config key: (path, producing stage)}."""
    match = STAGE_NAME.fullmatch(name)
    if match is None:
        return {}
    n, step = int(match.group(1)), match.group(2)
    inputs: dict[str, tuple[str, str]] = {}
    if step in ("cu", "ca") and n > 1:
        inputs["init_from"] = (export_dir(workdir, f"r{n - 1}_ckd"), f"r{n - 1}_ckd")
    elif step.startswith("proto_"):
        path = step.removeprefix("proto_")
        inputs["checkpoint"] = (export_dir(workdir, f"r{n}_{path}"), f"r{n}_{path}")
    elif step == "ckd":
        for path in ("cu", "ca"):
            inputs[f"ckd.teacher_{path}"] = (export_dir(workdir, f"r{n}_{path}"), f"r{n}_{path}")
            if stage_cfg.ckd.proto_rectify:
                inputs[f"ckd.prototypes_{path}"] = (
                    prototypes_path(workdir, f"r{n}_proto_{path}"),
                    f"r{n}_proto_{path}",
                )
    expected_kind = {"cu": "self_training", "ca": "self_training", "ckd": "ckd"}.get(
        step, "prototypes"
    )
    if stage_cfg.stage != expected_kind:
        raise PipelineError(
            f"config.pipeline.{name}.stage={stage_cfg.stage!r}; a {name} stage is {expected_kind!r}"
        )
    with stage_cfg.unlocked():
        for key, (path, _) in inputs.items():
            target = stage_cfg
            *parents, leaf = key.split(".")
            for parent in parents:
                target = target[parent]
            target[leaf] = path
    return inputs


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
    for name, _, inputs, _ in plan:
        for key, (path, producer) in inputs.items():
            if producer not in produced and not os.path.exists(path):
                raise PipelineError(
                    f"stage {name} needs {key}={path}, which stage {producer} produces; it does "
                    f"not exist: run {producer} first (include it in --config.stages)"
                )
        produced.add(name)


def summarize(config, workdir: str, names: list[str]) -> dict:
    """mIoU per target of every training stage that has a result (the student)."""
    targets: list[str] = []
    rows = {}
    for name in names:
        stage_cfg = config.pipeline[name]
        path = os.path.join(workdir, name, loop.RESULT_JSON)
        if stage_cfg.stage == "prototypes" or not os.path.exists(path):
            continue
        with open(path) as f:
            result = json.load(f)
        for target in stage_cfg.data.target:
            if target not in targets:
                targets.append(target)
        rows[name] = {
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
    for filename, text in (
        (SUMMARY_MD, table + "\n"),
        (SUMMARY_JSON, json.dumps(summary, indent=2)),
    ):
        path = os.path.join(workdir, filename)
        with open(f"{path}.tmp", "w") as f:
            f.write(text)
        os.replace(f"{path}.tmp", path)
    return table


def enable_compilation_cache(workdir: str) -> None:
    """Caches compiled programs in the workdir: the paths of a round (and the rounds) run
    the same programs, so every stage after the first of its kind skips compilation.
    A cache the user configured (JAX_COMPILATION_CACHE_DIR) is left alone."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, COMPILATION_CACHE))


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    run_stage: Callable[[ml_collections.ConfigDict, str], object] | None = None,
) -> dict:
    """Runs the pipeline's stages in order (skipping finished ones); returns the summary."""
    if "pipeline" not in config or not config.pipeline:
        raise PipelineError("stage 'pipeline' needs config.pipeline (see configs/gta2cs_ddb.py)")
    if run_stage is None:
        from ddb_jax import stages

        def run_stage(stage_cfg, stage_dir):
            return stages.resolve_stage(stage_cfg.stage)(stage_cfg, stage_dir)

    names = stage_order(list(config.pipeline.keys()))
    loop.check_workdir_config(workdir, config)
    enable_compilation_cache(workdir)
    plan = []
    for name in selected(config, names):
        stage_cfg = config.pipeline[name]
        with stage_cfg.unlocked():
            stage_cfg.data.root = config.data.root
        inputs = wire(name, stage_cfg, workdir)
        plan.append((name, stage_cfg, inputs, is_finished(workdir, name, stage_cfg)))
    check_inputs([p for p in plan if not p[3]], workdir)
    for name, stage_cfg, _, finished in plan:
        if finished:
            logging.info("pipeline: %s finished earlier, skipped", name)
            print(f"[pipeline] {name}: done earlier, skipped", flush=True)
            continue
        print(f"[pipeline] {name}: running ({stage_cfg.stage})", flush=True)
        run_stage(stage_cfg, os.path.join(workdir, name))
        missing = [p for p in deliverables(workdir, name, stage_cfg) if not os.path.exists(p)]
        if missing:  # stopped on request (SIGTERM): later stages must not start
            print(f"[pipeline] {name} stopped before finishing; rerun to continue", flush=True)
            return {}
    summary = summarize(config, workdir, names)
    table = write_summary(workdir, summary)
    print(table, flush=True)
    return summary
