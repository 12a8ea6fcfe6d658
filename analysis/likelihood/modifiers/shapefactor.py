r"""``shapefactor``: a free factor per bin, :math:`\nu_{cb} \to \gamma_b\,\nu_{cb}`.

Unconstrained, one parameter per bin of the first channel that uses the name (init 1, bounds
[0, 10]). Shared across channels the way pyhf shares it: bin ``j`` of every channel uses
``name[j]`` (a channel with more bins than the set has parameters is an error here; pyhf
silently reads parameter 0 there). ``apply(x)`` (parameters ``(n_pars, batch)``) returns the
product of the shapefactors on each cell, shape ``(n_cells, batch)``.
"""

from __future__ import annotations

from typing import Any

from analysis.errors import ConfigError
from analysis.likelihood.modifiers.base import Block, ParameterFactor
from analysis.likelihood.parameters import Requirement


class ShapeFactor(ParameterFactor):
    type = "shapefactor"

    def __init__(self, layout, interpcode=None) -> None:
        super().__init__(layout, interpcode)
        self._sizes: dict[str, int] = {}

    def add(self, name: str, data: Any, block: Block, path: str) -> None:
        size = self._sizes.setdefault(name, block.nbins)
        if block.nbins > size:
            raise ConfigError(
                f"{self.layout.source}: {path}: shapefactor '{name}' has {size} parameters "
                f"(from its first channel) but channel '{block.channel}' has {block.nbins} bins"
            )
        super().add(name, data, block, path)

    def requirements(self) -> dict[str, Requirement]:
        return {
            name: Requirement(
                n=self._sizes[name],
                is_scalar=False,
                constraint=None,
                inits=(1.0,) * self._sizes[name],
                bounds=((0.0, 10.0),) * self._sizes[name],
                fixed=False,
            )
            for name in self._names
        }

    def _units(self, name: str, block: Block, start: int) -> list[int]:
        return [start + j for j in range(block.nbins)]
