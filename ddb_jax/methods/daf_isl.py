"""DAF/IDA's ISL stage (3D-Vision-Lab-of-JUST/dg_ljw ``train_isl.py``; CTRL's ISL), stage
kind 'daf_isl', section ``config.daf`` (docs/method.md §7.4).

Per iteration, as the reference: the depth-aware DeepLabV2 (training mode, SGD) on a
target batch only, its main logits upsampled to the input size (align_corners=True); CE
against the pseudo-labels of a 'daf_pseudo_labels' stage (``batch['target_label']``, 255
where the softmax was below ``daf.isl_threshold``), over the valid pixels. No depth loss,
no discriminator. The labels' regeneration is the graph's (:mod:`ddb_jax.graph.daf`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import ml_collections
import optax

from ddb_jax.methods import base, daf, optim, previews, registry
from ddb_jax.methods.state import MODEL, Optimizers, TrainState, apply_updates
from ddb_jax.uda import adversarial


@dataclasses.dataclass(frozen=True)
class DafIsl(base.OneTree):
    student_apply: Callable
    segmentor_optim: ml_collections.ConfigDict

    name: ClassVar[str] = "daf_isl"
    key_names: ClassVar[tuple[str, ...]] = ()
    terms: ClassVar[tuple] = ()
    metric_names: ClassVar[tuple[str, ...]] = ("loss_seg_target",)
    preview_tag: ClassVar[str] = "daf_isl"
    preview_panels: ClassVar[tuple[str, ...]] = (
        "target image", "target pseudo-label", "target prediction",
    )  # fmt: skip

    def init_state(self, state: TrainState) -> TrainState:
        return state

    def update(self, txs: Optimizers, state: TrainState, batch, frozen: Any = None):
        """One ISL iteration; see the module docstring."""

        def loss_fn(params):
            logits, _, stats = daf.upsampled(self, params, state.batch_stats,
                                             batch["target_image"])  # fmt: skip
            loss = adversarial.valid_pixel_cross_entropy(logits, batch["target_label"])
            return loss, {"batch_stats": stats, "target_logits": logits}

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = apply_updates(state, {MODEL: grads}, out["batch_stats"], txs)
        metrics = {
            "loss": loss,
            "loss_seg_target": loss,
            "grad_norm": optax.tree.norm(optim.without_frozen(grads, self.segmentor_optim)),
        }
        return new_state, out, metrics

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        return [
            previews.denormalize(batch["target_image"]),
            previews.colorize(batch["target_label"]),
            previews.colorize(outputs["target_logits"].argmax(-1)),
        ]


def check_config(config: ml_collections.ConfigDict) -> None:
    daf.check_network(config)
    if not config.daf.isl_labels:
        raise registry.MethodConfigError(
            "config.stage='daf_isl' reads pseudo-labels: set config.daf.isl_labels to a "
            "'daf_pseudo_labels' stage's folder"
        )


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model) -> DafIsl:
    return DafIsl(student_apply, config.optim)


registry.register(registry.MethodSpec(kinds=("daf_isl",), create=create, check=check_config))
