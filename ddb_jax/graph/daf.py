"""DAF/IDA's stage graph (config.graph = 'daf'), as the reference's README runs it
(docs/method.md §7):

    daf         depth-aware adaptation (kind 'daf')
    labels1     pseudo-labels of daf's best model (kind 'daf_pseudo_labels')
    isl1        ISL round 1 (kind 'daf_isl'), from daf's best model
    labels<k>   pseudo-labels of isl<k-1>'s final model (train_isl.py regenerates them from
                the current model at GEN_PSEUDO_LABELS_EVERY)
    isl<k>      ISL round k, from isl<k-1>'s final model; ``daf.isl_round_steps[k-1]`` steps
    rank        the depth-aware ranking of the last round's best model (kind 'daf_rank')
    ida         intra-domain AdvEnt (kind 'daf_ida'), from the last round's best model

The rounds are ``len(daf.isl_round_steps)``: the reference's (10001, 10000, 5000) are its
regenerations at 0, 10001, 20001 and its stop at 25000. Each round restarts the SGD
momentum and the poly schedule (over ``daf.isl_max_iters``), where the reference carries
both across regenerations. The best model is the training loop's ``best/`` (it needs
evaluation, ``eval_every`` > 0).
"""

from __future__ import annotations

import ml_collections

from ddb_jax.graph.stage_graph import EXPORT, CopyKey, Input, Stage, baseline_stages, register_graph

BEST = "best"  # a training stage's best-mIoU model directory (ddb_jax.train.workdir)
PSEUDO_LABELS = "pseudo_labels"  # the folder a 'daf_pseudo_labels' stage writes
RANK = "rank"  # the folder a 'daf_rank' stage writes
# The depth regressor feeds only the depth, which no loss of ISL or IDA reads: the
# reference's SGD never steps it (its gradients stay None), so those stages freeze it here
# (a zero gradient would still move it by weight decay and momentum).
DEPTH_ONLY = ("depth_head.convR0", "depth_head.bnR0", "depth_head.convR2")


def _labels(name: str, producer: str, artifact: str) -> Stage:
    return Stage(name, "daf_pseudo_labels", (("init_from", ""),),
                 (Input("checkpoint", producer, artifact),))  # fmt: skip


@register_graph("daf")
def daf_graph(config: ml_collections.ConfigDict) -> list[Stage]:
    steps = tuple(int(s) for s in config.daf.isl_round_steps)
    stages = [*baseline_stages(tuple(config.baselines)), Stage("daf", "daf")]
    model, artifact = "daf", BEST
    freeze = ("optim.frozen_keys", (*config.optim.frozen_keys, *DEPTH_ONLY))
    isl_settings = (("optim.max_iters", CopyKey("daf.isl_max_iters")), freeze)
    for k, n in enumerate(steps, start=1):
        stages += [
            _labels(f"labels{k}", model, artifact),
            Stage(f"isl{k}", "daf_isl", (("num_steps", n), *isl_settings),
                  (Input("init_from", model, artifact),
                   Input("daf.isl_labels", f"labels{k}", PSEUDO_LABELS))),
        ]  # fmt: skip
        model, artifact = f"isl{k}", EXPORT
    last = f"isl{len(steps)}" if steps else "daf"
    ida_settings = (("num_steps", CopyKey("daf.ida_steps")),
                    ("optim.max_iters", CopyKey("daf.ida_max_iters")), freeze)  # fmt: skip
    return [
        *stages,
        Stage(RANK, "daf_rank", (("init_from", ""),), (Input("checkpoint", last, BEST),)),
        Stage("ida", "daf_ida", ida_settings,
              (Input("init_from", last, BEST), Input("daf.rank", RANK, RANK))),
    ]  # fmt: skip
