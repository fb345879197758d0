"""HRDA's comparison as a stage graph (config.graph = 'hrda'): after the optional baselines,
the same self-training stage four times on one full-resolution setting:

- 'single': a single-resolution student on context alone (DAFormer's way: the images at
  half resolution, crops of half the size, whole-image evaluation at half resolution);
- 'single_hr': a single-resolution student on detail alone (HRDA's "HR-only" baseline:
  the images at full resolution, crops of the detail crop's size, whole-image evaluation
  at full resolution);
- 'hrda': HRDA's multi-resolution student (the setting's own ``config.model.hrda``);
- 'mic_hrda': HRDA with MIC's masked image consistency.

The single stage halves the setting's ``data.resize_scales`` (which must name the
full-resolution scale of every dataset, as configs/hrda_recipe.py does) and its crop; the
single_hr stage keeps the scales and the pseudo-label margins of the original images and
crops to ``config.model.hrda.detail_crop``.
"""

from __future__ import annotations

import ml_collections

from ddb_jax.graph.stage_graph import GraphError, Stage, baseline_stages, register_graph


def half_resolution(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """{dataset: half its full-resolution (long, short) scale} for every dataset."""
    scales = dict(config.data.resize_scales)
    datasets = (*config.data.source, *config.data.target)
    missing = [name for name in datasets if not scales.get(name)]
    if missing:
        raise GraphError(
            f"config.graph='hrda' halves config.data.resize_scales, which has no scale for "
            f"{missing}; give each dataset its full-resolution (long, short)"
        )
    return {name: (scales[name][0] // 2, scales[name][1] // 2) for name in datasets}


@register_graph("hrda")
def hrda_graph(config: ml_collections.ConfigDict) -> list[Stage]:
    """Single-resolution self-training at half and at full resolution, HRDA, and MIC on
    HRDA, as independent stages."""
    half_crop = tuple(size // 2 for size in config.data.crop_size)
    single = (
        ("model.hrda.enabled", False),
        ("data.resize_scales", half_resolution(config)),
        ("data.crop_size", half_crop),
        ("data.target_pseudo_margins", (0, 0, 0, 0)),
        ("eval.mode", "whole"),
    )
    single_hr = (
        ("model.hrda.enabled", False),
        ("data.crop_size", tuple(config.model.hrda.detail_crop)),
        ("eval.mode", "whole"),
    )
    return [
        *baseline_stages(tuple(config.baselines)),
        Stage("single", "self_training", single),
        Stage("single_hr", "self_training", single_hr),
        Stage("hrda", "self_training"),
        Stage("mic_hrda", "self_training", (("mic.enabled", True),)),
    ]
