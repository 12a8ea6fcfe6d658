"""HistFactory likelihood in torch with pyhf's JSON semantics (see :mod:`.model`).

``Workspace`` loads and validates pyhf workspaces (JSON, XML, patches); ``Workspace.model``
builds a :class:`Model` whose ``logpdf`` equals pyhf's and is differentiable in the parameters,
the data and any tensor in the spec.

Both names are imported on first use (a module-level ``__getattr__``), so that importing
:mod:`analysis.likelihood.workspace` to read a workspace does not import :mod:`.model` and
torch with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysis.likelihood.model import Model
    from analysis.likelihood.workspace import Workspace

__all__ = ["Model", "Workspace"]

_EXPORTS = {"Model": "analysis.likelihood.model", "Workspace": "analysis.likelihood.workspace"}
"""Exported name -> the module that defines it."""


def __getattr__(name: str) -> Any:
    """Import an exported name's module on first access (PEP 562); cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
