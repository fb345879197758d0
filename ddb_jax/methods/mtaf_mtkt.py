"""MTAF's Multi-Target Knowledge Transfer (valeoai/MTAF train_UDA.py ``train_advent_mtkt``):
stage kind 'mtaf_mtkt'.

The segmentor is ADVENT's DeepLabV2 with 1 + T classifier pairs on one backbone
(``config.model.advent_heads``): head 0 the target-agnostic student (the one evaluated,
the model's 'logits'), head i + 1 the teacher of target i. Per iteration, one source batch
and one batch of every target:

- every teacher head takes ADVENT's source CE (main and auxiliary), summed over the heads;
  the student head none;
- on target i, teacher head i + 1 fools target i's discriminators (each term halved);
- from iteration ``teacher_iters`` on, the student head is distilled from teacher i on
  target i: ``lambda_kl_target * KL(teacher || student)`` on the main outputs and
  ``lambda_seg_aux * lambda_kl_target / T`` times the auxiliary one
  (``aux_kl_over_targets``), the teacher detached, temperature 1, KL averaged over every
  element (:func:`ddb_jax.uda.adversarial.kl_to_teacher`); all at the input size;
- each discriminator ``d_{level}_{i}`` trains on teacher i + 1's detached maps of the
  source and of target i, each half over 2.

The auxiliary term of the segmentor uses the last target's auxiliary discriminator for
every target, as the reference (``last_aux_discriminator``), and the student head stays
untouched (not even weight-decayed) until the distillation starts
(``student_idle_until_teacher_iters``). Every update comes from the pre-step parameters.
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
from ddb_jax.models.advent_deeplabv2 import CLASSIFIER_MODULES as CLASSIFIERS
from ddb_jax.models.advent_deeplabv2 import path_names
from ddb_jax.uda import adversarial

SOURCE, TARGET = adversarial.SOURCE_LABEL, adversarial.TARGET_LABEL
STUDENT = 0  # the head the reference evaluates (eval_UDA.py: pred_main_list[0])


@dataclasses.dataclass(frozen=True)
class MultiTargetDistillation:
    student_apply: Callable
    discriminate: mtaf_shared.Discriminators
    cfg: ml_collections.ConfigDict  # config.mtaf with num_targets
    levels: tuple[str, ...]  # 'main', and 'aux' when multi-level
    targets: tuple[str, ...]  # config.data.target
    segmentor_optim: ml_collections.ConfigDict  # config.optim

    name: ClassVar[str] = "mtaf_mtkt"
    key_names: ClassVar[tuple[str, ...]] = ()
    terms: ClassVar[tuple] = ()
    preview_tag: ClassVar[str] = "mtaf"

    @property
    def num_targets(self) -> int:
        return len(self.targets)

    @property
    def other_trees(self) -> Mapping[str, ml_collections.ConfigDict]:
        return {
            f"d_{level}_{i}": self.cfg.optim_d
            for level in self.levels
            for i in range(self.num_targets)
        }

    @property
    def metric_names(self) -> tuple[str, ...]:
        names = [f"loss_seg_{level}" for level in self.levels]
        for what in ("adv", "kl"):
            names += [f"loss_{what}_{lv}_{i}" for i in range(self.num_targets)
                      for lv in self.levels]  # fmt: skip
        return (*names, *(f"loss_{name}" for name in self.other_trees))

    @property
    def preview_panels(self) -> tuple[str, ...]:
        per_target = [(f"target {name} image", f"target {name} student", f"target {name} teacher")
                      for name in self.targets]  # fmt: skip
        return ("source image", "source label", *sum(per_target, ()))

    def init_others(self, key: jax.Array) -> dict[str, Any]:
        return self.discriminate.init_trees(key, tuple(self.other_trees))

    def init_state(self, state: TrainState) -> TrainState:
        return state

    def adversary(self, level: str, target: int) -> str:
        """The discriminator the segmentor fools with target ``target``'s ``level`` maps."""
        if level == "aux" and self.cfg.last_aux_discriminator:
            return f"d_aux_{self.num_targets - 1}"  # the reference's d_aux, not re-indexed
        return f"d_{level}_{target}"

    def kl_weight(self, level: str) -> float:
        cfg = self.cfg
        if level == "main":
            return cfg.lambda_kl_target
        over = self.num_targets if cfg.aux_kl_over_targets else 1
        return cfg.lambda_seg_aux * cfg.lambda_kl_target / over

    def segmentor_loss(self, params, state: TrainState, batch, disc: Mapping):
        cfg = self.cfg
        outputs = {level: mtaf_shared.HEAD_OUTPUTS[level] for level in self.levels}
        source, stats = mtaf_shared.segmentor_forward(
            self.student_apply, params, state.batch_stats, batch["source_image"], outputs
        )
        teachers = range(1, self.num_targets + 1)
        out: dict[str, Any] = {"targets": []}
        total = 0.0
        for level in self.levels:
            seg = sum(adversarial.valid_pixel_cross_entropy(source[level][h], batch["source_label"])
                      for h in teachers)  # fmt: skip
            out[f"loss_seg_{level}"] = seg
            total = total + cfg[f"lambda_seg_{level}"] * seg
        maps = {
            "source": [{lv: mtaf_shared.self_information(source[lv][h]) for lv in self.levels}
                       for h in teachers],
            "targets": [],
        }  # fmt: skip
        distilling = (state.step >= cfg.teacher_iters).astype(jnp.result_type(float))
        terms = []
        for i, key in enumerate(mtaf_shared.target_keys(self.targets)):
            target, stats = mtaf_shared.segmentor_forward(
                self.student_apply, params, stats, batch[key], outputs
            )
            out["targets"].append(target)
            maps["targets"].append({})
            for level in self.levels:
                teacher = target[level][i + 1]
                target_maps = mtaf_shared.self_information(teacher)
                maps["targets"][i][level] = target_maps
                terms.append((self.adversary(level, i), target_maps, SOURCE, 1.0,
                              f"loss_adv_{level}_{i}"))  # fmt: skip
                kl = distilling * adversarial.kl_to_teacher(
                    target[level][STUDENT], jax.lax.stop_gradient(teacher)
                )
                out[f"loss_kl_{level}_{i}"] = kl
                total = total + self.kl_weight(level) * kl
        for name, adv in mtaf_shared.adversarial_terms(self.discriminate, disc, terms).items():
            out[name] = adv  # loss_adv_{level}_{target}, halved in the loss
            total = total + cfg[f"lambda_adv_{name.split('_')[2]}"] * adv / 2
        out["batch_stats"], out["maps"] = stats, maps
        return total, out

    def discriminator_losses(self, disc: Mapping, maps) -> dict[str, jax.Array]:
        """``d_{level}_{i}``: teacher i + 1's detached source maps as source, target i's as
        target, each half over 2."""
        terms = []
        for name in self.other_trees:
            level, i = name[2:].rsplit("_", 1)
            terms += [(name, maps["source"][int(i)][level], SOURCE, 1 / 2, name),
                      (name, maps["targets"][int(i)][level], TARGET, 1 / 2, name)]  # fmt: skip
        return mtaf_shared.adversarial_terms(self.discriminate, disc, terms)

    def update(self, txs: Optimizers, state: TrainState, batch, frozen: Any = None):
        """One iteration; see the module docstring."""
        new_state, out, metrics = mtaf_shared.adversarial_update(self, txs, state, batch)
        if self.cfg.student_idle_until_teacher_iters:
            idle = state.step < self.cfg.teacher_iters
            new_state = new_state.replace(
                params=hold_student(new_state.params, state.params, idle),
                opt_state=hold_student(new_state.opt_state, state.opt_state, idle),
            )
        return new_state, out, metrics

    def preview(self, batch, outputs: base.Context) -> list[jax.Array]:
        panels = [
            previews.denormalize(batch["source_image"]),
            previews.colorize(batch["source_label"]),
        ]
        keys = mtaf_shared.target_keys(self.targets)
        for i, (key, target) in enumerate(zip(keys, outputs["targets"], strict=True)):
            panels += [
                previews.denormalize(batch[key]),
                previews.colorize(jnp.argmax(target["main"][STUDENT], axis=-1)),
                previews.colorize(jnp.argmax(target["main"][i + 1], axis=-1)),
            ]
        return panels


def is_student_leaf(path: tuple) -> bool:
    """A leaf of the student head (its parameters, or their optimiser state)."""
    names = path_names(path)
    pairs = zip(names, names[1:], strict=False)
    return any(a in CLASSIFIERS and b == f"head_{STUDENT}" for a, b in pairs)


def hold_student(new, old, idle: jax.Array):
    """``new`` with the student head's leaves as in ``old`` while ``idle`` (PyTorch's SGD
    skips a parameter without a gradient)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, n, o: jnp.where(idle, o, n) if is_student_leaf(path) else n, new, old
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    mtaf_shared.check_config(config, 2, heads=1 + len(config.data.target))


def create(config: ml_collections.ConfigDict, student_apply: Callable, build_model):
    return MultiTargetDistillation(
        student_apply=student_apply,
        discriminate=mtaf_shared.build_discriminators(config),
        cfg=mtaf_shared.method_config(config),
        levels=mtaf_shared.levels_of(config),
        targets=tuple(config.data.target),
        segmentor_optim=config.optim,
    )


mtaf_shared.register(("mtaf_mtkt",), create, check_config)
