"""HistFactory modifier types, one per file, and the registry that maps type names to them.

The registry's order is pyhf's (``pyhf.modifiers.histfactory_set``, alphabetical): parameter
sets are registered type by type in this order, which fixes the model's parameter order.
"""

from __future__ import annotations

from analysis.errors import ConfigError
from analysis.likelihood.modifiers.base import Block, Layout, Modifier
from analysis.likelihood.modifiers.histosys import HistoSys
from analysis.likelihood.modifiers.lumi import Lumi
from analysis.likelihood.modifiers.normfactor import NormFactor
from analysis.likelihood.modifiers.normsys import NormSys
from analysis.likelihood.modifiers.shapefactor import ShapeFactor
from analysis.likelihood.modifiers.shapesys import ShapeSys
from analysis.likelihood.modifiers.staterror import StatError

REGISTRY: dict[str, type[Modifier]] = {
    cls.type: cls for cls in (HistoSys, Lumi, NormFactor, NormSys, ShapeFactor, ShapeSys, StatError)
}

__all__ = ["REGISTRY", "Block", "Layout", "Modifier", "get", "valid_types"]


def valid_types() -> str:
    """The registered type names, comma-separated, for error messages."""
    return ", ".join(REGISTRY)


def get(type_name: str, where: str = "") -> type[Modifier]:
    """The implementation of modifier type ``type_name``; ConfigError listing valid types."""
    try:
        return REGISTRY[type_name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}unknown modifier type '{type_name}'; valid types: {valid_types()}"
        ) from None
