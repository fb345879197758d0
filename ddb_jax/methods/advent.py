"""ADVENT (Vu et al., CVPR 2019; valeoai/ADVENT): AdvEnt and MinEnt, docs/method.md §2.

Per iteration, as the reference's ``train_advent``: the segmentor (SGD) on the labelled
source (CE of the main and auxiliary classifiers, logits upsampled to the input size with
align_corners=True) and, on the target, either an adversarial term (AdvEnt: each output
level's discriminator, frozen for this term, should take the target's self-information
map for a source one) or the entropy itself (MinEnt); each discriminator (its own Adam)
on the detached source and target maps, each half of its loss halved. Every update is
computed from the pre-step parameters and applied together
(:func:`ddb_jax.methods.state.apply_updates`), as the reference's three ``step()`` calls
at the end of an iteration. Stage kinds: 'advent' and 'minent'.
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
from ddb_jax.methods import base, optim, previews, registry
from ddb_jax.methods.state import MODEL, Optimizers, TrainState, apply_updates
from ddb_jax.models.discriminator import FCDiscriminator
from ddb_jax.ops import resize_bilinear_corners
from ddb_jax.uda import adversarial

LEVELS = {"main": "logits", "aux": "aux_logits"}  # output level -> the model's output name


def discriminator_adam(kind: str, max_iters: int) -> ml_collections.ConfigDict:
    """A discriminator's optimiser section: Adam at 1e-4, betas (0.9, 0.99), poly 0.9 over
    ``max_iters`` (0: the segmentor's horizon), no decay (ADVENT's and ProDA's)."""
    return ml_collections.ConfigDict(
        dict(kind=kind, lr=1e-4, b1=0.9, b2=0.99, momentum=0.0, weight_decay=0.0,
             head_lr_mult=1.0, warmup_iters=0, warmup_ratio=1e-6, poly_power=0.9, min_lr=0.0,
             max_iters=max_iters)
    )  # fmt: skip


def default_config() -> ml_collections.ConfigDict:
    """ADVENT's defaults (advent/domain_adaptation/config.py)."""
    return ml_collections.ConfigDict(
        dict(
            lambda_seg_aux=0.1,
            lambda_adv_main=1e-3,
            lambda_adv_aux=2e-4,
            lambda_ent_main=1e-3,
            lambda_ent_aux=2e-4,
            disc_channels=64,  # ndf of the discriminators' first conv
            # The discriminators' Adam: LEARNING_RATE_D, betas (0.9, 0.99), poly 0.9 over
            # MAX_ITERS (250k) though training stops at EARLY_STOP (120k); PyTorch 0.4.1's
            # eps placement ('adam' for today's).
            optim_d=discriminator_adam("adam041", 250_000),
        )
    )


def segmentor_forward(method, params, batch_stats, images):
    """The segmentor in training mode (ADVENT's ``model.train()``: BN on batch statistics,
    running statistics updated), its outputs upsampled to the images' size."""
    outputs, updates = method.student_apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    size = images.shape[1:3]
    upsampled = {
        level: resize_bilinear_corners(outputs[name], size) for level, name in method.levels
    }
    return upsampled, updates["batch_stats"]


@dataclasses.dataclass(frozen=True)
class Advent:
    student_apply: Callable
    disc_apply: Callable  # FCDiscriminator.apply
    disc_init: Callable  # FCDiscriminator.init
    cfg: ml_collections.ConfigDict  # config.advent
    minent: bool  # MinEnt instead of the adversarial term
    levels: tuple[tuple[str, str], ...]  # (level, output name): main, and aux if multi-level
    segmentor_optim: ml_collections.ConfigDict  # config.optim (its frozen keys)

    name: ClassVar[str] = "advent"
    key_names: ClassVar[tuple[str, ...]] = ()  # ADVENT draws nothing at random in a step
    terms: ClassVar[tuple] = ()
    preview_tag: ClassVar[str] = "advent"
    preview_panels: ClassVar[tuple[str, ...]] = (
        "source image", "source label", "source prediction", "target image",
        "target prediction", "target entropy",
    )  # fmt: skip

    @property
    def other_trees(self) -> Mapping[str, ml_collections.ConfigDict]:
        """A discriminator per output level (AdvEnt); none for MinEnt."""
        return {} if self.minent else {f"d_{level}": self.cfg.optim_d for level, _ in self.levels}

    @property
    def metric_names(self) -> tuple[str, ...]:
        target = "ent" if self.minent else "adv"
        names = [f"loss_{what}_{level}" for what in ("seg", target) for level, _ in self.levels]
        if not self.minent:
            names += [f"loss_d_{level}" for level, _ in self.levels]
        return tuple(names)

    def init_others(self, key: jax.Array) -> dict[str, Any]:
        """PyTorch's default initialisation of each discriminator (the reference keeps it)."""
        probe = jnp.zeros((1, 64, 64, self.num_classes), jnp.float32)
        keys = jax.random.split(key, len(self.other_trees))
        return {
            name: self.disc_init(k, probe)["params"]
            for name, k in zip(self.other_trees, keys, strict=True)
        }

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def init_state(self, state: TrainState) -> TrainState:
        return state

    def discriminate(self, params, maps: jax.Array) -> jax.Array:
        return self.disc_apply({"params": params}, maps)

    def update(self, txs: Optimizers, state: TrainState, batch, frozen: Any = None):
        """One ADVENT iteration; see the module docstring."""
        cfg = self.cfg
        disc_params = {name: tree.params for name, tree in state.others.items()}

        def segmentor_loss(params):
            source, stats = segmentor_forward(
                self, params, state.batch_stats, batch["source_image"]
            )
            target, stats = segmentor_forward(self, params, stats, batch["target_image"])
            out = {"batch_stats": stats, "source": source, "target": target}
            weights = {"main": 1.0, "aux": cfg.lambda_seg_aux}
            total = 0.0
            for level, _ in self.levels:
                seg = adversarial.valid_pixel_cross_entropy(source[level], batch["source_label"])
                out[f"loss_seg_{level}"] = seg
                total = total + weights[level] * seg
                target_probs = jax.nn.softmax(target[level], axis=-1)
                if self.minent:
                    term = adversarial.entropy_loss(target_probs)
                    out[f"loss_ent_{level}"] = term
                    total = total + cfg[f"lambda_ent_{level}"] * term
                else:
                    # Both domains' maps: this term's, and the discriminators' inputs below.
                    maps = {
                        "target": adversarial.self_information(target_probs),
                        "source": adversarial.self_information(
                            jax.nn.softmax(source[level], axis=-1)
                        ),
                    }
                    out[f"maps_{level}"] = maps
                    fooled = self.discriminate(disc_params[f"d_{level}"], maps["target"])
                    term = adversarial.bce_to_label(fooled, adversarial.SOURCE_LABEL)
                    out[f"loss_adv_{level}"] = term
                    total = total + cfg[f"lambda_adv_{level}"] * term
            return total, out

        (loss, out), grads = jax.value_and_grad(segmentor_loss, has_aux=True)(state.params)
        all_grads = {MODEL: grads}
        trained = optim.without_frozen(grads, self.segmentor_optim)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(trained)}
        if not self.minent:

            def discriminator_loss(params, level):
                maps = jax.lax.stop_gradient(out[f"maps_{level}"])  # D on detached maps
                as_source = adversarial.bce_to_label(
                    self.discriminate(params, maps["source"]), adversarial.SOURCE_LABEL
                )
                as_target = adversarial.bce_to_label(
                    self.discriminate(params, maps["target"]), adversarial.TARGET_LABEL
                )
                return as_source / 2 + as_target / 2

            for level, _ in self.levels:
                name = f"d_{level}"
                d_loss, all_grads[name] = jax.value_and_grad(discriminator_loss)(
                    disc_params[name], level
                )
                out[f"loss_d_{level}"] = d_loss
                metrics[f"grad_norm_{name}"] = optax.tree.norm(all_grads[name])
        new_state = apply_updates(state, all_grads, out["batch_stats"], txs)
        metrics.update({k: out[k] for k in self.metric_names})
        return new_state, out, metrics

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        target_probs = jax.nn.softmax(outputs["target"]["main"], axis=-1)
        entropy = jnp.sum(adversarial.self_information(target_probs), axis=-1)
        gray = jnp.clip(entropy * 255.0, 0, 255).astype(jnp.uint8)[..., None]
        return [
            previews.denormalize(batch["source_image"]),
            previews.colorize(batch["source_label"]),
            previews.colorize(jnp.argmax(outputs["source"]["main"], axis=-1)),
            previews.denormalize(batch["target_image"]),
            previews.colorize(jnp.argmax(outputs["target"]["main"], axis=-1)),
            jnp.repeat(gray, 3, axis=-1),
        ]


