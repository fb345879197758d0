"""The figures of a compiled program, per device, and their markdown: what the compile-only
check (:mod:`ddb_jax.runtime.aot`) reports.

Memory (``memory_analysis``: arguments, temporaries, outputs, total against the device's),
FLOPs and bytes accessed (``cost_analysis``, where the compiler gives them), HBM traffic
from the HLO (:mod:`ddb_jax.runtime.hlo_traffic`), the roofline lower bounds of the step
time, the collectives, transposes and copies of the compiled program (counted in its HLO
text, fused computations included), and the arguments' bytes in the compiler's layouts.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax.runtime import hlo_traffic

if TYPE_CHECKING:
    from ddb_jax.runtime.aot import Target

GIB = 1024**3

# The opcodes counted in the compiled HLO (async pairs counted once, by their -start).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_OPCODE = re.compile(r"=\s*(.*?)\s([a-z][a-z0-9-]*)\(")


def padded_bytes(leaf: jax.ShapeDtypeStruct, layout) -> int:
    """Bytes of one device's shard of ``leaf`` in the compiler's ``layout``: its dimensions in
    the layout's order, the minor ones rounded up to the first tile (TPU: (8, 128) for the
    two minor dimensions of a 32-bit array, 128 for a vector or a scalar)."""
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    itemsize = jnp.dtype(leaf.dtype).itemsize
    if layout is None or not getattr(layout, "tiling", None):
        return math.prod(shape) * itemsize
    physical = [shape[d] for d in layout.major_to_minor] or [1]
    tile = layout.tiling[0]
    for i, size in enumerate(tile):
        j = len(physical) - len(tile) + i
        if j >= 0:
            physical[j] = -(-physical[j] // size) * size
    return math.prod(physical) * itemsize


def arguments_in_layouts(arguments: dict[str, Any], compiled) -> dict[str, int] | None:
    """Per device, the bytes of each named argument tree of the program (in the order they
    were passed) from its abstract leaves and the layouts the compiler chose for them (None
    where it does not say)."""
    try:
        formats = compiled.input_formats[0]
    except Exception:
        return None
    out = {}
    for (name, tree), fmt in zip(arguments.items(), formats, strict=True):
        leaves = jax.tree_util.tree_leaves(tree)
        layouts = [getattr(f, "layout", None) for f in jax.tree_util.tree_leaves(fmt)]
        if len(layouts) != len(leaves):
            return None
        out[name] = sum(padded_bytes(x, lay) for x, lay in zip(leaves, layouts, strict=True))
    return out


def hlo_counts(text: str) -> dict[str, Any]:
    """Collectives (count and result bytes, by kind), transposes and copies in HLO text."""
    collectives = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
    transposes = copies = 0
    for line in text.splitlines():
        match = _OPCODE.search(line)
        if not match:
            continue
        shapes, opcode = match.groups()
        if opcode == "transpose":
            transposes += 1
        elif opcode in ("copy", "copy-start"):
            copies += 1
        else:
            kind = opcode.removesuffix("-start")
            if kind in collectives and not opcode.endswith("-done"):
                collectives[kind]["count"] += 1
                collectives[kind]["bytes"] += hlo_traffic.shape_bytes(shapes, hbm_only=False)
    collectives = {k: v for k, v in collectives.items() if v["count"]}
    return {
        "collectives": collectives,
        "collective_count": sum(v["count"] for v in collectives.values()),
        "collective_bytes": sum(v["bytes"] for v in collectives.values()),
        "transposes": transposes,
        "copies": copies,
    }


def _cost(compiled) -> dict[str, float] | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some compilers give none
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost:
        return None
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def program_figures(compiled, spec: Target) -> dict[str, Any]:
    """Per device of ``spec``: the compiled program's memory (against the device's), cost,
    roofline bound and HLO counts."""
    mem = compiled.memory_analysis()
    memory = {
        "arguments": int(mem.argument_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes),  # outputs in the donated arguments' buffers
        "temporaries": int(mem.temp_size_in_bytes),
        "code": int(mem.generated_code_size_in_bytes),
    }
    memory["total"] = (
        memory["arguments"] + memory["outputs"] - memory["aliased"]
        + memory["temporaries"] + memory["code"]
    )  # fmt: skip
    memory["device"] = spec.memory_bytes
    memory["fits"] = memory["total"] <= spec.memory_bytes if spec.memory_bytes else None
    cost = _cost(compiled)
    text = compiled.as_text()
    traffic = hlo_traffic.traffic(text, top=8)
    roofline = None
    if cost is not None and spec.peak_flops and spec.memory_bandwidth:
        roofline = {
            "compute_s": cost["flops"] / spec.peak_flops,
            "memory_s": cost["bytes"] / spec.memory_bandwidth,
            # main-memory bytes only (hlo_traffic): on-chip staging costs no HBM bandwidth
            "hbm_s": traffic["total"] / spec.memory_bandwidth,
        }
        roofline["bound_s"] = max(roofline["compute_s"], roofline["memory_s"])
        roofline["hbm_bound_s"] = max(roofline["compute_s"], roofline["hbm_s"])
    return {
        "memory": memory, "cost": cost, "roofline": roofline, "hlo": hlo_counts(text),
        "traffic": traffic,
    }  # fmt: skip


def _gib(value: float) -> str:
    if value < GIB / 10:
        return f"{value / 1024**2:.1f} MiB"
    return f"{value / GIB:.2f} GiB"


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    return table(markdown_rows(report))


def markdown_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's rows: what was compiled, then :func:`figure_rows`."""
    target, model = report["target"], report["model"]
    return [
        ("target", f"{target['name']} ({target['topology']}, {target['device']})"),
        ("stage", f"{report['stage']}: {model['backbone']} + {model['head']}, {model['dtype']}"),
        ("batch", f"{report['batch_size']} ({report['batch_per_device']} per device), "
                  f"crop {report['crop_size']}, target crop {report['target_crop_size']}"),
        ("state layouts", report.get("state_layouts", "row-major")),
        *figure_rows(report),
    ]  # fmt: skip


