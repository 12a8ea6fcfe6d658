r"""``normfactor``: a free normalisation, :math:`\nu_{cb} \to \mu\,\nu_{cb}`.

One unconstrained scalar parameter per name (init 1, bounds [0, 10]), shared by every sample
that names it. ``apply(x)`` (parameters ``(n_pars, batch)``) returns the product of the
normfactors acting on each cell, ``(n_cells, batch)`` (1 where none acts).
"""

from __future__ import annotations

from analysis.likelihood.modifiers.base import Block, ParameterFactor
from analysis.likelihood.parameters import Requirement


class NormFactor(ParameterFactor):
    per_block = True
    type = "normfactor"

    def requirements(self) -> dict[str, Requirement]:
        return {
            name: Requirement(
                n=1,
                is_scalar=True,
                constraint=None,
                inits=(1.0,),
                bounds=((0.0, 10.0),),
                fixed=False,
            )
            for name in self._names
        }

    def _units(self, name: str, block: Block, start: int) -> int:
        return start
