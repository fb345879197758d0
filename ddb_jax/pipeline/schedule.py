"""When the pipeline's stages run: waves of independent stages, and the disjoint
groups of devices (or of whole processes) that the stages of a wave run on at once."""

from __future__ import annotations

import math

from ddb_jax.pipeline.plan import Planned


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
