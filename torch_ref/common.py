"""Array plumbing between NumPy (NHWC, what JAX sees) and torch (NCHW)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def to_torch(x) -> torch.Tensor:
    """A tensor of the array's dtype (float64 stays float64). Read-only arrays (views of JAX
    arrays) are copied first: torch has no read-only tensors, and from_numpy warns on them."""
    x = np.asarray(x)
    if not x.flags.writeable:
        x = x.copy()
    return torch.from_numpy(np.ascontiguousarray(x))


def nchw(x) -> torch.Tensor:
    """An NHWC array as an NCHW tensor."""
    return to_torch(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
    """An NCHW tensor (or array) as an NHWC array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).transpose(0, 2, 3, 1)


def numpy_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    """The state dict as NumPy arrays (what ``ddb_jax.convert`` consumes)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
