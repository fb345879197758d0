"""DAF/IDA's intra-domain stage (dg_ljw ``train_intra.py``, IntraDA's ``train_UDA.py``),
stage kind 'daf_ida', section ``config.daf`` (docs/method.md §7.4).

AdvEnt, main classifier only (MULTI_LEVEL False), from the easy split (the labelled
source: its images with the ranking stage's argmax labels, CE) to the hard split (the
target): the depth-aware network's main logits, ADVENT's self-information maps (no
depth), ADVENT's discriminator with its own Adam (``daf.ida_optim_d``), each half of its
loss halved as in train_intra.py. This is :class:`ddb_jax.methods.advent.Advent` on the
DAF network with the IDA weights; the batches come from :mod:`input_pipeline.daf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax.numpy as jnp
import ml_collections

from ddb_jax import models
from ddb_jax.methods import daf, registry
from ddb_jax.methods.advent import Advent
from ddb_jax.models.discriminator import FCDiscriminator


@dataclasses.dataclass(frozen=True)
class DafIda(Advent):
    name: ClassVar[str] = "daf_ida"
    preview_tag: ClassVar[str] = "daf_ida"


def check_config(config: ml_collections.ConfigDict) -> None:
    daf.check_network(config)
    if not config.daf.rank:
        raise registry.MethodConfigError(
            "config.stage='daf_ida' reads the easy and hard splits: set config.daf.rank to a "
            "'daf_rank' stage's folder"
        )


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model) -> DafIda:
    cfg = ml_collections.ConfigDict(
        dict(lambda_seg_aux=0.0, lambda_adv_main=config.daf.ida_lambda_adv_main,
             lambda_adv_aux=0.0, optim_d=config.daf.ida_optim_d.to_dict(),
             num_classes=config.model.num_classes)
    )  # fmt: skip
    dtype = jnp.promote_types(models.compute_dtype(config.model.dtype), jnp.float32)
    disc = FCDiscriminator(ndf=config.daf.disc_channels, dtype=dtype)
    return DafIda(
        student_apply=student_apply, disc_apply=disc.apply, disc_init=disc.init, cfg=cfg,
        minent=False, levels=(("main", "logits"),), segmentor_optim=config.optim,
    )  # fmt: skip


registry.register(registry.MethodSpec(kinds=("daf_ida",), create=create, check=check_config))
