"""Reading PyTorch checkpoints (the only module of the package that imports torch).

DDB checkpoints hold several models under key prefixes; this module reads the
file and picks one model's state dict, so the architecture mappings only ever
see mmseg segmentor keys (``backbone.*``, ``decode_head.*``) or a bare backbone.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from ddb_jax import errors, paths

# Model prefixes in DDB checkpoints: self-training (model, ema_model, imnet_model when
# feature distance was on) and cross-path distillation (stu_model, cu_model, ca_model).
MODEL_PREFIXES = ("stu_model", "model", "ema_model", "imnet_model", "cu_model", "ca_model")
# The model a user deploys: the distilled student, else the self-training student.
DEPLOYABLE_ORDER = ("stu_model", "model")


class CheckpointFormatError(errors.InputError, ValueError):
    """A file is not a PyTorch checkpoint of the expected layout."""


def load_torch_file(path: str, allow_pickle: bool = False) -> Mapping:
    """Loads a ``.pth`` file on the CPU; refuses arbitrary pickles unless ``allow_pickle``."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading PyTorch .pth files needs torch: pip install 'ddb-jax[test]' (torch==2.13.0)"
        ) from err
    if not paths.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        data = io.BytesIO(paths.read_bytes(path))  # local or gs://
        checkpoint = torch.load(data, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # torch raises many types for truncated / foreign files
        hint = ""
        if "weights_only" in str(err) and not allow_pickle:
            hint = (
                " It holds Python objects beyond tensors; if you trust the file, "
                "pass --allow-pickle."
            )
        raise CheckpointFormatError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}).{hint}"
        ) from err
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(
            f"{path} holds a {type(checkpoint).__name__}, not a state dict or "
            "{'state_dict': ...} mapping"
        )
    return checkpoint


def to_numpy_state_dict(state: Mapping, path: str) -> dict[str, np.ndarray]:
    """Tensors -> numpy; anything that is not a tensor is a format error naming the key."""
    import torch

    arrays = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(
                f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor"
            )
        arrays[key] = value.detach().cpu().numpy()
    return arrays


def split_prefixes(state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Groups keys by DDB model prefix; {'': state} for an unprefixed state dict."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    groups: dict[str, dict[str, np.ndarray]] = {}
    stray = []
    for key, value in state.items():
        prefix = key.split(".", 1)[0]
        if prefix in MODEL_PREFIXES and "." in key:
            groups.setdefault(prefix, {})[key.split(".", 1)[1]] = value
        else:
            stray.append(key)
    if not groups:
        return {"": dict(state)}
    if stray:
        raise CheckpointFormatError(
            f"keys outside the model prefixes {MODEL_PREFIXES}: {sorted(stray)[:20]}"
        )
    return groups


def select_model(
    groups: Mapping[str, dict[str, np.ndarray]], which: str | None, path: str
) -> tuple[str, dict[str, np.ndarray]]:
    """Picks one model of a DDB checkpoint: ``which`` or the deployable one."""
    if "" in groups:
        if which:
            raise CheckpointFormatError(
                f"{path} has no model prefixes, so --which={which!r} does not apply"
            )
        return "", groups[""]
    if which is None:
        which = next((p for p in DEPLOYABLE_ORDER if p in groups), None)
        if which is None:
            raise CheckpointFormatError(f"{path} holds {sorted(groups)}; pick one with --which")
    if which not in groups:
        raise CheckpointFormatError(f"{path} has no model {which!r}; it holds {sorted(groups)}")
    return which, groups[which]


def read_model_state_dict(
    path: str, which: str | None = None, allow_pickle: bool = False
) -> tuple[str, dict[str, np.ndarray]]:
    """Reads ``path`` and returns (chosen prefix, that model's numpy state dict)."""
    checkpoint = load_torch_file(path, allow_pickle=allow_pickle)
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping) or not state:
        raise CheckpointFormatError(f"{path}: 'state_dict' is empty or not a mapping")
    arrays = to_numpy_state_dict(state, path)
    return select_model(split_prefixes(arrays), which, path)
