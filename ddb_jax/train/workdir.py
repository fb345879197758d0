"""A training stage's directory: what it holds and how each file is written.

    WORKDIR/config.json    the config of the run (a rerun with another config is refused)
    WORKDIR/checkpoints/   orbax train-state checkpoints (:mod:`ddb_jax.train.checkpointing`)
    WORKDIR/events.*       TensorBoard summaries (CLU metric writers)
    WORKDIR/best/          the best-mIoU student so far, a model directory + score.json
    WORKDIR/export/        the final student, a model directory (the stage's deliverable)
    WORKDIR/result.json    the final evaluation

Every file is written whole or not at all, on a local disk or in a bucket (``gs://``),
through :mod:`ddb_jax.paths`.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from ddb_jax import checkpoints, errors, paths
from ddb_jax.runtime import hosts

CONFIG_JSON = "config.json"
RESULT_JSON = "result.json"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
BEST_DIR = "best"
BEST_SCORE = "score.json"
# Keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_KEYS = (
    "log_every", "image_summary_every", "eval_every", "checkpoint_every", "keep_checkpoints",
    "eval.", "data.root", "data.num_parallel_calls", "data.image_transfer", "model.remat",
    "stages", "state_layouts",
)  # fmt: skip


# Keys the code gained after runs were made, with the value that reproduces those runs: a
# stored config without one of them reads as holding that value, so a run of an earlier
# version resumes (another value is still a different config).
ADDED_KEYS = {"model.bn_statistics": "two_pass"}


class WorkdirMismatchError(errors.UsageError, ValueError):
    """The workdir holds a run of another config."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': leaf} of a nested dict (tuples as lists, as JSON stores them)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_as_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=list))


def config_differences(stored: dict, current: dict) -> list[str]:
    """'key: old -> new' for every key that differs and matters for the result (a key of
    :data:`ADDED_KEYS` that ``stored`` lacks holds its value there)."""
    a, b = flatten(stored), flatten(current)
    for key, value in ADDED_KEYS.items():
        if key in b:
            a.setdefault(key, value)
    keys = sorted(
        k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_KEYS)
    )
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def stored_config(workdir: str) -> dict | None:
    path = paths.join(workdir, CONFIG_JSON)
    return paths.read_json(path) if paths.exists(path) else None


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir that holds a run of a different config (naming the keys)."""
    stored = stored_config(workdir)
    if stored is None:
        return
    diffs = config_differences(stored, config_as_json(config))
    if diffs:
        raise WorkdirMismatchError(
            f"{workdir} holds a run of another config (differing keys: "
            f"{', '.join(diffs[:10])}); use a new --workdir, or delete {workdir} to redo it"
        )


def record_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Checks the workdir against ``config`` and records it there (first run only)."""
    paths.check_bucket(workdir, "--workdir")
    check_config(workdir, config)
    if stored_config(workdir) is None:
        paths.makedirs(workdir)
        # Every process writes the same file (each whole), so no process waits for another.
        paths.write_json(paths.join(workdir, CONFIG_JSON), config_as_json(config))


def read_best_score(workdir: str) -> float:
    path = paths.join(workdir, BEST_DIR, BEST_SCORE)
    return float(paths.read_json(path)["miou"]) if paths.exists(path) else -1.0


def export_best(
    workdir: str,
    variables: dict,
    model_cfg,
    stage: str,
    step: int,
    score: float,
    stage_hosts: hosts.Hosts | None = None,
) -> None:
    """The student of ``step`` as ``best/`` (by process 0 alone, or by ``stage_hosts``
    together: :func:`ddb_jax.checkpoints.save_model_dir`)."""
    out = paths.join(workdir, BEST_DIR)
    checkpoints.save_model_dir(
        out, variables, model_cfg, {"stage": stage}, overwrite=True, stage_hosts=stage_hosts
    )
    if stage_hosts is None or stage_hosts.is_primary:
        paths.write_json(paths.join(out, BEST_SCORE), {"miou": score, "step": step})


def export_final(
    workdir: str,
    variables: dict,
    config: ml_collections.ConfigDict,
    result: dict,
    stage_hosts: hosts.Hosts | None = None,
) -> None:
    """The final student as ``export/`` and its evaluation as ``result.json`` (written
    last: with it the stage is finished)."""
    checkpoints.save_model_dir(
        paths.join(workdir, EXPORT_DIR),
        variables,
        config.model,
        {"stage": config.stage, "step": str(config.num_steps)},
        overwrite=True,
        stage_hosts=stage_hosts,
    )
    if stage_hosts is None or stage_hosts.is_primary:
        summary = {k: v for k, v in result.items() if not isinstance(v, dict)}
        paths.write_json(paths.join(workdir, RESULT_JSON), {"step": config.num_steps, **summary})
