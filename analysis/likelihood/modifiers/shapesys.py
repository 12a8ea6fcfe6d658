r"""``shapesys``: uncorrelated per-bin uncertainty with a Poisson (Barlow-Beeston) constraint.

:math:`\nu_{cb} \to \gamma_b\,\nu_{cb}` for the one sample that carries the modifier (a name may
not be reused, as in pyhf). With nominal :math:`\nu_b` and absolute uncertainty
:math:`\delta_b` (the modifier's ``data``), the auxiliary measurement is
:math:`\tau_b = (\nu_b/\delta_b)^2` and the constraint
:math:`\mathrm{Pois}(\tau_b \mid \gamma_b\,\tau_b)` (continuous), which gives
:math:`\gamma_b` a relative width :math:`\delta_b/\nu_b`. Bins with :math:`\nu_b \le 0` or
:math:`\delta_b \le 0` get :math:`\tau_b = 1` and a fixed parameter. :math:`\tau` (auxdata and
rate factor) is differentiable in the yields and uncertainties. ``apply(x)`` (parameters
``(n_pars, batch)``) returns the :math:`\gamma` factor per cell, shape ``(n_cells, batch)``.
"""

from __future__ import annotations

from typing import Any

import torch

from analysis.errors import ConfigError
from analysis.likelihood.modifiers.base import Block, ParameterFactor
from analysis.likelihood.parameters import Requirement


class ShapeSys(ParameterFactor):
    type = "shapesys"
    shared = False

    def __init__(self, layout, interpcode=None) -> None:
        super().__init__(layout, interpcode)
        self._reqs: dict[str, Requirement] = {}

    def add(self, name: str, data: Any, block: Block, path: str) -> None:
        if name in self._reqs:
            raise ConfigError(
                f"{self.layout.source}: {path}: shapesys '{name}' is used on more than one "
                "sample; shapesys names must be unique"
            )
        uncertainty = self._tensor(data)
        self._check_length(uncertainty, block, path, f"shapesys '{name}' data")
        nominal = block.nominal
        valid = (nominal.detach() > 0) & (uncertainty.detach() > 0)
        one = torch.ones_like(nominal)
        safe_unc = torch.where(valid, uncertainty, one)
        tau = torch.where(valid, nominal**2 / safe_unc**2, one)
        n = block.nbins
        self._reqs[name] = Requirement(
            n=n,
            is_scalar=False,
            constraint="poisson",
            inits=(1.0,) * n,
            bounds=((1e-10, 10.0),) * n,
            fixed=tuple((~valid).tolist()),
            auxdata=tau,
            factors=tau,
            unused=frozenset({"sigmas"}),
        )
        super().add(name, data, block, path)

    def requirements(self) -> dict[str, Requirement]:
        return dict(self._reqs)

    def _units(self, name: str, block: Block, start: int) -> list[int]:
        return [start + j for j in range(block.nbins)]
