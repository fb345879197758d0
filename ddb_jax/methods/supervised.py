"""Plain CE on labelled images of ``config.data.source``: the two reference rows of every
domain-adaptation table.

The *source-only* model (trained on the synthetic domain, evaluated on the target) and the
*oracle* (trained on the target's own labelled training set). Same optimiser, schedule,
loop, sharding and checkpoints as the DDB stages, so the rows are comparable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import ml_collections

from ddb_jax.methods import base, previews, registry
from ddb_jax.methods.state import TrainState


@dataclasses.dataclass(frozen=True)
class Supervised(base.OneTree):
    student_apply: Callable
    terms: tuple[tuple[str, base.Term], ...] = (("source", base.source_term),)

    name: ClassVar[str] = "supervised"
    key_names: ClassVar[tuple[str, ...]] = ("dropout_source",)
    metric_names: ClassVar[tuple[str, ...]] = ("acc_source",)
    preview_tag: ClassVar[str] = "supervised"
    preview_panels: ClassVar[tuple[str, ...]] = ("image", "label", "student prediction")

    def init_state(self, state: TrainState) -> TrainState:
        return state

    def prepare(self, state, batch, keys, frozen) -> base.Context:
        return {}

    def finish(self, state: TrainState, outputs: base.Context) -> TrainState:
        return state

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        return [
            previews.denormalize(batch["source_image"]),
            previews.colorize(batch["source_label"]),
            previews.colorize(outputs["source_prediction"]),
        ]


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model) -> Supervised:
    return Supervised(student_apply=student_apply)


registry.register(registry.MethodSpec(kinds=("supervised",), create=create))
