"""MTAF's multi-target baseline and Multi-Dis. (valeoai/MTAF train_UDA.py ``train_advent``
and ``train_advent_mdis``): stage kinds 'mtaf_baseline' and 'mtaf_mdis'.

Per iteration, one source batch and one batch of *every* target (each target its own
loader: ``data.per_target_streams``). The segmentor (SGD) takes ADVENT's source CE on the
main and auxiliary outputs, then per target i the adversarial terms: the level's
discriminator (frozen for this term) should take target i's self-information map for a
source one. The baseline shares one discriminator per level among the targets; MDis gives
each target its own (``d_{level}_{i}``) and adds target-vs-target domain classifiers, which
the segmentor also fools, with the adversarial weights: for two targets one binary
classifier per level (``dt_{level}``: label i for target i, the segmentor pushes target i
to 1 - i); for more, one-vs-rest classifiers (``dt_{level}_{j}``: label 0 for target j, 1
for the others, the others' losses over 2 (T - 1); the segmentor pushes target i to label
0 of every other target's classifier, averaged).

Each discriminator trains on the detached maps: the source half over 2 (the auxiliary one
over 1 + T: ``aux_source_over_targets``), each target half over 2. The baseline's shared
discriminators see the source half once per target and step T times
(``repeated_disc_steps``). Every update comes from the pre-step parameters. Switches:
:mod:`~ddb_jax.methods.mtaf_shared`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from ddb_jax.methods import base, mtaf_shared, previews
from ddb_jax.methods.state import Optimizers, TrainState
from ddb_jax.uda import adversarial

SOURCE, TARGET = adversarial.SOURCE_LABEL, adversarial.TARGET_LABEL


@dataclasses.dataclass(frozen=True)
class MultiTargetAdvent:
    """The baseline (``shared``: one discriminator per level) or MDis."""

    student_apply: Callable
    discriminate: mtaf_shared.Discriminators
    cfg: ml_collections.ConfigDict  # config.mtaf with num_targets
    levels: tuple[str, ...]  # 'main', and 'aux' when multi-level
    targets: tuple[str, ...]  # config.data.target
    shared: bool  # the baseline
    segmentor_optim: ml_collections.ConfigDict  # config.optim

    key_names: ClassVar[tuple[str, ...]] = ()  # nothing is drawn at random
    terms: ClassVar[tuple] = ()
    preview_tag: ClassVar[str] = "mtaf"

    @property
    def name(self) -> str:
        return "mtaf_baseline" if self.shared else "mtaf_mdis"

    @property
    def num_targets(self) -> int:
        return len(self.targets)

    def disc_name(self, level: str, target: int) -> str:
        """Target ``target``'s source-vs-target discriminator of ``level``."""
        return f"d_{level}" if self.shared else f"d_{level}_{target}"

    def classifier_names(self, level: str) -> tuple[str, ...]:
        """The domain classifiers of ``level``: one binary for two targets, else one per
        target (none for the baseline)."""
        if self.shared:
            return ()
        if self.num_targets == 2:
            return (f"dt_{level}",)
        return tuple(f"dt_{level}_{j}" for j in range(self.num_targets))

    @property
    def other_trees(self) -> Mapping[str, ml_collections.ConfigDict]:
        names = [self.disc_name(lv, i) for lv in self.levels for i in range(self.num_targets)]
        names += [n for lv in self.levels for n in self.classifier_names(lv)]
        return {name: self.cfg.optim_d for name in dict.fromkeys(names)}

    @property
    def metric_names(self) -> tuple[str, ...]:
        names = [f"loss_seg_{level}" for level in self.levels]
        for i in range(self.num_targets):
            names += [f"loss_adv_{level}_{i}" for level in self.levels]
            names += [] if self.shared else [f"loss_dom_{level}_{i}" for level in self.levels]
        return (*names, *(f"loss_{name}" for name in self.other_trees))

    @property
    def preview_panels(self) -> tuple[str, ...]:
        per_target = [(f"target {n} image", f"target {n} prediction") for n in self.targets]
        return ("source image", "source label", "source prediction", *sum(per_target, ()))

    def init_others(self, key: jax.Array) -> dict[str, Any]:
        return self.discriminate.init_trees(key, tuple(self.other_trees))

    def init_state(self, state: TrainState) -> TrainState:
        return state

    def fooling_terms(self, level: str, target: int, maps: jax.Array) -> list:
        """The segmentor's adversarial terms on target ``target``'s ``level`` maps: its
        discriminator should say source; MDis's domain classifiers, the other target."""
        terms = [(self.disc_name(level, target), maps, SOURCE, 1.0, f"loss_adv_{level}_{target}")]
        names, dom = self.classifier_names(level), f"loss_dom_{level}_{target}"
        if len(names) == 1:  # two targets: one binary classifier, label i for target i
            terms.append((names[0], maps, 1.0 - target, 1.0, dom))
        elif names:  # one-vs-rest: label 0 of every other target's classifier, averaged
            others = [j for j in range(self.num_targets) if j != target]
            terms += [(names[j], maps, SOURCE, 1 / len(others), dom) for j in others]
        return terms

    def segmentor_loss(self, params, state: TrainState, batch, disc: Mapping):
        cfg, outputs = self.cfg, {level: mtaf_shared.LEVELS[level] for level in self.levels}
        source, stats = mtaf_shared.segmentor_forward(
            self.student_apply, params, state.batch_stats, batch["source_image"], outputs
        )
        out: dict[str, Any] = {"source": source, "targets": []}
        maps = {"source": {lv: mtaf_shared.self_information(source[lv]) for lv in self.levels},
                "targets": []}  # fmt: skip
        total = 0.0
        for level in self.levels:
            seg = adversarial.valid_pixel_cross_entropy(source[level], batch["source_label"])
            out[f"loss_seg_{level}"] = seg
            total = total + cfg[f"lambda_seg_{level}"] * seg
        for key in mtaf_shared.target_keys(self.targets):
            target, stats = mtaf_shared.segmentor_forward(
                self.student_apply, params, stats, batch[key], outputs
            )
            out["targets"].append(target)
            maps["targets"].append({lv: mtaf_shared.self_information(target[lv])
                                    for lv in self.levels})  # fmt: skip
        terms = [term for i, target_maps in enumerate(maps["targets"]) for level in self.levels
                 for term in self.fooling_terms(level, i, target_maps[level])]  # fmt: skip
        for name, value in mtaf_shared.adversarial_terms(self.discriminate, disc, terms).items():
            out[name] = value  # loss_{adv|dom}_{level}_{target}
            total = total + cfg[f"lambda_adv_{name.split('_')[2]}"] * value
        out["batch_stats"], out["maps"] = stats, maps
        return total, out

    def discriminator_losses(self, disc: Mapping, maps) -> dict[str, jax.Array]:
        """Each trained tree's loss on the detached maps, by tree name."""
        cfg, count, terms = self.cfg, self.num_targets, []
        for level in self.levels:
            aux_over_targets = level == "aux" and cfg.aux_source_over_targets
            source_weight = 1 / (1 + count) if aux_over_targets else 1 / 2
            for i in range(count):
                name = self.disc_name(level, i)
                if i == 0 or not self.shared:  # a shared one: the source half once per target
                    copies = count if self.shared else 1
                    terms.append(
                        (name, maps["source"][level], SOURCE, copies * source_weight, name)
                    )
                terms.append((name, maps["targets"][i][level], TARGET, 1 / 2, name))
            names = self.classifier_names(level)
            for i in range(count if names else 0):
                target_maps = maps["targets"][i][level]
                if count == 2:
                    terms.append((names[0], target_maps, float(i), 1 / 2, names[0]))
                    continue
                for j, name in enumerate(names):
                    if level == "aux" and cfg.last_aux_domain_classifier:
                        name = names[-1]  # the reference's d_target_aux, never re-indexed
                    own = i == j
                    weight = 1 / 2 if own else 1 / (2 * (count - 1))
                    terms.append((name, target_maps, SOURCE if own else TARGET, weight, name))
        losses = mtaf_shared.adversarial_terms(self.discriminate, disc, terms)
        zero = jnp.zeros((), jnp.result_type(float))
        return {name: losses.get(name, zero) for name in self.other_trees}

    def update(self, txs: Optimizers, state: TrainState, batch, frozen: Any = None):
        """One iteration; see the module docstring."""
        repeats = {}
        if self.shared and self.cfg.repeated_disc_steps:
            repeats = {name: self.num_targets for name in self.other_trees}
        return mtaf_shared.adversarial_update(self, txs, state, batch, repeats)

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        panels = [
            previews.denormalize(batch["source_image"]),
            previews.colorize(batch["source_label"]),
            previews.colorize(jnp.argmax(outputs["source"]["main"], axis=-1)),
        ]
        for key, target in zip(mtaf_shared.target_keys(self.targets), outputs["targets"],
                               strict=True):  # fmt: skip
            panels += [
                previews.denormalize(batch[key]),
                previews.colorize(jnp.argmax(target["main"], axis=-1)),
            ]
        return panels


def check_config(config: ml_collections.ConfigDict) -> None:
    baseline = config.stage == "mtaf_baseline"
    mtaf_shared.check_config(config, 1 if baseline else 2, heads=1)
    repeated = baseline and config.mtaf.repeated_disc_steps and len(config.data.target) > 1
    if repeated and config.mtaf.optim_d.kind == "adam041":
        raise mtaf_shared.registry.MethodConfigError(
            "config.mtaf.repeated_disc_steps=True steps each discriminator once per target at "
            "the iteration's rate, which optim_d.kind='adam041' cannot (one count for both); "
            "use optim_d.kind='adam' (PyTorch 1.3.1's Adam, the reference's)"
        )


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model):
    return MultiTargetAdvent(
        student_apply=student_apply,
        discriminate=mtaf_shared.build_discriminators(config),
        cfg=mtaf_shared.method_config(config),
        levels=mtaf_shared.levels_of(config),
        targets=tuple(config.data.target),
        shared=config.stage == "mtaf_baseline",
        segmentor_optim=config.optim,
    )


mtaf_shared.register(("mtaf_baseline", "mtaf_mdis"), create, check_config)