def table(rows: list[tuple[str, str]]) -> str:
    """``rows`` as a two-column markdown table."""
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def figure_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The markdown rows of :func:`program_figures` and the compile times."""
    mem, hlo, cost, roof = report["memory"], report["hlo"], report["cost"], report["roofline"]
    return [
        ("arguments / device", _gib(mem["arguments"])),
        ("temporaries / device", _gib(mem["temporaries"])),
        ("outputs / device", f"{_gib(mem['outputs'])} ({_gib(mem['aliased'])} in donated buffers)"),
        ("total / device", _gib(mem["total"]) + ("" if mem["fits"] is None else
            f" of {_gib(mem['device'])}: " + ("fits" if mem["fits"] else "does NOT fit"))),
        ("FLOPs / device", "n/a" if cost is None else f"{cost['flops'] / 1e9:.1f} GFLOP"),
        ("bytes accessed / device", "n/a" if cost is None else _gib(cost["bytes"])),
        ("roofline bound", "n/a" if roof is None else
            f"{roof['bound_s'] * 1e3:.1f} ms (compute {roof['compute_s'] * 1e3:.1f} ms, "
            f"memory {roof['memory_s'] * 1e3:.1f} ms)"),
        ("HBM traffic / device (HLO)", _gib(report["traffic"]["total"]) + (
            "" if roof is None else f": roofline {roof['hbm_bound_s'] * 1e3:.1f} ms "
            f"(memory {roof['hbm_s'] * 1e3:.1f} ms)")),
        ("collectives", f"{hlo['collective_count']} ({_gib(hlo['collective_bytes'])}): "
            + (", ".join(f"{k} {v['count']}" for k, v in hlo["collectives"].items()) or "none")),
        ("transposes / copies", f"{hlo['transposes']} / {hlo['copies']}"),
        ("lower / compile", f"{report['lower_s']} s / {report['compile_s']} s"
            + "".join(f", {k}={v}" for k, v in report.get("compiler_options", {}).items())),
    ]  # fmt: skip


def numpy_free(report: Any) -> Any:
    """``report`` with numpy scalars as Python numbers (for json.dump)."""
    if isinstance(report, dict):
        return {k: numpy_free(v) for k, v in report.items()}
    if isinstance(report, list | tuple):
        return [numpy_free(v) for v in report]
    if isinstance(report, np.generic):
        return report.item()
    return report
