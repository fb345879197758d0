"""Every config value checked against its allowed range before a stage writes anything.

A value outside its range used to surface deep inside TensorFlow or XLA (a 95-line
traceback for ``batch_size=-4``), or not at all (``num_steps=-5`` exported an untrained
model), after ``config.json`` had locked the workdir to the bad config. :data:`RULES` is
the one table of what each key of ``configs/default.py`` (with the methods' sections)
accepts; :func:`check_config` walks a stage's or a pipeline's config through it and
:func:`check_workdir` tries the workdir, so ``ddb_jax.main`` refuses a bad value in one
line, exit status 2, with nothing written. Enumerations import their values from the code
that uses them. What depends on files or devices (a model directory, the mesh) is checked
where it is read, still before ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import socket
from collections.abc import Callable, Collection
from typing import Any

import jax
import ml_collections

import ddb_jax.graph  # noqa: F401  (its modules register the pipelines of GRAPHS)
from ddb_jax import errors, labels, models, paths
from ddb_jax.evaluation.evaluate import EVAL_MODES
from ddb_jax.graph import stage_graph
from ddb_jax.methods import optim, teachers
from ddb_jax.models.layers import CONV_IMPLS
from ddb_jax.uda.bridging import MASK_MODES
from input_pipeline.datasets import DATASETS


class ConfigValueError(errors.UsageError, ValueError):
    """A config value outside its allowed range; the message names key, value and range."""


class WorkdirError(errors.UsageError, ValueError):
    """``--workdir`` cannot be created, is not a directory, or cannot be written."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a key accepts: ``test(value)``; ``allowed`` completes "must be ..."; ``invalid``
    is a value of the key's type that fails (the tests walk every key with it)."""

    test: Callable[[Any], bool]
    allowed: str
    invalid: Any


def _int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int = 1, meaning: str = "", also: tuple[int, ...] = ()) -> Rule:
    """An integer >= ``minimum`` (or one of ``also``); ``meaning`` explains a special value."""
    allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    allowed += "".join(f" or {a}" for a in also) + (f" ({meaning})" if meaning else "")
    return Rule(lambda v: _int(v) and (v >= minimum or v in also), allowed, minimum - 1)


