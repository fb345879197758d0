"""ProDA's stage graph (config.graph = 'proda'): its four training stages and the offline
products between them, as the reference's README runs them.

    warmup          stage 0: source CE + output-space LS-GAN (kind 'proda_warmup'); left
                    out when ``proda.warmup_from`` names a converted warm-up model (the
                    released ones), which the stages below then read instead
    soft            the warm-up model's softmax on every target training image
                    (kind 'proda_soft_labels')
    protos          its initial class prototypes (kind 'prototypes', ProDA's rule)
    stage1          prototypical denoising + target structure learning (kind 'proda'),
                    from the warm-up model
    labels1         stage 1's flip-averaged hard pseudo-labels (kind 'proda_pseudo_labels')
    stage2          self-distillation (kind 'proda_distill'): the student from
                    ``proda.student_init`` (ImageNet or SimCLRv2 weights), stage 1 its teacher
    labels2         stage 2's pseudo-labels
    stage3          self-distillation again: the student from stage 2, stage 2 its teacher

Every stage's wiring is here; the pipeline (resumable, skipping what is done) and the
per-stage configs derive from it (:mod:`ddb_jax.graph.stage_graph`).
"""

from __future__ import annotations

import ml_collections

from ddb_jax.graph.stage_graph import (
    EXPORT,
    PROTOTYPES,
    CopyKey,
    Input,
    Stage,
    baseline_stages,
    register_graph,
)  # fmt: skip

SOFT_LABELS = "soft_labels"  # the folder a 'proda_soft_labels' stage writes
PSEUDO_LABELS = "pseudo_labels"  # the folder a 'proda_pseudo_labels' stage writes


# The optimiser of each stage where it differs from the warm-up's (the setting's
# config.optim: SGD, layer5 at 10x, the 1x group's listings stepped as torch 1.x did):
# stage 1 has one group (train.py without --finetune), stages 2/3 train at proda.distill_lr.
STAGE1_OPTIM = (("optim.head_lr_mult", 1.0), ("optim.listed_times", ""))
DISTILL_OPTIM = (("optim.lr", CopyKey("proda.distill_lr")),)


def _model(key: str, producer: str, warmup_from: str) -> tuple[tuple, tuple]:
    """(settings, inputs) that set ``key`` to the warm-up model: a given directory, or the
    warm-up stage's export."""
    if warmup_from:
        return ((key, warmup_from),), ()
    return (), (Input(key, producer, EXPORT),)


def _distillation(n: int, teacher: str, student_init) -> list[Stage]:
    """Stage n's pseudo-labels (from ``teacher``) and stage n, taught by ``teacher``; its
    student from ``student_init`` (a setting), or from the teacher when None."""
    labels = f"labels{n - 1}"
    inputs = (Input("proda.teacher", teacher, EXPORT),
              Input("proda.pseudo_labels", labels, PSEUDO_LABELS))  # fmt: skip
    settings = DISTILL_OPTIM
    if student_init is None:
        inputs += (Input("init_from", teacher, EXPORT),)
    else:
        settings = (("init_from", student_init), *settings)
    return [
        Stage(
            labels,
            "proda_pseudo_labels",
            (("init_from", ""),),
            (Input("checkpoint", teacher, EXPORT),),
        ),  # fmt: skip
        Stage(f"stage{n}", "proda_distill", settings, inputs),
    ]


@register_graph("proda")
def proda_graph(config: ml_collections.ConfigDict) -> list[Stage]:
    warmup_from = config.proda.warmup_from
    stages = list(baseline_stages(tuple(config.baselines)))
    if not warmup_from:
        stages.append(Stage("warmup", "proda_warmup"))
    model_settings, model_inputs = _model("checkpoint", "warmup", warmup_from)
    init_settings, init_inputs = _model("init_from", "warmup", warmup_from)
    offline = (("init_from", ""), *model_settings)
    stage1_inputs = (*init_inputs, Input("proda.soft_labels", "soft", SOFT_LABELS),
                     Input("proda.prototypes", "protos", PROTOTYPES))  # fmt: skip
    return [
        *stages,
        Stage("soft", "proda_soft_labels", offline, model_inputs),
        Stage("protos", "prototypes", (*offline, ("prototypes.mode", "proda")), model_inputs),
        Stage("stage1", "proda", (*init_settings, *STAGE1_OPTIM), stage1_inputs),
        *_distillation(2, "stage1", CopyKey("proda.student_init")),
        *_distillation(3, "stage2", None),
    ]
