"""MTAF (Saporta et al., ICCV 2021; valeoai/MTAF): what its three training methods share.

MTAF adapts one GTA5-trained ADVENT segmentor to several targets at once, each target with
a loader of its own (``data.per_target_streams``: one batch key per target, every target
in every iteration). Three methods (``mtaf/domain_adaptation/train_UDA.py``):
'mtaf_baseline' (ADVENT against every target, shared discriminators) and 'mtaf_mdis'
(per-target discriminators plus target-vs-target domain classifiers) in
:mod:`~ddb_jax.methods.mtaf_mdis`; 'mtaf_mtkt' (per-target teacher heads distilled into a
target-agnostic student head) in :mod:`~ddb_jax.methods.mtaf_mtkt`.

Their section ``config.mtaf`` holds the reference's defaults (``config.py``) and one switch
per reference behaviour that looks unintended (True keeps the reference's; the line is
train_UDA.py's):

- ``aux_source_over_targets``: the auxiliary discriminators' source half is divided by
  1 + T, not 2 as everywhere else (baseline :169, MDis :534);
- ``repeated_disc_steps``: the baseline steps each discriminator's Adam T times per
  iteration with the same gradient (:212-214);
- ``last_aux_domain_classifier``: MDis with more than two targets trains only the last
  auxiliary one-vs-rest classifier, on every target's pair of losses, and the others never
  (:570, ``d_target_aux`` left at the list's last entry);
- ``last_aux_discriminator``: MTKT's segmentor fools the last target's auxiliary
  discriminator on every target (:841, ``d_aux`` not re-indexed);
- ``aux_kl_over_targets``: MTKT's auxiliary distillation is divided by T, its main one not
  (:857);
- ``student_idle_until_teacher_iters``: before ``teacher_iters`` no loss reaches MTKT's
  student head, whose parameters then have no gradient at all, so PyTorch's SGD skips them:
  no weight decay, no momentum, until the distillation starts (:850, :925).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddb_jax import config_rules, models
from ddb_jax.methods import advent, optim, registry
from ddb_jax.methods.state import MODEL, Optimizers, Trainable, TrainState, apply_updates
from ddb_jax.models.discriminator import FCDiscriminator
from ddb_jax.ops import resize_bilinear_corners
from ddb_jax.uda import adversarial

SECTION = "mtaf"
LEVELS = advent.LEVELS  # output level -> the model's output name
HEAD_OUTPUTS = {"main": "head_logits", "aux": "head_aux_logits"}  # MTKT's stacked heads
QUIRKS = ("aux_source_over_targets", "repeated_disc_steps", "last_aux_domain_classifier",
          "last_aux_discriminator", "aux_kl_over_targets",
          "student_idle_until_teacher_iters")  # fmt: skip


def default_config() -> ml_collections.ConfigDict:
    """MTAF's defaults (mtaf/domain_adaptation/config.py); its published runs set more
    (configs/mtaf_gta2csmap.py)."""
    return ml_collections.ConfigDict(
        dict(
            lambda_seg_main=1.0,
            lambda_seg_aux=0.1,
            lambda_adv_main=1e-3,
            lambda_adv_aux=2e-4,
            lambda_kl_target=1.0,  # MTKT's distillation weight
            teacher_iters=0,  # MTKT: the iteration the distillation starts at (20000 published)
            disc_channels=64,
            # LEARNING_RATE_D, betas (0.9, 0.99), poly over MAX_ITERS; PyTorch 1.3.1's Adam
            # (the paper's), whose eps placement is today's.
            optim_d=advent.discriminator_adam("adam", 250_000),
            **{quirk: True for quirk in QUIRKS},
        )
    )


def section_rules() -> dict:
    """What each value of ``config.mtaf`` may be (ddb_jax.config_checks)."""
    lambdas = ("lambda_seg_main", "lambda_seg_aux", "lambda_adv_main", "lambda_adv_aux",
               "lambda_kl_target")  # fmt: skip
    optimiser = {k: rule for k, rule in optim.OPTIM_RULES.items() if k != "listed_times"}
    return {
        **{key: config_rules.NON_NEGATIVE for key in lambdas},
        "teacher_iters": config_rules.integer(0),
        "disc_channels": config_rules.POSITIVE,
        **{f"optim_d.{key}": rule for key, rule in optimiser.items()},
    }


def target_keys(targets: Sequence[str]) -> tuple[str, ...]:
    """The batch key of each target's images (input_pipeline.train.target_stream_keys with
    ``data.per_target_streams``)."""
    return tuple(f"target_image_{name}" for name in targets)


def check_config(config: ml_collections.ConfigDict, min_targets: int, heads: int) -> None:
    """ADVENT's DeepLabV2, one stream per target (distinct targets, at least
    ``min_targets``) and ``heads`` classifier heads (``config.model.advent_heads``)."""
    stage, targets = config.stage, tuple(config.data.target)
    if config.model.head != "advent_aspp":
        raise registry.MethodConfigError(
            f"config.stage={stage!r} trains ADVENT's DeepLabV2 (config.model.head="
            f"'advent_aspp'), not config.model.head={config.model.head!r}"
        )
    if not config.data.get("per_target_streams", False):
        raise registry.MethodConfigError(
            f"config.stage={stage!r} reads one batch per target: set "
            "config.data.per_target_streams=True"
        )
    if len(set(targets)) != len(targets) or len(targets) < min_targets:
        raise registry.MethodConfigError(
            f"config.data.target={targets}: config.stage={stage!r} needs at least "
            f"{min_targets} distinct targets"
        )
    have = int(config.model.get("advent_heads", 1))
    if have != heads:
        raise registry.MethodConfigError(
            f"config.stage={stage!r} with {len(targets)} targets trains {heads} classifier "
            f"head(s): set config.model.advent_heads={heads} (not {have})"
        )


@dataclasses.dataclass(frozen=True)
class Discriminators:
    """ADVENT's output-space discriminator, as every MTAF discriminator and domain
    classifier is (``get_fc_discriminator``, PyTorch's default initialisation)."""

    apply: Callable
    init: Callable
    num_classes: int

    def init_trees(self, key: jax.Array, names: Sequence[str]) -> dict[str, Any]:
        probe = jnp.zeros((1, 64, 64, self.num_classes), jnp.float32)
        keys = jax.random.split(key, len(names))
        return {name: self.init(k, probe)["params"] for name, k in zip(names, keys, strict=True)}

    def __call__(self, params, maps: jax.Array) -> jax.Array:
        return self.apply({"params": params}, maps)


def build_discriminators(config: ml_collections.ConfigDict) -> Discriminators:
    # Float32 at least (float64 in the parity tests), as ADVENT's.
    dtype = jnp.promote_types(models.compute_dtype(config.model.dtype), jnp.float32)
    disc = FCDiscriminator(ndf=config.mtaf.disc_channels, dtype=dtype)
    return Discriminators(disc.apply, disc.init, config.model.num_classes)


def levels_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """'main', and 'aux' with the auxiliary classifier (the reference's MULTI_LEVEL)."""
    return ("main", "aux") if config.model.get("advent_multi_level", True) else ("main",)


def method_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.mtaf`` with the targets' count, as the methods read it."""
    cfg = ml_collections.ConfigDict(config.mtaf.to_dict())
    cfg.num_targets = len(config.data.target)
    return cfg


def upsample(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """The reference's ``interp``: bilinear, align_corners=True, to the input size; a stack
    of heads (H, N, h, w, C) head by head."""
    if logits.ndim == 4:
        return resize_bilinear_corners(logits, size)
    heads, n = logits.shape[:2]
    flat = resize_bilinear_corners(logits.reshape(heads * n, *logits.shape[2:]), size)
    return flat.reshape(heads, n, *flat.shape[1:])


def segmentor_forward(
    student_apply: Callable, params, batch_stats, images: jax.Array, outputs: Mapping[str, str]
) -> tuple[dict[str, jax.Array], Any]:
    """The segmentor in training mode (BN on batch statistics, running ones updated, as the
    reference's ``model.train()``): ``{level: output upsampled to the images' size}``."""
    out, updates = student_apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    size = images.shape[1:3]
    return {level: upsample(out[name], size) for level, name in outputs.items()}, updates[
        "batch_stats"
    ]


def self_information(logits: jax.Array) -> jax.Array:
    """A discriminator's input: the weighted self-information of the softmax."""
    return adversarial.self_information(jax.nn.softmax(logits, axis=-1))


# One adversarial term: (the tree that judges, its input maps, the label, the term's weight,
# the name its weighted BCE is summed under).
Term = tuple[str, jax.Array, float, float, str]


def adversarial_terms(discriminate: Discriminators, params: Mapping, terms: Sequence[Term]):
    """``{name: sum of weight * BCE(D_tree(maps), label)}`` over ``terms``. Each tree runs
    once per shape of maps it judges, on their concatenation: a discriminator treats the
    samples of a batch apart, so this is each term's forward alone, in fewer operations
    to compile."""
    sums: dict[str, jax.Array] = {}
    groups: dict[tuple, list[Term]] = {}
    for term in terms:
        groups.setdefault((term[0], term[1].shape), []).append(term)
    for (tree, _), group in groups.items():
        logits = discriminate(params[tree], jnp.concatenate([term[1] for term in group]))
        offsets = np.cumsum([len(term[1]) for term in group])[:-1]
        for part, (_, _, label, weight, name) in zip(
            jnp.split(logits, offsets), group, strict=True
        ):
            value = weight * adversarial.bce_to_label(part, label)
            sums[name] = sums[name] + value if name in sums else value
    return sums


def rewind_schedules(opt_state, before):
    """``opt_state`` with every schedule's step count as in ``before``: a second step within
    one iteration at the iteration's learning rate (the reference sets it once per
    iteration); Adam's own count, its bias corrections, still advances."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda new, old: old if is_schedule(new) else new, opt_state, before, is_leaf=is_schedule
    )


def step_all(
    txs: Optimizers,
    state: TrainState,
    grads: Mapping[str, Any],
    batch_stats,
    repeats: Mapping[str, int] | None = None,
) -> TrainState:
    """Every tree's optimiser on its gradient, from the pre-step parameters; a tree in
    ``repeats`` is stepped that many times with the same gradient (the baseline's
    discriminators: ``optimizer_d.step()`` once per target)."""
    new_state = apply_updates(state, grads, batch_stats, txs)
    others = dict(new_state.others)
    for name, times in (repeats or {}).items():
        params, opt_state = others[name].params, others[name].opt_state
        for _ in range(times - 1):
            opt_state = rewind_schedules(opt_state, state.others[name].opt_state)
            updates, opt_state = txs[name].update(grads[name], opt_state, params)
            params = optax.apply_updates(params, updates)
        others[name] = Trainable(params, opt_state)
    return new_state.replace(others=others)


def adversarial_update(method, txs: Optimizers, state: TrainState, batch,
                       repeats: Mapping[str, int] | None = None):  # fmt: skip
    """One iteration of an MTAF method: ``method.segmentor_loss`` and its gradient (the
    discriminators frozen), each tree's ``method.discriminator_losses`` on the detached
    maps and its gradient, every update from the pre-step parameters (``repeats``: see
    :func:`step_all`). Returns (state, outputs with every tree's gradient, metrics)."""
    disc = {name: tree.params for name, tree in state.others.items()}
    (loss, out), grads = jax.value_and_grad(method.segmentor_loss, has_aux=True)(
        state.params, state, batch, disc
    )
    maps = jax.lax.stop_gradient(out.pop("maps"))  # the discriminators' inputs

    def total(disc_params):
        losses = method.discriminator_losses(disc_params, maps)
        return sum(losses.values()), losses

    (_, d_losses), d_grads = jax.value_and_grad(total, has_aux=True)(disc)
    out.update({f"loss_{name}": value for name, value in d_losses.items()})
    out["grads"] = {MODEL: grads, **d_grads}
    new_state = step_all(txs, state, out["grads"], out["batch_stats"], repeats)
    metrics = metrics_of(loss, out, out["grads"], method.segmentor_optim, method.metric_names)
    return new_state, out, metrics


def metrics_of(
    loss: jax.Array, out: dict, grads: Mapping[str, Any], segmentor_optim, names: Sequence[str]
) -> dict[str, jax.Array]:
    """The step's metrics: the segmentor's loss, every named loss term, each tree's gradient
    norm (the segmentor's over the parameters the reference trains)."""
    trained = optim.without_frozen(grads[MODEL], segmentor_optim)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(trained)}
    metrics.update({f"grad_norm_{k}": optax.tree.norm(g) for k, g in grads.items() if k != MODEL})
    metrics.update({k: out[k] for k in names})
    return metrics


def register(kinds: tuple[str, ...], create: Callable, check: Callable) -> None:
    """Declares MTAF stage kinds; every one shares the ``config.mtaf`` section."""
    registry.register(
        registry.MethodSpec(
            kinds=kinds,
            create=create,
            check=check,
            config_section=(SECTION, default_config),
            section_rules=section_rules,
        )
    )
