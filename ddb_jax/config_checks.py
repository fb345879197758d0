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

import os
import socket
from typing import Any

import jax
import ml_collections

import ddb_jax.graph  # noqa: F401  (its modules register the pipelines of GRAPHS)
from ddb_jax import errors, label_sets, labels, methods, models, paths
from ddb_jax.config_rules import (
    BELOW_ONE,
    NON_NEGATIVE,
    PAIR,
    POSITIVE,
    RATIO,
    Rule,
    each_of,
    integer,
    ints,
    is_real,
    one_of,
    real,
)  # fmt: skip
from ddb_jax.evaluation.evaluate import EVAL_MODES
from ddb_jax.graph import stage_graph
from ddb_jax.methods import device_input, optim, teachers
from ddb_jax.models.batch_norm import BN_STATISTICS
from ddb_jax.models.layers import CONV_IMPLS
from ddb_jax.offline.prototype_stage import PROTOTYPE_MODES
from ddb_jax.train import state_layouts
from ddb_jax.uda.bridging import MASK_MODES
from input_pipeline.datasets import DATASETS


class ConfigValueError(errors.UsageError, ValueError):
    """A config value outside its allowed range; the message names key, value and range."""


class WorkdirError(errors.UsageError, ValueError):
    """``--workdir`` cannot be created, is not a directory, or cannot be written."""


def scales(v: Any) -> bool:
    """data.resize_scales: dataset name -> None or a (long, short) pair of positive ints."""
    pair = ints(2).test
    return isinstance(v, dict) and all(
        k in DATASETS and (s is None or pair(s)) for k, s in v.items()
    )


RULES: dict[str, Rule] = {
    "seed": integer(0), "batch_size": POSITIVE, "num_steps": POSITIVE,
    "mesh_devices": integer(0, "0 = all devices"),
    "state_layouts": one_of(state_layouts.STATE_LAYOUTS),
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
    "model.proda_blocks": ints(4), "model.advent_heads": POSITIVE,
    "model.head": one_of(models.HEADS), "model.mit_layout": one_of(models.MIT_LAYOUTS),
    "model.dtype": one_of(models.COMPUTE_DTYPES), "model.conv_impl": one_of(CONV_IMPLS),
    "model.bn_statistics": one_of(BN_STATISTICS),
    "model.hrda.context_scale": Rule(lambda v: is_real(v) and v == 0.5,
                                     "0.5 (the one context scale HRDA's alignment supports)", 0.25),
    "model.hrda.detail_crop": PAIR, "model.hrda.crop_divisible": POSITIVE,
    "model.hrda.detail_loss_weight": BELOW_ONE, "model.hrda.attention_channels": POSITIVE,
    "data.source": each_of(DATASETS, empty=False), "data.target": each_of(DATASETS, empty=False),
    "data.crop_size": PAIR, "data.target_crop_size": ints(2, empty=True),
    "data.flip_prob": RATIO, "data.cat_max_ratio": real(0.0, 1.0, low_open=True),
    "data.rcs_temperature": real(0.0, low_open=True), "data.rcs_min_pixels": integer(0),
    "data.rcs_min_crop_ratio": NON_NEGATIVE, "data.target_pseudo_margins": ints(4, minimum=0),
    "data.resize_scales": Rule(scales, f"{{dataset: None or (long, short)}}, datasets of "
                                       f"{list(DATASETS)}", {"nope": None}),
    "data.num_parallel_calls": integer(1, "tf.data.AUTOTUNE", also=(-1,)),
    "data.image_transfer": one_of(device_input.IMAGE_TRANSFERS),
    "data.proda_resize": POSITIVE, "data.proda_full_size": PAIR,
    "data.proda_source_size": PAIR, "data.proda_threshold": RATIO,
    "data.label_set": one_of(("", *label_sets.LABEL_SETS)),
    **{f"optim.{key}": rule for key, rule in optim.OPTIM_RULES.items()},
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
    "prototypes.mode": one_of(PROTOTYPE_MODES),
    "eval.mode": one_of(EVAL_MODES), "eval.crop_size": PAIR, "eval.stride": PAIR,
    "eval.batch_size": POSITIVE, "eval.miou_protocols": each_of(labels.MIOU_PROTOCOLS),
    "eval.ensemble_weights": Rule(lambda v: isinstance(v, tuple | list) and len(v) == 2
                                  and all(map(is_real, v)), "a pair of numbers", (1.0,)),
    # Each training method's own section, with the rules it declares (methods/registry.py).
    **methods.registry.section_rules(),
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
    check_source_depth(config)
    check_label_set(config)


def check_label_set(config: ml_collections.ConfigDict) -> None:
    """``data.label_set``'s labels hold its classes: the model must output that many."""
    name = (config.get("data") or {}).get("label_set", "")
    model = config.get("model") or {}
    if name and "num_classes" in model and model.num_classes != len(label_sets.class_names(name)):
        raise ConfigValueError(
            f"config.data.label_set={name!r} has {len(label_sets.class_names(name))} classes: "
            f"config.model.num_classes={model.num_classes} must equal it"
        )


def check_source_depth(config: ml_collections.ConfigDict) -> None:
    """``data.source_depth`` reads SYNTHIA's converted depth: every source must have the
    SYNTHIA layout (the one dataset shipping depth that the input pipeline reads)."""
    data = config.get("data") or {}
    if not data.get("source_depth", False):
        return
    others = [n for n in data.source if n in DATASETS and DATASETS[n].layout != "synthia"]
    if others:
        raise ConfigValueError(
            f"config.data.source_depth=True with config.data.source={tuple(data.source)!r}: "
            f"must be SYNTHIA-layout sources (synthia, toy_synthia), not {others}"
        )


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
