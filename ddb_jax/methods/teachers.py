"""CKD's frozen inputs: the two path models and their prototype tables, checked and loaded.

Checked before anything long runs (and before the stage records its config), each error
naming the config key and the stage that writes the missing file.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddb_jax import checkpoints, errors, models, paths
from ddb_jax.graph import rounds
from ddb_jax.methods.self_training import no_dropout
from ddb_jax.offline import prototype_io

PATHS = ("cu", "ca")
TEACHER_DTYPES = ("float32", "bfloat16")


class DistillationConfigError(errors.UsageError, ValueError):
    """config.ckd (or a setting CKD depends on) is not usable."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of config.ckd and the files it names, before anything is loaded."""
    check_settings(config)
    check_files(config)


def check_settings(config: ml_collections.ConfigDict) -> None:
    """config.ckd's own values and the mask it needs (not the files it names)."""
    ckd = config.ckd
    if ckd.teacher_dtype not in TEACHER_DTYPES:
        raise DistillationConfigError(
            f"config.ckd.teacher_dtype={ckd.teacher_dtype!r}; use one of {list(TEACHER_DTYPES)}"
        )
    if ckd.soft_distill and not ckd.temperature > 0:
        raise DistillationConfigError(f"config.ckd.temperature={ckd.temperature!r}; it must be > 0")
    if config.st.mask != "zero":
        raise DistillationConfigError(
            f"config.st.mask={config.st.mask!r}, but stage 'ckd' trains the student on the "
            "strongly augmented target image alone (the reference's CKD data uses "
            "mask='zero'); set config.st.mask='zero'"
        )


def check_files(config: ml_collections.ConfigDict) -> None:
    """The teachers' model directories and (with rectification) prototype files exist."""
    ckd = config.ckd
    for path in PATHS:
        key = f"ckd.teacher_{path}"
        model_dir = ckd[f"teacher_{path}"]
        if not model_dir or not paths.isfile(paths.join(model_dir, checkpoints.MODEL_JSON)):
            state = "is not set" if not model_dir else "is not a model directory"
            raise checkpoints.CheckpointError(
                f"config.{key}={model_dir!r} {state}; it must be {rounds.produced_by(key)}"
            )
        if ckd.proto_rectify:
            key = f"ckd.prototypes_{path}"
            file = ckd[f"prototypes_{path}"]
            if not file or not paths.isfile(file):
                state = "is not set" if not file else "does not exist"
                raise prototype_io.PrototypeError(
                    f"config.{key}={file!r} {state} (needed by config.ckd.proto_rectify="
                    f"True); it is written by {rounds.produced_by(key)}"
                )


def teacher_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The student's architecture with dropout off and the teachers' compute dtype."""
    model_cfg = no_dropout(config.model)
    model_cfg.dtype = config.ckd.teacher_dtype
    return model_cfg


def load_teachers(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Both teachers as one host pytree ``{'cu': {'variables', ['prototypes']}, 'ca': ...}``.

    Checks each teacher's architecture against config.model and each prototype table's
    shape (classes x head channels). With ``teacher_dtype='bfloat16'`` the parameters
    are stored in bf16 (half the memory; BN statistics stay float32). Prototypes are
    loaded only when ``config.ckd.proto_rectify`` is on.
    """
    check_config(config)
    ckd = config.ckd
    teachers: dict[str, Any] = {path: {} for path in PATHS}
    # Architectures and prototype tables first: small files, so a mistake in the second
    # teacher shows before the first one's weights are read.
    for path in PATHS:
        key = f"ckd.teacher_{path}"
        model_dir = ckd[f"teacher_{path}"]
        stored_cfg, _ = checkpoints.read_model_config(model_dir)
        checkpoints.check_compatible(
            stored_cfg, config.model, f"config.{key}={model_dir!r} ({rounds.produced_by(key)})"
        )
        if ckd.proto_rectify:
            key = f"ckd.prototypes_{path}"
            try:
                table, _ = prototype_io.load_prototypes(
                    ckd[f"prototypes_{path}"],
                    config.model.num_classes,
                    config.model.head_channels,
                    produced_by=rounds.produced_by(key),
                )
            except prototype_io.PrototypeError as err:
                raise prototype_io.PrototypeError(f"config.{key}: {err}") from err
            teachers[path]["prototypes"] = table
    wanted = models.variable_shapes(models.build_model(config.model))
    for path in PATHS:
        model_dir = ckd[f"teacher_{path}"]
        variables, _ = checkpoints.load_model_dir(model_dir)
        checkpoints.check_tensors(
            wanted, variables, f"config.ckd.teacher_{path}={model_dir!r} does not fit config.model"
        )
        params = variables["params"]
        if ckd.teacher_dtype == "bfloat16":
            params = jax.tree_util.tree_map(lambda x: np.asarray(x, jnp.bfloat16), params)
        teachers[path]["variables"] = {
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
        }
    return teachers


def teacher_shapes(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """:func:`load_teachers`'s tree as ShapeDtypeStructs, from the config alone."""
    check_settings(config)
    variables = models.variable_shapes(models.build_model(config.model))
    params_dtype = jnp.bfloat16 if config.ckd.teacher_dtype == "bfloat16" else None
    params = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, params_dtype or x.dtype), variables["params"]
    )
    shapes: dict[str, Any] = {}
    for path in PATHS:
        shapes[path] = {"variables": {
            "params": params, "batch_stats": variables.get("batch_stats", {}),
        }}  # fmt: skip
        if config.ckd.proto_rectify:
            table = (config.model.num_classes, config.model.head_channels)
            shapes[path]["prototypes"] = jax.ShapeDtypeStruct(table, jnp.float32)
    return shapes