def real(
    low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Rule:
    """A finite number in [low, high] (an end open where said; no ``high``: unbounded)."""

    def test(v: Any) -> bool:
        above = _real(v) and (v > low if low_open else v >= low)
        return above and (high is None or (v < high if high_open else v <= high))

    if high is None:
        return Rule(test, f"a number {'>' if low_open else '>='} {low:g}", low - 1.0)
    ends = "(["[not low_open], ")]"[not high_open]
    return Rule(test, f"a number in {ends[0]}{low:g}, {high:g}{ends[1]}", high + 0.5)


def ints(length: int | None = None, minimum: int = 1, empty: bool = False) -> Rule:
    """A tuple of ``length`` integers >= ``minimum`` (``empty``: or ())."""

    def test(v: Any) -> bool:
        if isinstance(v, tuple | list) and not v:
            return empty
        return (
            isinstance(v, tuple | list)
            and (length is None or len(v) == length)
            and all(_int(x) and x >= minimum for x in v)
        )

    count = {None: "", 2: "a pair of ", 4: "four "}[length]
    kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
    allowed = f"{count or 'a tuple of '}{kind}" + (" or ()" if empty else "")
    return Rule(test, allowed, (minimum - 1,) * (length or 1))


def one_of(values: Collection) -> Rule:
    """One of ``values``."""
    return Rule(lambda v: v in values, f"one of {list(values)}", "nope")


def each_of(values: Collection, empty: bool = True) -> Rule:
    """A tuple of names from ``values`` (``empty=False``: at least one)."""

    def test(v: Any) -> bool:
        return isinstance(v, tuple | list) and (empty or bool(v)) and all(x in values for x in v)

    return Rule(
        test, f"a tuple of {'' if empty else 'one or more '}names from {list(values)}", ("nope",)
    )


def scales(v: Any) -> bool:
    """data.resize_scales: dataset name -> None or a (long, short) pair of positive ints."""
    pair = ints(2).test
    return isinstance(v, dict) and all(
        k in DATASETS and (s is None or pair(s)) for k, s in v.items()
    )


POSITIVE, NON_NEGATIVE, RATIO = integer(1), real(0.0), real(0.0, 1.0)
PAIR, BELOW_ONE = ints(2), real(0.0, 1.0, high_open=True)
# An optimiser section: config.optim (the segmentor's) and a method's own (advent.optim_d).
OPTIM = {
    "kind": one_of(optim.OPTIMIZERS), "listed_times": one_of(optim.LISTINGS),
    "lr": real(0.0, low_open=True), "b1": BELOW_ONE, "b2": BELOW_ONE, "momentum": BELOW_ONE,
    "weight_decay": NON_NEGATIVE, "head_lr_mult": NON_NEGATIVE, "poly_power": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE, "warmup_ratio": RATIO,
    "warmup_iters": integer(0, "0 = no warmup"),
    "max_iters": integer(0, "0 = config.num_steps"),
}  # fmt: skip
RULES: dict[str, Rule] = {
    "seed": integer(0), "batch_size": POSITIVE, "num_steps": POSITIVE,
    "mesh_devices": integer(0, "0 = all devices"),
    "log_every": POSITIVE, "checkpoint_every": POSITIVE, "keep_checkpoints": POSITIVE,
    "eval_every": integer(0, "0 = no evaluation during training"),
    "image_summary_every": integer(0, "0 = no image summaries"),
    # a pipeline's own keys
    "graph": one_of(stage_graph.GRAPHS), "rounds": POSITIVE,
    "baselines": each_of(stage_graph.BASELINES), "round2_lr_scale": real(0.0, low_open=True),
    "seeds": ints(minimum=0, empty=True),
    "model.num_classes": POSITIVE, "model.base_channels": POSITIVE,
    "model.head_channels": POSITIVE, "model.dropout_ratio": BELOW_ONE,
    "model.drop_path_rate": BELOW_ONE, "model.advent_blocks": ints(4),
    "model.head": one_of(models.HEADS), "model.mit_layout": one_of(models.MIT_LAYOUTS),
    "model.dtype": one_of(models.COMPUTE_DTYPES), "model.conv_impl": one_of(CONV_IMPLS),
    "data.source": each_of(DATASETS, empty=False), "data.target": each_of(DATASETS, empty=False),
    "data.crop_size": PAIR, "data.target_crop_size": ints(2, empty=True),
    "data.flip_prob": RATIO, "data.cat_max_ratio": real(0.0, 1.0, low_open=True),
    "data.rcs_temperature": real(0.0, low_open=True), "data.rcs_min_pixels": integer(0),
    "data.rcs_min_crop_ratio": RATIO,
    "data.resize_scales": Rule(scales, f"{{dataset: None or (long, short)}}, datasets of "
                                       f"{list(DATASETS)}", {"nope": None}),
    "data.num_parallel_calls": integer(1, "tf.data.AUTOTUNE", also=(-1,)),
    **{f"optim.{key}": rule for key, rule in OPTIM.items()},
    "st.mask": one_of(MASK_MODES), "st.cut_area_ratio": RATIO, "st.ema_alpha": BELOW_ONE,
    "st.pseudo_threshold": RATIO, "st.pseudo_weight_ignore_top": integer(0),
    "st.pseudo_weight_ignore_bottom": integer(0), "st.color_jitter_p": RATIO,
    "st.color_jitter_strength": NON_NEGATIVE, "st.blur_p": RATIO,
    "fdist.weight": NON_NEGATIVE, "fdist.classes": ints(minimum=0, empty=True),
    "fdist.min_ratio": RATIO,
    "mic.block_size": POSITIVE, "mic.mask_ratio": BELOW_ONE, "mic.weight": NON_NEGATIVE,
    "ckd.soft_distill_weight": NON_NEGATIVE, "ckd.temperature": real(0.0, low_open=True),
    "ckd.teacher_dtype": one_of(teachers.TEACHER_DTYPES),
    "prototypes.num_passes": POSITIVE, "prototypes.batch_size": POSITIVE,
    "prototypes.min_pixels": POSITIVE, "prototypes.count_cap": POSITIVE,
    "eval.mode": one_of(EVAL_MODES), "eval.crop_size": PAIR, "eval.stride": PAIR,
    "eval.batch_size": POSITIVE, "eval.miou_protocols": each_of(labels.MIOU_PROTOCOLS),
    "eval.ensemble_weights": Rule(lambda v: isinstance(v, tuple | list) and len(v) == 2
                                  and all(map(_real, v)), "a pair of numbers", (1.0,)),
    # ADVENT's section (ddb_jax/methods/advent.py)
    **{f"advent.{k}": NON_NEGATIVE for k in ("lambda_seg_aux", "lambda_adv_main",
                                             "lambda_adv_aux", "lambda_ent_main",
                                             "lambda_ent_aux")},
    "advent.disc_channels": POSITIVE,
    **{f"advent.optim_d.{key}": rule for key, rule in OPTIM.items() if key != "listed_times"},
}  # fmt: skip
# The other keys (booleans aside): strings checked where they are used, the stage and
# backbone by the dispatcher and the model builder (one line, exit 2, before anything
# runs), paths and dataset splits by the stage that reads them (before config.json), the
# pipeline's subset by the pipeline; and parameter-name substrings, which any string is.
CHECKED_ELSEWHERE = (
    "stage", "model.backbone", "init_from", "checkpoint", "data.root", "eval.split",
    "eval.ensemble_checkpoint", "fdist.imnet_from", "ckd.teacher_cu", "ckd.teacher_ca",
    "ckd.prototypes_cu", "ckd.prototypes_ca", "stages",
    "optim.head_keys", "optim.frozen_keys", "optim.no_decay_keys",
)  # fmt: skip
MAPPINGS = ("data.resize_scales",)  # ConfigDicts that are one value, not a section


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every value of ``config`` (None: a per-stage override unset)."""
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and name not in MAPPINGS:
            out += leaves(value, f"{name}.")
        else:
            out.append((name, value.to_dict() if hasattr(value, "to_dict") else value))
    return out


def check_value(key: str, value: Any, shown: str | None = None) -> None:
    """Raises :class:`ConfigValueError` when ``value`` is outside ``key``'s range
    (``shown``: the key as the user set it, e.g. ``pipeline.r1_cu.batch_size``)."""
    rule = RULES.get(key)
    if rule is not None and not rule.test(value):
        value = tuple(value) if isinstance(value, list) else value
        raise ConfigValueError(f"config.{shown or key}={value!r}: must be {rule.allowed}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every value of a stage's config; of a pipeline's, its top level (where the keys the
    graph sets per stage are '') and each override ``config.pipeline.<stage>.<key>`` set."""
    is_pipeline = config.get("stage") == "pipeline"
    for key, value in leaves(config):
        if key.startswith("pipeline."):
            if value is not None:
                check_value(key.split(".", 2)[2], value, key)
        elif not (is_pipeline and key in stage_graph.PER_STAGE_KEYS and value == ""):
            check_value(key, value)


def check_workdir(workdir: str) -> None:
    """A local ``--workdir`` must be a directory this process can create and write: tried
    by creating it and a probe file, both removed again (a failed start leaves nothing;
    an unwritable one would otherwise fail after minutes of set-up with bare errno text).
    A bucket's is checked by :func:`ddb_jax.paths.check_bucket`."""
    if paths.is_remote(workdir):
        paths.check_bucket(workdir, "--workdir")
        return
    path, created = os.path.abspath(workdir), []
    while not os.path.exists(path):  # the directories the probe creates, deepest first
        created.append(path)
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is a file" if not created else f"is under {path}, a file"
        raise WorkdirError(f"--workdir={workdir} {what}, not a directory; use a directory")
    probe = os.path.join(workdir, f".ddb_jax_probe_{socket.gethostname()}_{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise WorkdirError(
            f"--workdir={workdir} cannot be created or written ({err.strerror or err}); "
            "use a directory you can write"
        ) from err
    finally:
        # In a multi-host job another process may be writing there by now: the new
        # directories stay (empty, they lock nothing). Asked without starting a backend,
        # whose start-up logs lines before this error's one.
        for directory in () if jax.distributed.is_initialized() else created:
            try:
                os.rmdir(directory)
            except OSError:
                break
