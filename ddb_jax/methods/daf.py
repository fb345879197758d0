"""DAF (depth-aware adaptation; 3D-Vision-Lab-of-JUST/dg_ljw train.py ``train_dada``), the
first stage of DAF/IDA (docs/method.md §7). Stage kind 'daf'.

Per iteration, as the reference: the depth-aware DeepLabV2
(:mod:`ddb_jax.models.daf_deeplabv2`, SGD) on the labelled source, its logits and depth
upsampled to the input size (align_corners=True): CE plus ``lambda_depth`` x the berHu loss
against SYNTHIA's inverse depth (``batch['source_depth']``); on the target, the
adversarial term: the discriminator (frozen for this term) should take the target's
depth-aware map for a source one. A depth-aware map is ADVENT's per-class
self-information times the predicted depth: once for the source, *twice* for the target
(``entropy * depth * depth``, train.py's target lines; ``target_depth_power``, 1 for the
symmetric form the paper describes). The discriminator (its own Adam) on the detached
source and target maps, each half of its loss *not* halved (ADVENT halves them;
``halve_d_loss``). Every update from the pre-step parameters, applied together
(:func:`ddb_jax.methods.state.apply_updates`), as the reference's two ``step()`` calls.
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
from ddb_jax.methods.advent import discriminator_adam
from ddb_jax.methods.state import MODEL, Optimizers, TrainState, apply_updates
from ddb_jax.models.discriminator import FCDiscriminator
from ddb_jax.ops import resize_bilinear_corners
from ddb_jax.uda import adversarial, depth

DISC = "d_main"


def default_config() -> ml_collections.ConfigDict:
    """dg_ljw's defaults (configs/configs.py, configs_s2c/dg.yml)."""
    return ml_collections.ConfigDict(
        dict(
            lambda_seg_main=1.0,
            lambda_depth=1e-3,  # LAMBDA_DEPTH_MAIN
            lambda_adv_main=1e-3,
            disc_channels=64,
            target_depth_power=2,  # train.py: entropy * depth * depth on the target
            source_depth_power=1,
            halve_d_loss=False,  # ADVENT: each half of the D loss / 2; dg_ljw: not
            # The discriminator's Adam: 1e-4, betas (0.9, 0.99), poly 0.9 over MAX_ITERS
            # (90k); PyTorch 1.7.1 (the README's), so today's eps placement.
            optim_d=discriminator_adam("adam", 90_000),
            # ISL (train_isl.py, configs_isl.py; stages 'daf_pseudo_labels', 'daf_isl'): the
            # whole target images at full_size (H, W; INPUT_SIZE_TARGET 1024x512), labels
            # where the softmax is >= isl_threshold. One ISL stage per round, its labels from
            # the model before it: regenerated at 0, 10001, 20001, stopped at 25000.
            full_size=(512, 1024),
            isl_threshold=0.9,
            isl_round_steps=(10_001, 10_000, 5_000),
            isl_max_iters=90_000,  # the poly horizon of each ISL round (MAX_ITERS)
            isl_labels="",  # per stage: a 'daf_pseudo_labels' stage's folder
            # Ranking (depth_aware_rank/entropy.py --lambda1 0.66; stage 'daf_rank').
            rank_lambda1=0.66,
            rank="",  # per stage: a 'daf_rank' stage's folder
            # IDA (train_intra.py, configs_intra.py, intrada.yml; stage 'daf_ida').
            ida_steps=120_000,  # EARLY_STOP
            ida_max_iters=250_000,  # MAX_ITERS: the SGD and Adam poly horizon
            ida_lambda_adv_main=1e-3,
            ida_optim_d=discriminator_adam("adam", 250_000),
        )
    )


def upsampled(method, params, batch_stats, images):
    """The network in training mode; logits and depth (N, H, W) at the images' size."""
    outputs, updates = method.student_apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    size = images.shape[1:3]
    logits = resize_bilinear_corners(outputs["logits"], size)
    pred_depth = resize_bilinear_corners(outputs["depth"], size)[..., 0]
    return logits, pred_depth, updates["batch_stats"]


