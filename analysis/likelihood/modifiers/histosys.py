r"""``histosys``: correlated shape uncertainty, :math:`\nu_{cb} \to \nu_{cb} + \delta_{cb}(\alpha)`.

Constrained by :math:`\mathrm{Gaus}(0 \mid \alpha, 1)`; init 0, bounds [-5, 5]. With the
nominal :math:`\nu^0`, ``hi_data`` :math:`\nu^+` and ``lo_data`` :math:`\nu^-`,
:math:`\Delta^+ = \nu^+ - \nu^0`, :math:`\Delta^- = \nu^0 - \nu^-`:

* ``code0`` (default when the model's settings name no code for histosys):
  :math:`\delta = \alpha\Delta^+` for :math:`\alpha > 0`, :math:`\alpha\Delta^-` otherwise;
* ``code4p`` (pyhf's and cabinetry's model default): the same for :math:`|\alpha| > 1`, inside
  :math:`\delta = \alpha (\Delta^+ + \Delta^-)/2 + \alpha^2 (15 - 10\alpha^2 + 3\alpha^4)
  (\Delta^+ - \Delta^-)/16`.

Both are :math:`w^+(\alpha)\Delta^+ + w^-(\alpha)\Delta^-`, so the sum over all histosys
parameters is one matrix product ``[D+; D-]^T @ [w+; w-]`` with ``D`` of shape
``(n_histosys, n_cells)``; the templates and the nominal may be tensors and gradients reach
them. ``apply(x)``, for parameters ``x`` of shape ``(n_pars, batch)``, returns the summed delta
per cell, ``(n_cells, batch)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from analysis.likelihood import interpolation
from analysis.likelihood.modifiers.base import Block, Modifier, alpha_requirements
from analysis.likelihood.parameters import Requirement


class HistoSys(Modifier):
    type = "histosys"
    op = "add"
    interpcodes = ("code0", "code4p")

    def __init__(self, layout, interpcode=None) -> None:
        super().__init__(layout, interpcode)
        self._uses: list[tuple[str, Block, torch.Tensor, torch.Tensor]] = []

    def add(self, name: str, data: Any, block: Block, path: str) -> None:
        lo = self._tensor(data["lo_data"])
        hi = self._tensor(data["hi_data"])
        self._check_length(lo, block, path, f"histosys '{name}' lo_data")
        self._check_length(hi, block, path, f"histosys '{name}' hi_data")
        self._names.setdefault(name)
        self._uses.append((name, block, lo, hi))

    def requirements(self) -> dict[str, Requirement]:
        return alpha_requirements(self._names)

    def finalize(self, par_slices: Mapping[str, slice], npars: int) -> None:
        device = self.layout.device
        rows_of = {name: row for row, name in enumerate(self._names)}
        self.parameters = torch.tensor(
            [par_slices[name].start for name in self._names], dtype=torch.long, device=device
        )
        rows, cols, ups, dns = [], [], [], []
        for name, block, lo, hi in self._uses:
            cells = torch.arange(block.cells.start, block.cells.stop, device=device)
            rows.append(torch.full_like(cells, rows_of[name]))
            cols.append(cells)
            ups.append(hi - block.nominal)
            dns.append(block.nominal - lo)
        shape = (len(self._names), self.layout.ncells)
        index = (torch.cat(rows), torch.cat(cols))
        zeros = torch.zeros(shape, dtype=self.layout.dtype, device=device)
        delta_up = zeros.index_put(index, torch.cat(ups))
        delta_dn = zeros.index_put(index, torch.cat(dns))
        self.deltas = torch.cat([delta_up, delta_dn]).T.contiguous()  # (n_cells, 2 M)
        code4p = self.interpcode == "code4p"
        self.weights = interpolation.code4p_weights if code4p else interpolation.code0_weights
        self.weight_derivatives = (
            interpolation.code4p_weight_derivatives
            if code4p
            else interpolation.code0_weight_derivatives
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        alpha = x.index_select(0, self.parameters)
        return self.deltas @ self.weights(alpha).reshape(-1, alpha.shape[1])
