"""One DDB self-training path (docs/method.md §1.1): an EMA teacher and domain bridging.

Per iteration, as the reference ``ST.forward_train``: the EMA update of the teacher;
source CE; teacher pseudo-labels on the clean target (teacher BN in training mode,
dropout off); a bridging mask mixes source and target and the mixed image is strongly
augmented; weighted CE on the mixed image; gradients of both summed; one AdamW step.
Masks and augmentation are drawn inside the step from the step's key.

More loss terms plug in through :func:`register_term`: a function of the context and a
config switch (``config.<name>.enabled``) that turns it on; the term reads its settings
as ``method.options[name]`` (``config.<name>``). DAFormer's ImageNet feature distance
(:mod:`ddb_jax.methods.feature_distance`) and MIC's masked consistency
(:mod:`ddb_jax.methods.mic`) are such terms. DAFormer's other differences from DDB are
switches of ``config.st`` read here and in :mod:`ddb_jax.uda.bridging`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp
import ml_collections

from ddb_jax.methods import base, previews, registry
from ddb_jax.methods.state import TrainState
from ddb_jax.uda import bridging, losses


@dataclasses.dataclass(frozen=True)
class OptionalTerm:
    """A registered loss term and what it needs besides the context."""

    term: base.Term
    order: int  # terms run in this order (their student forwards update BN statistics so)
    # Reads ctx['source_backbone'], the backbone maps of the source forward.
    source_backbone: bool = False
    # config -> what the term reads but never trains (replicated, in ``frozen[name]``).
    load_frozen: Callable[[ml_collections.ConfigDict], Any] | None = None
    # config -> None; raises on unusable settings before anything long runs.
    check: Callable[[ml_collections.ConfigDict], None] | None = None
    # config -> load_frozen's tree as ShapeDtypeStructs, its settings checked, no file read.
    frozen_shapes: Callable[[ml_collections.ConfigDict], Any] | None = None


# name -> term; enabled by config.<name>.enabled (registered by the modules that add them).
OPTIONAL_TERMS: dict[str, OptionalTerm] = {}


def register_term(
    name: str,
    *,
    order: int,
    source_backbone: bool = False,
    load_frozen: Callable[[ml_collections.ConfigDict], Any] | None = None,
    check: Callable[[ml_collections.ConfigDict], None] | None = None,
    frozen_shapes: Callable[[ml_collections.ConfigDict], Any] | None = None,
) -> Callable[[base.Term], base.Term]:
    """Adds a loss term to every self-training stage whose ``config.<name>.enabled`` is set.

    Terms run after the source and mixed terms, by ``order`` (so their student forwards
    update the BN statistics in that order).
    """

    def add(term: base.Term) -> base.Term:
        OPTIONAL_TERMS[name] = OptionalTerm(
            term, order, source_backbone, load_frozen, check, frozen_shapes
        )
        return term

    return add


def enabled_terms(config: ml_collections.ConfigDict) -> dict[str, OptionalTerm]:
    """The registered terms that ``config`` switches on, in their order."""
    ordered = sorted(OPTIONAL_TERMS.items(), key=lambda named: named[1].order)
    return {name: item for name, item in ordered if config.get(name, {}).get("enabled")}


def check_bridging(config: ml_collections.ConfigDict) -> None:
    """The bridging mask exists and the target is one stream (self-training and CKD)."""
    base.check_one_target_stream(config)
    if config.st.mask not in bridging.MASK_MODES:
        raise registry.MethodConfigError(
            f"config.st.mask={config.st.mask!r}; use one of {list(bridging.MASK_MODES)}"
        )


def check_config(config: ml_collections.ConfigDict) -> None:
    """The bridging mask and the enabled terms' own checks."""
    check_own_settings(config)
    for item in enabled_terms(config).values():
        if item.check is not None:
            item.check(config)


