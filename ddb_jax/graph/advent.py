"""ADVENT's stage graph (config.graph = 'advent'): AdvEnt and MinEnt, independent stages of
one setting, after the optional baselines; then their 0.5/0.5 ensemble evaluated
(stage 'advent_minent', as the reference's advent+minent evaluation)."""

from __future__ import annotations

import ml_collections

from ddb_jax.graph.stage_graph import EXPORT, Input, Stage, baseline_stages, register_graph


@register_graph("advent")
def advent_graph(config: ml_collections.ConfigDict) -> list[Stage]:
    """ADVENT's rows: AdvEnt and MinEnt, independent stages of one setting."""
    ensemble = (
        Input("checkpoint", "advent", EXPORT),
        Input("eval.ensemble_checkpoint", "minent", EXPORT),
    )
    return [
        *baseline_stages(tuple(config.baselines)),
        Stage("advent", "advent"),
        Stage("minent", "minent"),
        Stage("advent_minent", "evaluate", (("init_from", ""),), ensemble),
    ]
