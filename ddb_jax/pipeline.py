"""Stage 'pipeline': all of DDB's rounds in one command, resumable stage by stage.

The stages and their wiring are :mod:`ddb_jax.rounds`' graph; the top of the config is the
setting every stage shares (a top-level override, ``--config.seed=1``, reaches every stage
it applies to), and ``config.pipeline.<stage>`` holds that stage's own overrides
(``--config.pipeline.r1_cu.batch_size=2``). Each stage runs in ``workdir/<stage>/``
(``workdir/seed<s>/<stage>/`` for each of ``config.seeds``). A stage whose deliverable
exists (``export/`` + ``result.json``, or ``prototypes.npz``) is skipped, an interrupted
one resumes from its checkpoints, and ``--config.stages=a,b`` runs a subset. The
reference needs a person to rename and move checkpoints between stages.

Stages that do not depend on each other (a round's two paths, their prototypes, the
baselines, the same stage of every seed) form a *wave*; with several devices, the stages
of a wave run at once on disjoint groups of them, each data-parallel within its group: in
one process, groups of its devices; in a multi-host job, groups of whole processes (each
process runs the stage of its group; all meet between waves).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from concurrent import futures

import jax
import ml_collections
import numpy as np
from absl import logging

from ddb_jax import errors, hosts, labels, paths, rounds
from ddb_jax.train import preemption
from ddb_jax.train import workdir as workdir_lib

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
PIPELINE_JSON = "pipeline.json"
COMPILATION_CACHE = "compilation_cache"


class PipelineError(errors.UsageError, ValueError):
    """The pipeline config or the state of its workdir does not allow the requested run."""


@dataclasses.dataclass
class Planned:
    """One stage of one seed: its graph node, complete config and directory."""

    stage: rounds.Stage
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

    def input_path(self, item: rounds.Input) -> str:
        return rounds.artifact_path(self.base, item.producer, item.artifact)

    def producer_name(self, item: rounds.Input) -> str:
        return item.producer if self.seed is None else f"seed{self.seed}/{item.producer}"


def deliverables(stage_dir: str, stage_cfg) -> list[str]:
    """The files whose presence means the stage finished."""
    if stage_cfg.stage == "prototypes":
        return [paths.join(stage_dir, rounds.PROTOTYPES)]
    return [
        paths.join(stage_dir, rounds.EXPORT, "model.json"),
        paths.join(stage_dir, workdir_lib.RESULT_JSON),
    ]


def is_finished(planned: Planned) -> bool:
    return all(paths.exists(p) for p in deliverables(planned.dir, planned.config))


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
            if not rounds.is_needed(planned.config, item):
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


def _result_row(planned: Planned) -> dict | None:
    """The stage's result.json as a summary row (None for prototypes or no result yet)."""
    path = paths.join(planned.dir, workdir_lib.RESULT_JSON)
    if planned.config.stage == "prototypes" or not paths.exists(path):
        return None
    result = paths.read_json(path)
    cfg = planned.config
    columns = [f"{t}/{p}" for t in cfg.data.target for p in cfg.eval.miou_protocols]
    return {
        "stage": cfg.stage,
        "steps": result.get("step"),
        **{t: result.get(t) for t in cfg.data.target},
        "miou": result.get("miou"),
        **{c: result.get(c) for c in columns},
    }


def summarize(plan: list[Planned]) -> dict:
    """mIoU per target of every training stage that has a result (the student), and the
    setting's extra mIoUs (config.eval.miou_protocols) as columns '<target>/<protocol>'.
    With several seeds, each value is the mean over the seeds that finished, with its
    standard deviation ('std') and the seeds' own rows ('seeds')."""
    targets: list[str] = []
    extra: list[str] = []
    by_stage: dict[str, dict] = {}
    for planned in plan:
        row = _result_row(planned)
        if row is None:
            continue
        cfg = planned.config
        targets += [t for t in cfg.data.target if t not in targets]
        columns = [f"{t}/{p}" for t in cfg.data.target for p in cfg.eval.miou_protocols]
        extra += [c for c in columns if c not in extra]
        by_stage.setdefault(planned.stage.name, {})[planned.seed] = row
    rows = {}
    for name, seeds in by_stage.items():
        if list(seeds) == [None]:
            rows[name] = seeds[None]
            continue
        first = next(iter(seeds.values()))
        values = {k for row in seeds.values() for k, v in row.items() if isinstance(v, float)}
        mean = {k: float(np.mean([r[k] for r in seeds.values() if r.get(k) is not None]))
                for k in sorted(values)}  # fmt: skip
        std = {k: float(np.std([r[k] for r in seeds.values() if r.get(k) is not None]))
               for k in sorted(values)}  # fmt: skip
        rows[name] = {"stage": first["stage"], "steps": first["steps"], **mean, "std": std,
                      "seeds": {str(s): r for s, r in sorted(seeds.items())}}  # fmt: skip
    summary = {"targets": targets, "stages": rows}
    if extra:  # a setting without extra mIoUs keeps the plain summary
        summary["extra_columns"] = extra
    seeds = sorted({p.seed for p in plan if p.seed is not None})
    if seeds:
        summary["seeds"] = seeds
    return summary