@dataclasses.dataclass(frozen=True)
class Daf:
    student_apply: Callable
    disc_apply: Callable
    disc_init: Callable
    cfg: ml_collections.ConfigDict  # config.daf, with num_classes
    segmentor_optim: ml_collections.ConfigDict

    name: ClassVar[str] = "daf"
    key_names: ClassVar[tuple[str, ...]] = ()
    terms: ClassVar[tuple] = ()
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss_seg_main", "loss_depth_main", "loss_adv_main", "loss_d_main",
        "loss_d_main_source", "loss_d_main_target",
    )  # fmt: skip
    preview_tag: ClassVar[str] = "daf"
    preview_panels: ClassVar[tuple[str, ...]] = (
        "source image", "source label", "source prediction", "source depth", "target image",
        "target prediction", "target depth",
    )  # fmt: skip

    @property
    def other_trees(self) -> Mapping[str, ml_collections.ConfigDict]:
        return {DISC: self.cfg.optim_d}

    def init_others(self, key: jax.Array) -> dict[str, Any]:
        """PyTorch's default initialisation of the discriminator (the reference keeps it)."""
        probe = jnp.zeros((1, 64, 64, self.cfg.num_classes), jnp.float32)
        return {DISC: self.disc_init(key, probe)["params"]}

    def init_state(self, state: TrainState) -> TrainState:
        return state

    def maps(self, logits: jax.Array, pred_depth: jax.Array, power: int) -> jax.Array:
        info = adversarial.self_information(jax.nn.softmax(logits, axis=-1))
        return depth.depth_aware_map(info, pred_depth, power)

    def update(self, txs: Optimizers, state: TrainState, batch, frozen: Any = None):
        """One DAF iteration; see the module docstring."""
        cfg = self.cfg
        d_params = state.others[DISC].params

        def segmentor_loss(params):
            src_logits, src_depth, stats = upsampled(
                self, params, state.batch_stats, batch["source_image"]
            )
            trg_logits, trg_depth, stats = upsampled(self, params, stats, batch["target_image"])
            seg = adversarial.valid_pixel_cross_entropy(src_logits, batch["source_label"])
            depth_loss = depth.berhu_loss(src_depth, batch["source_depth"])
            target_map = self.maps(trg_logits, trg_depth, cfg.target_depth_power)
            fooled = self.disc_apply({"params": d_params}, target_map)
            adv = adversarial.bce_to_label(fooled, adversarial.SOURCE_LABEL)
            total = (cfg.lambda_seg_main * seg + cfg.lambda_depth * depth_loss
                     + cfg.lambda_adv_main * adv)  # fmt: skip
            out = {
                "batch_stats": stats, "loss_seg_main": seg, "loss_depth_main": depth_loss,
                "loss_adv_main": adv, "target_map": target_map,
                "source_map": self.maps(src_logits, src_depth, cfg.source_depth_power),
                "source_logits": src_logits, "target_logits": trg_logits,
                "source_pred_depth": src_depth, "target_pred_depth": trg_depth,
            }  # fmt: skip
            return total, out

        (loss, out), grads = jax.value_and_grad(segmentor_loss, has_aux=True)(state.params)
        half = 0.5 if cfg.halve_d_loss else 1.0

        def discriminator_loss(params):
            source_map = jax.lax.stop_gradient(out["source_map"])
            target_map = jax.lax.stop_gradient(out["target_map"])
            as_source = adversarial.bce_to_label(
                self.disc_apply({"params": params}, source_map), adversarial.SOURCE_LABEL
            )
            as_target = adversarial.bce_to_label(
                self.disc_apply({"params": params}, target_map), adversarial.TARGET_LABEL
            )
            return half * (as_source + as_target), (as_source, as_target)

        (d_loss, (d_source, d_target)), d_grads = jax.value_and_grad(
            discriminator_loss, has_aux=True
        )(d_params)
        out.update(loss_d_main=d_loss, loss_d_main_source=d_source, loss_d_main_target=d_target)
        new_state = apply_updates(state, {MODEL: grads, DISC: d_grads}, out["batch_stats"], txs)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(optim.without_frozen(grads, self.segmentor_optim)),
            f"grad_norm_{DISC}": optax.tree.norm(d_grads),
            **{k: out[k] for k in self.metric_names},
        }
        return new_state, out, metrics

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        def gray(x):
            scaled = x / jnp.maximum(jnp.max(x, axis=(1, 2), keepdims=True), 1e-6)
            return jnp.repeat(jnp.clip(scaled * 255, 0, 255).astype(jnp.uint8)[..., None], 3, -1)

        return [
            previews.denormalize(batch["source_image"]),
            previews.colorize(batch["source_label"]),
            previews.colorize(jnp.argmax(outputs["source_logits"], axis=-1)),
            gray(outputs["source_pred_depth"]),
            previews.denormalize(batch["target_image"]),
            previews.colorize(jnp.argmax(outputs["target_logits"], axis=-1)),
            gray(outputs["target_pred_depth"]),
        ]