def check_own_settings(config: ml_collections.ConfigDict) -> None:
    """The bridging mask and the pseudo-label margins (no term's own checks)."""
    check_bridging(config)
    margins = tuple(config.data.get("target_pseudo_margins", ()) or ())
    rows = config.st.pseudo_weight_ignore_top, config.st.pseudo_weight_ignore_bottom
    if any(margins) and any(rows):
        raise registry.MethodConfigError(
            f"config.data.target_pseudo_margins={margins} with config.st.pseudo_weight_ignore_"
            "top/bottom: HRDA's margins replace DAFormer's crop of the pseudo-label weight; "
            "set the ignore rows to 0"
        )


def load_frozen(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """``{term: what it reads}`` for the enabled terms that need frozen inputs, else None."""
    frozen = {
        name: item.load_frozen(config)
        for name, item in enabled_terms(config).items()
        if item.load_frozen is not None
    }
    return frozen or None


def frozen_shapes(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """:func:`load_frozen`'s tree as ShapeDtypeStructs, the settings checked; a term that
    declares no shapes is checked and read as in training."""
    check_own_settings(config)
    shapes = {}
    for name, item in enabled_terms(config).items():
        if item.frozen_shapes is not None:
            shapes[name] = item.frozen_shapes(config)
            continue
        if item.check is not None:
            item.check(config)
        if item.load_frozen is not None:
            shapes[name] = registry.shapes_of(item.load_frozen(config))
    return shapes or None


@flax.struct.dataclass
class SelfTrainingState(TrainState):
    ema_params: Any  # the EMA teacher
    ema_batch_stats: Any

    def teacher_variables(self) -> dict[str, Any]:
        return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


def ema_alpha(step: jax.Array, alpha_max: float) -> jax.Array:
    """The reference's ramp ``min(1 - 1/(it+1), alpha)``: 0 at step 0, i.e. a plain copy."""
    step = step.astype(jnp.result_type(float))
    return jnp.minimum(1.0 - 1.0 / (step + 1.0), alpha_max)


def ema_update(ema_params, params, step: jax.Array, alpha_max: float):
    """EMA over parameters only (BN running statistics are not averaged)."""
    alpha = ema_alpha(step, alpha_max)
    return jax.tree_util.tree_map(lambda e, p: alpha * e + (1.0 - alpha) * p, ema_params, params)


def no_dropout(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same architecture with dropout and drop-path off (the EMA teacher's forward)."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.dropout_ratio = 0.0
    cfg.drop_path_rate = 0.0
    return cfg


def valid_pseudo_region(pixel_weight: jax.Array, batch) -> jax.Array:
    """HRDA's pseudo-label margins: the weight times the batch's 'target_valid' (0 where
    the crop holds a margin of the original image), when the input pipeline made it
    (``config.data.target_pseudo_margins``)."""
    if "target_valid" not in batch:
        return pixel_weight
    return pixel_weight * batch["target_valid"].astype(pixel_weight.dtype)


def mixed_term(method: SelfTraining, params, ctx: base.Context):
    """Weighted CE of the student on the bridged image against the bridged label."""
    loss, logits = base.labelled_term(
        method, params, ctx, ctx["mixed_image"], ctx["mixed_label"],
        ctx["keys"]["dropout_target"], ctx["mixed_weight"],
    )  # fmt: skip
    ctx["mixed_prediction"] = base.prediction(logits, ctx["mixed_label"].shape[1:3])
    return loss, ctx


@dataclasses.dataclass(frozen=True)
class SelfTraining(base.OneTree):
    student_apply: Callable
    teacher_apply: Callable  # the student's architecture without dropout
    st: ml_collections.ConfigDict
    terms: tuple[tuple[str, base.Term], ...] = (("source", base.source_term), ("mixed", mixed_term))
    options: Mapping[str, ml_collections.ConfigDict] = dataclasses.field(default_factory=dict)
    keep_source_backbone: bool = False  # see base.source_term

    name: ClassVar[str] = "self_training"
    key_names: ClassVar[tuple[str, ...]] = ("bridging", "dropout_source", "dropout_target")
    preview_tag: ClassVar[str] = "bridging"
    preview_panels: ClassVar[tuple[str, ...]] = (
        "source image", "source label", "target image", "pseudo-label", "mixed image",
        "mixed label", "student prediction on the mixed image",
    )  # fmt: skip

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (*(f"loss_{n}" for n, _ in self.terms), "acc_source", "pseudo_weight")

    def init_state(self, state: TrainState) -> SelfTrainingState:
        """Student and teacher start equal (the teacher's copy at iteration 0)."""
        return SelfTrainingState(
            **state.fields(),
            ema_params=jax.tree_util.tree_map(jnp.copy, state.params),
            ema_batch_stats=jax.tree_util.tree_map(jnp.copy, state.batch_stats),
        )

    def prepare(self, state: SelfTrainingState, batch, keys, frozen) -> base.Context:
        """EMA teacher update and its pseudo-labels; the bridged image, label and weight."""
        ema_params = ema_update(state.ema_params, state.params, state.step, self.st.ema_alpha)
        # Teacher: BN in training mode (target-batch statistics, own running stats), no dropout.
        teacher_outputs, teacher_vars = self.teacher_apply(
            {"params": ema_params, "batch_stats": state.ema_batch_stats},
            batch["target_image"],
            train=True,
            mutable=["batch_stats"],
        )
        teacher_logits = teacher_outputs["logits"]
        pseudo, pseudo_weight = losses.pseudo_labels(
            jax.lax.stop_gradient(teacher_logits),
            batch["source_label"].shape[1:3],
            self.st.pseudo_threshold,
            self.st.pseudo_weight_ignore_top,
            self.st.pseudo_weight_ignore_bottom,
        )
        pseudo_weight = valid_pseudo_region(pseudo_weight, batch)
        draws, mixed_image = bridging.bridged_input(keys, batch, self.st)
        masks = draws["masks"]
        return {
            "ema_params": ema_params,
            "ema_batch_stats": teacher_vars["batch_stats"],
            "teacher_logits": teacher_logits,
            "pseudo_labels": pseudo,
            "pseudo_pixel_weight": pseudo_weight,
            "pseudo_weight": jnp.mean(pseudo_weight),
            "draws": draws,
            "mixed_image": mixed_image,
            "mixed_label": bridging.mix(masks, batch["source_label"], pseudo),
            "mixed_weight": bridging.mix(masks, jnp.ones_like(pseudo_weight), pseudo_weight),
        }

    def finish(self, state: SelfTrainingState, outputs: base.Context) -> SelfTrainingState:
        return state.replace(
            ema_params=outputs["ema_params"], ema_batch_stats=outputs["ema_batch_stats"]
        )

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        return [
            previews.denormalize(batch["source_image"]),
            previews.colorize(batch["source_label"]),
            previews.denormalize(batch["target_image"]),
            previews.colorize(outputs["pseudo_labels"]),
            previews.denormalize(outputs["mixed_image"]),
            previews.colorize(outputs["mixed_label"]),
            previews.colorize(outputs["mixed_prediction"]),
        ]


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model) -> SelfTraining:
    """The self-training method of ``config`` (``build_model``: config.model -> a model)."""
    extra = enabled_terms(config)
    return SelfTraining(
        student_apply=student_apply,
        teacher_apply=build_model(no_dropout(config.model)).apply,
        st=config.st,
        terms=SelfTraining.terms + tuple((name, item.term) for name, item in extra.items()),
        options={name: config[name] for name in extra},
        keep_source_backbone=any(item.source_backbone for item in extra.values()),
    )


registry.register(
    registry.MethodSpec(
        kinds=("self_training",),
        create=create,
        check=check_config,
        load_frozen=load_frozen,
        frozen_shapes=frozen_shapes,
    )
)
