"""ProDA's stage 0, the warm-up (microsoft/ProDA ``CustomModel.step_adv``, ``--stage
warm_up``): source supervision with output-space adversarial alignment. Stage kind
'proda_warmup'; its settings are ``config.proda_warmup``.

Per iteration, as the reference (``--gan LS --adv 0.01``, no ``--S_pseudo_src``):

1. the segmentor (training mode: BN on batch statistics, dropout on) on the source and
   then the target images, logits upsampled to each image's size (align_corners=True);
2. segmentor loss: CE on the source (mean over valid pixels) + ``adv_weight`` x the GAN
   loss of ``D(softmax(target))`` against the source label 0 (fool the discriminator,
   frozen for this term);
3. discriminator loss: ``L(D(softmax(source)), 0) + L(D(softmax(target)), 1)`` on the
   detached maps of 1 (not halved), ``L`` least squares (``gan='ls'``, MSE) or BCE with
   logits (``gan='bce'``, the reference's 'Vanilla'), each a mean over D's output;
4. SGD on the segmentor (``config.optim``), Adam on the discriminator (``optim_d``).

The reference steps the segmentor before the discriminator's forward, but that forward
reads outputs computed (and detached) before the step with the discriminator's pre-step
parameters, so both updates are computed from the pre-step trees and applied at once
(:func:`ddb_jax.methods.state.apply_updates`), with the same result.

Batch: ``source_image`` [B, Hs, Ws, 3], ``source_label`` [B, Hs, Ws] (255 = ignore),
``target_image`` [B, Ht, Wt, 3] (one stream over the union of the targets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddb_jax import config_rules, models
from ddb_jax.methods import advent, base, optim, previews, registry
from ddb_jax.methods.state import MODEL, Optimizers, TrainState, apply_updates
from ddb_jax.models.discriminator import proda_discriminator
from ddb_jax.ops import resize_bilinear_corners, upcast
from ddb_jax.uda import adversarial

DISCRIMINATOR = "d"  # the discriminator's tree in ``state.others``
# config.proda_warmup.gan -> the loss against a constant domain label.
GAN_LOSSES = {"ls": adversarial.mse_to_label, "bce": adversarial.bce_to_label}


def default_config() -> ml_collections.ConfigDict:
    """``config.proda_warmup``: parser_train.py's defaults and CustomModel's D optimiser."""
    return ml_collections.ConfigDict(
        dict(
            adv_weight=0.01,  # --adv
            gan="ls",  # --gan: 'ls' (LS, the default) | 'bce' (Vanilla)
            disc_channels=64,  # FCDiscriminator's planes
            # Adam(lr 1e-4, betas (0.9, 0.99)) with the segmentor's poly 0.9 law
            # (PolynomialLR over --train_iters); max_iters 0 = config.optim's horizon.
            optim_d=advent.discriminator_adam("adam", 0),
        )
    )


def segmentor_forward(method: ProDAWarmup, params, batch_stats, images, key):
    """The segmentor in training mode; its logits upsampled to the images' size."""
    outputs, stats = base.student_forward(method.student_apply, params, batch_stats, images, key)
    return resize_bilinear_corners(upcast(outputs["logits"]), images.shape[1:3]), stats


