"""The largest per-device batch of a stage that fits a target's memory, found by compiling.

Memory does not grow linearly with the batch (the compiler tiles, fuses and rematerialises
differently at every size), so the search compiles: the per-device batch doubles from 1
until a compile does not fit, then bisects between the last that fitted and the first that
did not. "Does not fit" is either the report's total above the device's memory or the
compiler refusing the program (TPU: ``RESOURCE_EXHAUSTED: Ran out of memory``, before any
allocation). About log2(largest) x 2 compiles: minutes at full size, on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from ddb_jax.runtime import aot

# What a compiler says when the program does not fit the device (XLA's status code).
OUT_OF_MEMORY = "RESOURCE_EXHAUSTED"


def per_device_fits(
    config: ml_collections.ConfigDict, target: str, per_device: int
) -> tuple[bool, dict[str, Any] | None]:
    """Whether ``config``'s train step at ``per_device`` images per device fits ``target``,
    and its report (None where the compiler refused it for memory)."""
    spec = aot.get_target(target)
    trial = config.copy_and_resolve_references()
    trial.batch_size = per_device * spec.devices  # the check's mesh: every device of the target
    try:
        report = aot.compile_stage(trial, target)
    except Exception as error:  # the compiler's own out-of-memory verdict
        if OUT_OF_MEMORY in str(error):
            return False, None
        raise
    return bool(report["memory"]["fits"]), report


def search(fits: Callable[[int], bool], limit: int) -> tuple[int, list[tuple[int, bool]]]:
    """The largest n in [1, limit] with ``fits(n)`` (0 if 1 does not fit), assuming memory
    grows with n; and the (n, fits) tried, in order."""
    if limit < 1:
        raise ValueError(f"the batch search's limit must be >= 1, got {limit}")
    tried: list[tuple[int, bool]] = []

    def probe(n: int) -> bool:
        tried.append((n, fits(n)))
        return tried[-1][1]

    good, n = 0, 1
    while n <= limit and probe(n):
        good, n = n, 2 * n
    if n <= limit:
        bad = n
    elif good == limit or probe(limit):
        return limit, tried
    else:
        bad = limit
    while bad - good > 1:
        middle = (good + bad) // 2
        if probe(middle):
            good = middle
        else:
            bad = middle
    return good, tried


def largest_batch(config: ml_collections.ConfigDict, target: str, limit: int) -> dict[str, Any]:
    """The search's result for ``config``'s train step on ``target``: the largest batch per
    device up to ``limit``, every compile tried (per device, fits, total bytes, HBM traffic)
    and the largest fitting one's report."""
    reports: dict[int, dict[str, Any] | None] = {}

    def fits(n: int) -> bool:
        ok, reports[n] = per_device_fits(config, target, n)
        return ok

    largest, tried = search(fits, limit)
    return {
        "largest_per_device": largest,
        "limit": limit,
        "tried": [
            {
                "per_device": n,
                "fits": ok,
                "total": None if reports[n] is None else reports[n]["memory"]["total"],
                "hbm_traffic": None if reports[n] is None else reports[n]["traffic"]["total"],
            }
            for n, ok in tried
        ],  # fmt: skip
        "report": reports.get(largest),
    }


def markdown_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The search's rows for the report's table."""
    steps = ", ".join(
        f"{t['per_device']}: {'fits' if t['fits'] else 'no'}"
        + ("" if t["total"] is None else f" ({t['total'] / aot.GIB:.2f} GiB)")
        for t in result["tried"]
    )
    largest = result["largest_per_device"]
    at_limit = " (the search's limit)" if largest == result["limit"] else ""
    return [("largest batch / device", f"{largest}{at_limit}"), ("compiles tried", steps)]
