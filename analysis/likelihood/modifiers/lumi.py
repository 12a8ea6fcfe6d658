r"""``lumi``: the luminosity, :math:`\nu_{cb} \to \lambda\,\nu_{cb}`, Gaussian-constrained.

The parameter (always named ``lumi``) needs ``auxdata`` (the nominal luminosity), ``sigmas``
(its absolute uncertainty), ``inits`` and ``bounds`` from the measurement's ``parameters``, as in
pyhf; its constraint is :math:`\mathrm{Gaus}(a \mid \lambda, \sigma)`.
``apply(x)`` (parameters ``(n_pars, batch)``) returns
the luminosity factor per cell, shape ``(n_cells, batch)`` (1 for samples without ``lumi``).
"""

from __future__ import annotations

from analysis.likelihood.modifiers.base import Block, ParameterFactor
from analysis.likelihood.parameters import Requirement


class Lumi(ParameterFactor):
    per_block = True
    type = "lumi"

    def requirements(self) -> dict[str, Requirement]:
        return {
            name: Requirement(
                n=1,
                is_scalar=True,
                constraint="normal",
                inits=None,
                bounds=None,
                fixed=False,
                auxdata=None,
                sigmas=None,
                unused=frozenset({"factors"}),
            )
            for name in self._names
        }

    def _units(self, name: str, block: Block, start: int) -> int:
        return start