def _column_title(column: str) -> str:
    """'cityscapes' -> 'cityscapes mIoU'; 'cityscapes/synthia16' -> 'cityscapes mIoU16'."""
    target, _, protocol = column.partition("/")
    return f"{target} {labels.miou_protocol(protocol).title if protocol else 'mIoU'}"


def format_summary(summary: dict) -> str:
    """The markdown table: a row per training stage; with several seeds, mean ± std and
    each seed's mIoU."""
    targets = summary["targets"]
    extra = summary.get("extra_columns", [])
    seeds = summary.get("seeds", [])
    columns = targets + (["miou"] if len(targets) > 1 else []) + extra
    titles = [_column_title(c) if c != "miou" else "mean mIoU" for c in columns]
    titles += [f"seed {s} mIoU" for s in seeds]
    lines = [
        "| stage | kind | steps | " + " | ".join(titles) + " |",
        "|---|---|---|" + "---|" * len(titles),
    ]

    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}"

    for name, row in summary["stages"].items():
        if seeds:
            cells = [f"{pct(row.get(c))} ± {pct(row['std'].get(c))}" for c in columns]
            cells += [pct(row["seeds"].get(str(s), {}).get("miou")) for s in seeds]
        else:
            cells = [pct(row.get(c)) for c in columns]
        lines.append(f"| {name} | {row['stage']} | {row['steps']} | " + " | ".join(cells) + " |")
    note = "mIoU of the student of each stage on the validation set(s)"
    if seeds:
        note += f"; mean ± standard deviation over seeds {', '.join(map(str, seeds))}"
    return "\n".join(lines) + f"\n\n{note}."


def write_summary(workdir: str, summary: dict) -> str:
    table = format_summary(summary)
    paths.write_text(paths.join(workdir, SUMMARY_MD), table + "\n")
    paths.write_json(paths.join(workdir, SUMMARY_JSON), summary)
    return table


