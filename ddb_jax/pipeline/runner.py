"""Stage 'pipeline': all of DDB's rounds in one command, resumable stage by stage.

The stages and their wiring are :mod:`ddb_jax.graph.rounds`' graph; the top of the config is the
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

import os
from collections.abc import Callable
from concurrent import futures

import jax
import ml_collections
from absl import logging

from ddb_jax import paths
from ddb_jax.pipeline.plan import (
    Planned,
    check_inputs,
    check_unchanged,
    is_finished,
    plan_stages,
    selected,
)  # fmt: skip
from ddb_jax.pipeline.schedule import MIN_GROUP_PROCESSES, device_groups, waves
from ddb_jax.pipeline.summary import summarize, write_summary
from ddb_jax.runtime import hosts
from ddb_jax.train import preemption
from ddb_jax.train import workdir as workdir_lib

PIPELINE_JSON = "pipeline.json"


COMPILATION_CACHE = "compilation_cache"


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
