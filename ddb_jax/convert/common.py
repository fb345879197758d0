"""Strict PyTorch state dict -> Flax variables mapping, shared by every architecture.

An architecture module supplies one function, ``torch_name(path) -> TorchSource``,
that says which torch tensor (and which layout transform) fills each Flax leaf.
This module walks the model's variable tree, checks that every torch tensor is
used exactly once and every shape fits, and reports all problems at once:
silently unloaded weights are the classic failure of the PyTorch anchors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np

from ddb_jax import errors

# Tensors that carry no model state we need (BatchNorm's step counter).
IGNORED_SUFFIXES = ("num_batches_tracked",)


class ConversionError(errors.InputError, ValueError):
    """A checkpoint does not fit the model; the message lists every mismatch."""


def identity(x: np.ndarray) -> np.ndarray:
    return x


def conv_kernel(x: np.ndarray) -> np.ndarray:
    """torch conv weight OIHW -> flax HWIO."""
    return np.transpose(x, (2, 3, 1, 0))


def linear_kernel(x: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> flax Dense kernel (in, out); 1x1 conv weights too."""
    return np.transpose(x.reshape(x.shape[0], x.shape[1]), (1, 0))


@dataclasses.dataclass(frozen=True)
class TorchSource:
    """Where a Flax leaf comes from: a torch key and the transform into Flax layout."""

    key: str
    transform: Callable[[np.ndarray], np.ndarray] = identity


def path_to_str(path: tuple) -> str:
    """A jax key path as 'params/backbone/stem_0/kernel'."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target_shapes,
    torch_name: Callable[[tuple[str, ...]], TorchSource],
    *,
    skip: Callable[[tuple[str, ...]], bool] = lambda path: False,
    ignore_keys: Iterable[str] = (),
    source: str = "checkpoint",
):
    """Fills the Flax variable tree ``target_shapes`` from ``state_dict``.

    Args:
      state_dict: torch key -> numpy array.
      target_shapes: pytree of ShapeDtypeStruct (e.g. ``models.variable_shapes``).
      torch_name: maps a leaf path (('params', 'backbone', ..., 'kernel')) to its source.
      skip: leaves not expected in this checkpoint (e.g. the head, for an ImageNet
        backbone); they are returned as ``None``.
      ignore_keys: torch keys known to be unused (e.g. an ImageNet classifier).
      source: the file name, for error messages.

    Returns:
      the variable tree with numpy arrays (``None`` for skipped leaves).

    Raises:
      ConversionError: listing missing keys, unexpected keys and shape conflicts.
    """
    missing, conflicts, used = [], [], {}
    ignore = set(ignore_keys)

    def fill(path, shape_struct):
        names = tuple(path_to_str((p,)) for p in path)
        if skip(names):
            return None
        src = torch_name(names)
        if src.key in used:
            conflicts.append(f"{src.key} used twice: by {used[src.key]} and {'/'.join(names)}")
            return None
        used[src.key] = "/".join(names)
        if src.key not in state_dict:
            missing.append(f"{src.key} (for {'/'.join(names)})")
            return None
        value = src.transform(np.asarray(state_dict[src.key]))
        if tuple(value.shape) != tuple(shape_struct.shape):
            conflicts.append(
                f"{src.key}: checkpoint {tuple(np.shape(state_dict[src.key]))} -> "
                f"{tuple(value.shape)}, model {'/'.join(names)} expects {tuple(shape_struct.shape)}"
            )
            return None
        return value.astype(shape_struct.dtype)

    converted = jax.tree_util.tree_map_with_path(fill, target_shapes)
    unexpected = sorted(
        k
        for k in state_dict
        if k not in used and k not in ignore and not k.endswith(IGNORED_SUFFIXES)
    )
    if missing or unexpected or conflicts:
        lines = [f"{source} does not fit the model:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape conflicts", conflicts),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise ConversionError("\n".join(lines))
    return converted


DATA_PARALLEL_PREFIX = "module."


def strip_data_parallel(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the ``module.`` prefix when every key has it (a DataParallel state dict)."""
    if state_dict and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
        return {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def convert_to_shapes(
    state_dict: Mapping[str, np.ndarray],
    shapes,
    torch_name: Callable[[tuple[str, ...]], TorchSource],
    *,
    dtype=np.float32,
    without: Iterable[str] = (),
    ignore_keys: Iterable[str] = (),
    source: str = "checkpoint",
):
    """A (DataParallel or plain) state dict -> numpy variables of ``shapes`` (a tree of
    shapes, e.g. ``models.variable_shapes``), every leaf ``dtype``; the top-level modules
    in ``without`` are left out (a backbone file fills the backbone alone)."""
    without = set(without)
    kept = {c: {k: v for k, v in tree.items() if k not in without} for c, tree in shapes.items()}
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), kept)
    converted = convert_state_dict(strip_data_parallel(state_dict), target, torch_name,
                                   ignore_keys=ignore_keys, source=source)  # fmt: skip
    return jax.tree_util.tree_map(np.asarray, converted)