def enable_compilation_cache(workdir: str) -> None:
    """Caches compiled programs: the paths of a round (and the rounds) run the same
    programs, so every stage after the first of its kind skips compilation. In the workdir
    when it is local; on this machine (``~/.cache/ddb_jax``) when the workdir is a bucket,
    where every lookup would be a remote round trip. A cache the user configured
    (JAX_COMPILATION_CACHE_DIR) is left alone."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    if paths.is_remote(workdir):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = os.path.join(base, "ddb_jax", COMPILATION_CACHE)
    else:
        cache = os.path.join(workdir, COMPILATION_CACHE)
    jax.config.update("jax_compilation_cache_dir", cache)


def levels(graph: list[rounds.Stage]) -> dict[str, int]:
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
        graph = rounds.graph_of(config)
    except rounds.GraphError as err:
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
                stage_cfg = rounds.stage_config(setting, stage, base, overrides)
            except rounds.GraphError as err:
                raise PipelineError(str(err)) from err
            plan.append(Planned(stage, stage_cfg, base, seed, level[stage.name]))
    return plan


def _global_batch(planned: Planned) -> int:
    cfg = planned.config
    return cfg.prototypes.batch_size if cfg.stage == "prototypes" else cfg.batch_size


def device_groups(plan: list[Planned], devices: list) -> list[list] | None:
    """Disjoint groups of ``devices``, one per stage of ``plan`` (a wave), or None to run
    them one after another (one stage, one device, or too few processes).

    One process: a group has as many devices as the stages can share equally, at most
    each stage's ``mesh_devices``, and a number that divides every stage's global batch.
    Several processes: :func:`process_groups`.
    """
    if len(plan) < 2 or len(devices) < 2:
        return None
    if len({d.process_index for d in devices}) > 1:
        return process_groups(plan, devices)
    size = len(devices) // len(plan)
    for planned in plan:
        size = math.gcd(size, _global_batch(planned)) if size else 0
        if planned.config.mesh_devices:
            size = min(size, planned.config.mesh_devices)
    if size < 1:
        return None
    return [devices[i * size : (i + 1) * size] for i in range(len(plan))]


def process_groups(plan: list[Planned], devices: list) -> list[list] | None:
    """With several processes, a group is made of whole processes (the processes divided
    equally among the stages, in order; any left over wait), the same number of devices
    from each: the most that keeps the group's size dividing every stage's global batch
    and within its ``mesh_devices``.

    A group has at least two processes: orbax writes a multi-host job's checkpoints from
    arrays that span processes (or from process 0), never from one other process alone.
    """
    by_process: dict[int, list] = {}
    for device in devices:
        by_process.setdefault(device.process_index, []).append(device)
    processes = sorted(by_process)
    per_group = len(processes) // len(plan)
    if per_group < MIN_GROUP_PROCESSES:
        return None
    for per_process in range(min(map(len, by_process.values())), 0, -1):
        size = per_group * per_process
        if all(
            _global_batch(p) % size == 0
            and (not p.config.mesh_devices or size <= p.config.mesh_devices)
            for p in plan
        ):
            break
    else:
        return None
    members = [processes[i * per_group : (i + 1) * per_group] for i in range(len(plan))]
    return [[d for p in group for d in by_process[p][:per_process]] for group in members]


MIN_GROUP_PROCESSES = 2


def waves(plan: list[Planned], slots: int) -> list[list[Planned]]:
    """The stages to run, grouped into what runs at once: each level of the graph, cut into
    chunks of at most ``slots`` stages (the devices of one process, or the processes)."""
    out = []
    for level in sorted({p.level for p in plan}):
        members = [p for p in plan if p.level == level]
        chunk = max(1, slots)
        out += [members[i : i + chunk] for i in range(0, len(members), chunk)]
    return out


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    run_stage: Callable | None = None,
) -> dict:
    """Runs the pipeline's stages wave by wave (skipping finished ones); returns the summary.

    ``run_stage(stage_config, stage_dir, devices=None)`` runs one stage (the real stages
    by default; tests pass a recorder).
    """
    if run_stage is None:
        from ddb_jax import stages

        def run_stage(stage_cfg, stage_dir, devices=None):
            return stages.resolve_stage(stage_cfg.stage)(stage_cfg, stage_dir, devices=devices)

    plan_all = plan_stages(config, workdir)
    plan = selected(config, plan_all)
    for planned in plan:
        check_unchanged(planned.dir, planned.config)
    todo = []
    for planned in plan:
        if is_finished(planned):
            logging.info("pipeline: %s finished earlier, skipped", planned.name)
            print(f"[pipeline] {planned.name}: done earlier, skipped", flush=True)
        else:
            todo.append(planned)
    check_inputs(todo)
    paths.makedirs(workdir)
    paths.write_json(paths.join(workdir, PIPELINE_JSON), workdir_lib.config_as_json(config))
    enable_compilation_cache(workdir)
    devices = jax.devices() if config.get("concurrent_stages", True) else []
    slots = len(devices)
    if jax.process_count() > 1:  # groups of whole processes
        slots = jax.process_count() // MIN_GROUP_PROCESSES * bool(devices)
    with preemption.sigterm_handler():
        for wave in waves(todo, slots):
            groups = device_groups(wave, devices)
            if groups is None:
                for planned in wave:
                    print(f"[pipeline] {planned.name}: running ({planned.config.stage})",
                          flush=True)  # fmt: skip
                    run_stage(planned.config, planned.dir)
                    hosts.barrier(f"ddb_jax pipeline: {planned.name} done")
            else:
                _run_at_once(wave, groups, run_stage)
                hosts.barrier(f"ddb_jax pipeline: {', '.join(p.name for p in wave)} done")
            stopped = [p.name for p in wave if not is_finished(p)]
            if stopped:  # stopped on request (SIGTERM): later stages must not start
                message = f"[pipeline] {', '.join(stopped)} stopped before finishing; rerun"
                print(message + " to continue", flush=True)
                return {}
    summary = summarize(plan_all)
    table = write_summary(workdir, summary)
    print(table, flush=True)
    return summary


def _run_at_once(wave: list[Planned], groups: list[list], run_stage: Callable) -> None:
    """The stages of ``wave`` whose device group this process has a part of, in threads;
    the first error (after every stage has ended: they are independent) is raised."""
    me = jax.process_index()
    pairs = zip(wave, groups, strict=True)
    mine = [(p, group) for p, group in pairs if any(d.process_index == me for d in group)]
    for planned, group in mine:
        where = f"devices {[d.id for d in group]}"
        if jax.process_count() > 1:
            where += f" of processes {sorted({d.process_index for d in group})}"
        print(f"[pipeline] {planned.name}: running ({planned.config.stage}) on {where}",
              flush=True)  # fmt: skip
    if not mine:
        return
    with futures.ThreadPoolExecutor(max_workers=len(mine)) as pool:
        jobs = [
            pool.submit(run_stage, planned.config, planned.dir, devices=group)
            for planned, group in mine
        ]
        errors = [job.exception() for job in jobs]
    for error in errors:
        if error is not None:
            raise error