@dataclasses.dataclass(frozen=True)
class ProDAWarmup:
    student_apply: Callable
    disc_apply: Callable  # proda_discriminator(...).apply
    disc_init: Callable
    cfg: ml_collections.ConfigDict  # config.proda_warmup
    disc_optim: ml_collections.ConfigDict  # optim_d, its horizon resolved
    num_classes: int

    name: ClassVar[str] = "proda_warmup"
    key_names: ClassVar[tuple[str, ...]] = ("dropout_source", "dropout_target")
    terms: ClassVar[tuple] = ()
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss_source", "loss_adv", "loss_d", "loss_d_source", "loss_d_target",
        "d_source", "d_target",
    )  # fmt: skip
    preview_tag: ClassVar[str] = "proda_warmup"
    preview_panels: ClassVar[tuple[str, ...]] = (
        "source image", "source label", "source prediction", "target image",
        "target prediction",
    )  # fmt: skip

    @property
    def other_trees(self) -> Mapping[str, ml_collections.ConfigDict]:
        return {DISCRIMINATOR: self.disc_optim}

    def init_others(self, key: jax.Array) -> dict[str, Any]:
        """PyTorch's default initialisation of the discriminator (the reference keeps it)."""
        probe = jnp.zeros((1, 32, 32, self.num_classes), jnp.float32)
        return {DISCRIMINATOR: self.disc_init(key, probe)["params"]}

    def init_state(self, state: TrainState) -> TrainState:
        return state

    def discriminate(self, params, probs: jax.Array) -> jax.Array:
        return self.disc_apply({"params": params}, probs)

    def gradients(self, state: TrainState, batch) -> tuple[dict, base.Context, dict]:
        """``({tree: gradient}, outputs, metrics)`` of one iteration, from the pre-step
        trees (the update applies them; the parity test reads them)."""
        keys = base.StepKeys(state, self.key_names)
        gan = GAN_LOSSES[self.cfg.gan]
        disc = state.others[DISCRIMINATOR].params

        def segmentor_loss(params):
            source, stats = segmentor_forward(
                self, params, state.batch_stats, batch["source_image"], keys["dropout_source"]
            )
            target, stats = segmentor_forward(
                self, params, stats, batch["target_image"], keys["dropout_target"]
            )
            loss_source = adversarial.valid_pixel_cross_entropy(source, batch["source_label"])
            probs = {"source": jax.nn.softmax(source), "target": jax.nn.softmax(target)}
            loss_adv = gan(self.discriminate(disc, probs["target"]), adversarial.SOURCE_LABEL)
            out = {"batch_stats": stats, "source": source, "target": target, "probs": probs,
                   "loss_source": loss_source, "loss_adv": loss_adv}  # fmt: skip
            return loss_source + self.cfg.adv_weight * loss_adv, out

        (loss, out), grads = jax.value_and_grad(segmentor_loss, has_aux=True)(state.params)
        probs = jax.lax.stop_gradient(out["probs"])  # D trains on detached maps

        def discriminator_loss(params):
            d_source = self.discriminate(params, probs["source"])
            d_target = self.discriminate(params, probs["target"])
            as_source = gan(d_source, adversarial.SOURCE_LABEL)
            as_target = gan(d_target, adversarial.TARGET_LABEL)
            parts = {"loss_d_source": as_source, "loss_d_target": as_target,
                     "d_source": jnp.mean(d_source), "d_target": jnp.mean(d_target)}  # fmt: skip
            return as_source + as_target, parts

        (d_loss, parts), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(disc)
        out.update(parts, loss_d=d_loss)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "grad_norm_d": optax.tree.norm(d_grads),
                   **{k: out[k] for k in self.metric_names}}  # fmt: skip
        return {MODEL: grads, DISCRIMINATOR: d_grads}, out, metrics

    def update(self, txs: Optimizers, state: TrainState, batch, frozen: Any = None):
        """One warm-up iteration; see the module docstring."""
        grads, out, metrics = self.gradients(state, batch)
        return apply_updates(state, grads, out["batch_stats"], txs), out, metrics

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        """Source and target panels, the target's at the source's size (nearest)."""
        size = batch["source_image"].shape[1:3]
        target = [
            previews.denormalize(batch["target_image"]),
            previews.colorize(jnp.argmax(outputs["target"], axis=-1)),
        ]
        return [
            previews.denormalize(batch["source_image"]),
            previews.colorize(batch["source_label"]),
            previews.colorize(jnp.argmax(outputs["source"], axis=-1)),
            *(panel_at(panel, size) for panel in target),
        ]


def panel_at(panel: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(N, H, W, C) -> (N, *size, C), nearest (floor of the scaled index)."""
    rows = (jnp.arange(size[0]) * panel.shape[1]) // size[0]
    cols = (jnp.arange(size[1]) * panel.shape[2]) // size[1]
    return panel[:, rows][:, :, cols]


def discriminator_optim(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``optim_d`` with ``max_iters=0`` read as the segmentor's horizon (the reference's two
    schedulers share --train_iters)."""
    cfg = ml_collections.ConfigDict(config.proda_warmup.optim_d.to_dict())
    cfg.max_iters = cfg.max_iters or config.optim.get("max_iters", 0)
    return cfg


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model) -> ProDAWarmup:
    # The discriminator computes in float32 at least (float64 in the parity test).
    dtype = jnp.promote_types(models.compute_dtype(config.model.dtype), jnp.float32)
    disc = proda_discriminator(config.proda_warmup.disc_channels, dtype)
    return ProDAWarmup(
        student_apply=student_apply,
        disc_apply=disc.apply,
        disc_init=disc.init,
        cfg=config.proda_warmup,
        disc_optim=discriminator_optim(config),
        num_classes=config.model.num_classes,
    )


def section_rules() -> dict:
    """What each value of ``config.proda_warmup`` may be (ddb_jax.config_checks)."""
    optimiser = {k: rule for k, rule in optim.OPTIM_RULES.items() if k != "listed_times"}
    optimiser["max_iters"] = config_rules.integer(0, "0 = config.optim.max_iters")
    return {
        "adv_weight": config_rules.NON_NEGATIVE,
        "gan": config_rules.one_of(tuple(GAN_LOSSES)),
        "disc_channels": config_rules.POSITIVE,
        **{f"optim_d.{key}": rule for key, rule in optimiser.items()},
    }


registry.register(
    registry.MethodSpec(
        kinds=("proda_warmup",),
        create=create,
        check=base.check_one_target_stream,
        config_section=("proda_warmup", default_config),
        section_rules=section_rules,
    )
)
