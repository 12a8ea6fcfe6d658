"""Small helpers to move spec numbers into tensors and back to plain JSON values.

Importing this module does not import torch (a workspace is read, validated and written back
on the numpy backend without it): the helpers that make tensors import it when called, and
those that only look for tensors use ``sys.modules``, since without torch imported there
cannot be any tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def as_tensor(value: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` (number, list of numbers or of 0-d tensors, array, tensor) as a tensor.

    A tensor is moved with ``.to`` so that its autograd history is kept; a list that contains
    tensors is stacked (also differentiable). Nothing here goes through numpy for tensors.
    """
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype=dtype, device=device)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return torch.stack([as_tensor(v, dtype=dtype, device=device) for v in value])
    return torch.as_tensor(value, dtype=dtype, device=device)


def broadcast_shapes(*shapes: Sequence[int]) -> torch.Size:
    """NumPy broadcasting of shapes, as ``torch.broadcast_shapes``, whose first call imports
    sympy (about 1.5 s of start-up for every command that reaches it)."""
    import torch

    ndim = max((len(shape) for shape in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, start=ndim - len(shape)):
            if size != 1 and out[i] not in (1, size):
                raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
            if size != 1:
                out[i] = size
    return torch.Size(out)


def _tensor_type() -> type[torch.Tensor] | None:
    """``torch.Tensor`` if torch is imported, else ``None`` (then no value is a tensor)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def to_plain(value: Any) -> Any:
    """A detached, JSON-serialisable copy: tensors and arrays become (lists of) floats."""
    return _to_plain(value, _tensor_type())


def _to_plain(value: Any, tensor: type[torch.Tensor] | None) -> Any:
    if tensor is not None and isinstance(value, tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v, tensor) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, tensor) for v in value]
    return value


def structural_copy(value: Any) -> Any:
    """Copy dicts and lists, share the leaves (tensors keep their autograd graph)."""
    if isinstance(value, Mapping):
        return {k: structural_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [structural_copy(v) for v in value]
    return value


def has_tensor(value: Any) -> bool:
    """Whether a nested structure holds any torch tensor (never, when torch is not imported)."""
    tensor = _tensor_type()
    return tensor is not None and _has_tensor(value, tensor)


def _has_tensor(value: Any, tensor: type[torch.Tensor]) -> bool:
    if isinstance(value, tensor):
        return True
    if isinstance(value, Mapping):
        return any(_has_tensor(v, tensor) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v, tensor) for v in value)
    return False
