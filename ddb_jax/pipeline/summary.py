"""The pipeline's summary: each training stage's mIoUs (mean and spread over seeds)
as JSON and a markdown table."""

from __future__ import annotations

import numpy as np

from ddb_jax import labels, paths
from ddb_jax.pipeline.plan import Planned
from ddb_jax.train import workdir as workdir_lib

SUMMARY_MD = "summary.md"


SUMMARY_JSON = "summary.json"


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
        steps = "-" if row["steps"] is None else row["steps"]
        lines.append(f"| {name} | {row['stage']} | {steps} | " + " | ".join(cells) + " |")
    note = "mIoU of the student of each stage on the validation set(s)"
    if any(row["stage"] == "evaluate" for row in summary["stages"].values()):
        note += " ('evaluate': of the models it evaluates)"
    if seeds:
        note += f"; mean ± standard deviation over seeds {', '.join(map(str, seeds))}"
    return "\n".join(lines) + f"\n\n{note}."


def write_summary(workdir: str, summary: dict) -> str:
    table = format_summary(summary)
    paths.write_text(paths.join(workdir, SUMMARY_MD), table + "\n")
    paths.write_json(paths.join(workdir, SUMMARY_JSON), summary)
    return table
