"""Training methods by name: each method module declares itself here once.

A declaration (:class:`MethodSpec`) says which ``config.stage`` values the method trains
(its stage kinds), how to build it for a segmentor, what it checks before anything long
runs, what it reads but never trains (teachers, a frozen ImageNet backbone) and the config
section it adds to every setting with its defaults. The training loop, the stage dispatcher
and the config defaults read this table; nothing else names the methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from ddb_jax import errors


def _nothing(config: ml_collections.ConfigDict) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One training method and the stage kinds it runs."""

    kinds: tuple[str, ...]  # the config.stage values that train with it
    # (config, student_apply, build_model) -> the method object (ddb_jax.methods.base.Method)
    create: Callable[[ml_collections.ConfigDict, Callable, Callable], Any]
    check: Callable[[ml_collections.ConfigDict], None] = _nothing  # raises on bad settings
    load_frozen: Callable[[ml_collections.ConfigDict], Any] = _nothing  # host arrays or None
    # config -> load_frozen's tree as jax.ShapeDtypeStructs, from the config alone (settings
    # checked, no file read: the compile-only check). None: shapes of what load_frozen reads.
    frozen_shapes: Callable[[ml_collections.ConfigDict], Any] | None = None
    # (config section name, () -> its defaults) for a method with settings of its own.
    config_section: tuple[str, Callable[[], ml_collections.ConfigDict]] | None = None
    # () -> {key within the section: ddb_jax.config_rules.Rule}: what each of them may be.
    section_rules: Callable[[], dict[str, Any]] | None = None


_METHODS: dict[str, MethodSpec] = {}


class UnknownMethodError(errors.UsageError, ValueError):
    """config.stage names no training method."""


class MethodConfigError(errors.UsageError, ValueError):
    """A setting of a method that does not exist or cannot work."""


def shapes_of(tree: Any) -> Any:
    """``tree``'s arrays as ``jax.ShapeDtypeStruct`` leaves, in the dtypes they have on the
    device (float64 is float32 there unless x64 is on; None stays None)."""
    if tree is None:
        return None
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jax.dtypes.canonicalize_dtype(x.dtype)), tree
    )


def register(spec: MethodSpec) -> MethodSpec:
    """Declares ``spec`` for each of its kinds (a kind declared twice is a programming error)."""
    for kind in spec.kinds:
        if kind in _METHODS and _METHODS[kind] is not spec:
            raise ValueError(f"training method kind {kind!r} is declared twice")
        _METHODS[kind] = spec
    return spec


def kinds() -> tuple[str, ...]:
    """Every stage kind a registered method trains, in declaration order."""
    return tuple(_METHODS)


def spec_for(kind: str) -> MethodSpec:
    if kind not in _METHODS:
        raise UnknownMethodError(
            f"config.stage={kind!r} is not a training method; known: {list(_METHODS)}"
        )
    return _METHODS[kind]


def config_sections() -> dict[str, Callable[[], ml_collections.ConfigDict]]:
    """``{section: defaults}`` of the methods that have settings of their own."""
    sections = {}
    for spec in dict.fromkeys(_METHODS.values()):
        if spec.config_section is not None:
            name, defaults = spec.config_section
            sections[name] = defaults
    return sections


def section_rules() -> dict[str, Any]:
    """``{'<section>.<key>': rule}`` of every method's own section (config checks)."""
    rules = {}
    for spec in dict.fromkeys(_METHODS.values()):
        if spec.config_section is not None and spec.section_rules is not None:
            name = spec.config_section[0]
            rules.update({f"{name}.{key}": rule for key, rule in spec.section_rules().items()})
    return rules
