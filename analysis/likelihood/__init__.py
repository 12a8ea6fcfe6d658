"""HistFactory likelihood in torch with pyhf's JSON semantics (see :mod:`.model`).

``Workspace`` loads and validates pyhf workspaces (JSON, XML, patches); ``Workspace.model``
builds a :class:`Model` whose ``logpdf`` equals pyhf's and is differentiable in the parameters,
the data and any tensor in the spec.
"""

from analysis.likelihood.model import Model
from analysis.likelihood.workspace import Workspace

__all__ = ["Model", "Workspace"]
