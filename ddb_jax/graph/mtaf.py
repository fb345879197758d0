"""MTAF's stage graph (config.graph = 'mtaf'): the multi-target baseline, Multi-Dis. and
MTKT, independent stages of one multi-target setting after the optional baselines (the
reference trains each from the ImageNet initialisation, ``train.py --cfg <framework>.yml``).

    baseline    ADVENT against every target, shared discriminators (kind 'mtaf_baseline')
    mdis        per-target discriminators and domain classifiers (kind 'mtaf_mdis')
    mtkt        per-target teacher heads distilled into one student head (kind 'mtaf_mtkt'),
                its network with 1 + T classifier pairs (``model.advent_heads``)

Each stage evaluates every target on its own (the setting's ``data.target``): MTKT its
student head, the model's 'logits'. The published runs' per-stage settings (batch sizes,
loss weights) are the setting file's (configs/mtaf_gta2csmap.py).
"""

from __future__ import annotations

import ml_collections

from ddb_jax.graph.stage_graph import Stage, baseline_stages, register_graph


@register_graph("mtaf")
def mtaf_graph(config: ml_collections.ConfigDict) -> list[Stage]:
    heads = 1 + len(config.data.target)  # MTKT: the student, then a teacher per target
    return [
        *baseline_stages(tuple(config.baselines)),
        Stage("baseline", "mtaf_baseline"),
        Stage("mdis", "mtaf_mdis"),
        Stage("mtkt", "mtaf_mtkt", (("model.advent_heads", heads),)),
    ]
