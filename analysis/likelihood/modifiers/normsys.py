r"""``normsys``: a normalisation uncertainty, :math:`\nu_{cb} \to f(\alpha)\,\nu_{cb}`.

Constrained by :math:`\mathrm{Gaus}(0 \mid \alpha, 1)`; init 0, bounds [-5, 5]. The factor
interpolates between ``lo`` (:math:`\kappa^-`, at :math:`\alpha = -1`) and ``hi``
(:math:`\kappa^+`, at :math:`\alpha = +1`):

* ``code1`` (default when the model's settings name no code for normsys):
  :math:`f = (\kappa^+)^{\alpha}` for :math:`\alpha > 0`, :math:`(\kappa^-)^{-\alpha}` otherwise;
* ``code4`` (pyhf's and cabinetry's model default): the same outside :math:`|\alpha| < 1`,
  inside a 6th-order polynomial :math:`1 + \sum_{i=1}^{6} a_i \alpha^i` matching value, first
  and second derivative at :math:`\pm 1` (see :mod:`analysis.likelihood.interpolation`).

The same name on several samples (or channels, with different ``hi``/``lo``) shares one
:math:`\alpha`. ``hi``/``lo`` may be tensors; gradients reach them. Each (name, sample block) is
one *unit*: ``values(x)`` returns the units' factors, ``(n_units, batch)`` for parameters ``x``
of shape ``(n_pars, batch)``; ``apply(x)`` the product of all normsys factors on each cell,
``(n_cells, batch)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from analysis.likelihood import interpolation
from analysis.likelihood.modifiers.base import Block, Factor, alpha_requirements
from analysis.likelihood.parameters import Requirement


class NormSys(Factor):
    type = "normsys"
    per_block = True
    interpcodes = ("code1", "code4")

    def __init__(self, layout, interpcode=None) -> None:
        super().__init__(layout, interpcode)
        self._uses: list[tuple[str, Block, torch.Tensor, torch.Tensor]] = []

    def add(self, name: str, data: Any, block: Block, path: str) -> None:
        self._names.setdefault(name)
        self._uses.append((name, block, self._tensor(data["lo"]), self._tensor(data["hi"])))

    def requirements(self) -> dict[str, Requirement]:
        return alpha_requirements(self._names)

    def finalize(self, par_slices: Mapping[str, slice], npars: int) -> None:
        # one unit per (name, block): its factor is the same for all the block's bins
        self.n_units = len(self._uses)
        self.entries = [(block, unit) for unit, (_, block, _, _) in enumerate(self._uses)]
        self.unit_parameters = torch.tensor(
            [par_slices[name].start for name, _, _, _ in self._uses],
            dtype=torch.long,
            device=self.layout.device,
        )
        lo = torch.stack([lo.reshape(()) for _, _, lo, _ in self._uses])
        hi = torch.stack([hi.reshape(()) for _, _, _, hi in self._uses])
        self._lo, self._hi = lo[:, None], hi[:, None]  # (U, 1), broadcast over the batch
        if self.interpcode == "code4":
            coefficients = interpolation.code4_coefficients(lo, hi)
            self._coefficients = [torch.ones_like(self._lo)] + [c[:, None] for c in coefficients]

    def factor(self, alpha: torch.Tensor) -> torch.Tensor:
        if self.interpcode == "code4":
            return interpolation.code4_factor(alpha, self._lo, self._hi, self._coefficients)
        return interpolation.code1_factor(alpha, self._lo, self._hi)

    def factor_derivatives(
        self, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`factor` and its first and second derivatives in ``alpha``, detached."""
        lo, hi = self._lo.detach(), self._hi.detach()
        if self.interpcode == "code4":
            coefficients = [c.detach() for c in self._coefficients]
            f = interpolation.code4_factor(alpha, lo, hi, coefficients)
            return f, *interpolation.code4_factor_derivatives(alpha, lo, hi, coefficients, f)
        f = interpolation.code1_factor(alpha, lo, hi)
        return f, *interpolation.code1_factor_derivatives(alpha, lo, hi, f)