def check_config(config: ml_collections.ConfigDict) -> None:
    base.check_one_target_stream(config)
    if config.model.head != "advent_aspp":
        raise registry.MethodConfigError(
            f"config.stage={config.stage!r} trains ADVENT's DeepLabV2 (config.model.head="
            f"'advent_aspp'), not config.model.head={config.model.head!r}"
        )
    multi_level = config.model.get("advent_multi_level", True)
    if config.stage == "minent" and not multi_level:
        raise registry.MethodConfigError(
            "config.stage='minent' uses the auxiliary classifier (as the reference); set "
            "config.model.advent_multi_level=True"
        )


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model) -> Advent:
    multi_level = config.model.get("advent_multi_level", True)
    levels = tuple(
        (level, name) for level, name in LEVELS.items() if multi_level or level == "main"
    )
    cfg = ml_collections.ConfigDict(config.advent.to_dict())
    cfg.num_classes = config.model.num_classes
    # The discriminators compute in float32 at least (float64 in the parity tests).
    dtype = jnp.promote_types(models.compute_dtype(config.model.dtype), jnp.float32)
    disc = FCDiscriminator(ndf=config.advent.disc_channels, dtype=dtype)
    return Advent(
        student_apply=student_apply,
        disc_apply=disc.apply,
        disc_init=disc.init,
        cfg=cfg,
        minent=config.stage == "minent",
        levels=levels,
        segmentor_optim=config.optim,
    )


def section_rules() -> dict:
    """What each value of ``config.advent`` may be (ddb_jax.config_checks)."""
    lambdas = ("lambda_seg_aux", "lambda_adv_main", "lambda_adv_aux", "lambda_ent_main",
               "lambda_ent_aux")  # fmt: skip
    optimiser = {k: rule for k, rule in optim.OPTIM_RULES.items() if k != "listed_times"}
    return {
        **{key: config_rules.NON_NEGATIVE for key in lambdas},
        "disc_channels": config_rules.POSITIVE,
        **{f"optim_d.{key}": rule for key, rule in optimiser.items()},
    }


registry.register(
    registry.MethodSpec(
        kinds=("advent", "minent"),
        create=create,
        check=check_config,
        config_section=("advent", default_config),
        section_rules=section_rules,
    )
)