def check_network(config: ml_collections.ConfigDict) -> None:
    """What DAF, ISL and IDA share: DAF's network, main classifier only, one target."""
    base.check_one_target_stream(config)
    if config.model.head != "daf_aspp":
        raise registry.MethodConfigError(
            f"config.stage={config.stage!r} trains DAF's depth-aware DeepLabV2 "
            f"(config.model.head='daf_aspp'), not {config.model.head!r}"
        )
    if config.model.get("advent_multi_level", False):
        raise registry.MethodConfigError(
            f"config.stage={config.stage!r} trains the main classifier only (dg_ljw's "
            "train_dada, train_isl, train_intra); set config.model.advent_multi_level=False"
        )


def check_config(config: ml_collections.ConfigDict) -> None:
    check_network(config)
    if not config.data.get("source_depth", False):
        raise registry.MethodConfigError(
            "config.stage='daf' regresses the source depth; set config.data.source_depth=True"
        )


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model) -> Daf:
    cfg = ml_collections.ConfigDict(config.daf.to_dict())
    cfg.num_classes = config.model.num_classes
    dtype = jnp.promote_types(models.compute_dtype(config.model.dtype), jnp.float32)
    disc = FCDiscriminator(ndf=config.daf.disc_channels, dtype=dtype)
    return Daf(student_apply, disc.apply, disc.init, cfg, config.optim)


def section_rules() -> dict:
    """What each value of ``config.daf`` may be (ddb_jax.config_checks)."""
    lambdas = ("lambda_seg_main", "lambda_depth", "lambda_adv_main")
    optimiser = {k: rule for k, rule in optim.OPTIM_RULES.items() if k != "listed_times"}
    return {
        **{key: config_rules.NON_NEGATIVE for key in lambdas},
        "disc_channels": config_rules.POSITIVE,
        "target_depth_power": config_rules.integer(0),
        "source_depth_power": config_rules.integer(0),
        "isl_threshold": config_rules.RATIO,
        "rank_lambda1": config_rules.RATIO,
        "full_size": config_rules.ints(2),
        "isl_round_steps": config_rules.ints(empty=True),
        "isl_labels": config_rules.PATH,
        "rank": config_rules.PATH,
        "ida_lambda_adv_main": config_rules.NON_NEGATIVE,
        "isl_max_iters": config_rules.integer(0),
        "ida_steps": config_rules.POSITIVE,
        "ida_max_iters": config_rules.integer(0),
        **{f"ida_optim_d.{key}": rule for key, rule in optimiser.items()},
        **{f"optim_d.{key}": rule for key, rule in optimiser.items()},
    }


registry.register(
    registry.MethodSpec(
        kinds=("daf",),
        create=create,
        check=check_config,
        config_section=("daf", default_config),
        section_rules=section_rules,
    )
)
