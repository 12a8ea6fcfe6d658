r"""``staterror``: Barlow-Beeston-lite MC statistical uncertainty, Gaussian-constrained.

:math:`\nu_{cb} \to \gamma_b\,\nu_{cb}` for every sample ``c`` that names the set, with one
:math:`\gamma_b` per bin shared by those samples (the set is usually per channel,
``staterror_<channel>``; a name used in several channels spans all their bins, in channel
order). The constraint is :math:`\mathrm{Gaus}(1 \mid \gamma_b, \sigma_b)` with the combined
relative uncertainty

.. math:: \sigma_b = \sqrt{\sum_c \delta_{cb}^2} \Big/ \sum_c \nu_{cb}

(sums over the samples with the modifier, :math:`\delta_{cb}` their ``data``). Bins with
:math:`\sigma_b = 0` (no yield or no uncertainty) get :math:`\sigma_b = 1` and a fixed
parameter, as pyhf does. ``sigma`` is differentiable in the yields and uncertainties.
``apply(x)`` (parameters ``(n_pars, batch)``) returns the :math:`\gamma` factor per cell,
shape ``(n_cells, batch)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from analysis.errors import ConfigError
from analysis.likelihood.modifiers.base import Block, ParameterFactor
from analysis.likelihood.parameters import Requirement


class StatError(ParameterFactor):
    type = "staterror"

    def __init__(self, layout, interpcode=None) -> None:
        super().__init__(layout, interpcode)
        self._data: dict[str, list[tuple[Block, torch.Tensor, str]]] = {}
        self._offsets: dict[str, dict[str, int]] = {}  # name -> channel -> first parameter
        self._cache: dict[str, Requirement] | None = None

    def add(self, name: str, data: Any, block: Block, path: str) -> None:
        uncertainty = self._tensor(data)
        self._check_length(uncertainty, block, path, f"staterror '{name}' data")
        self._data.setdefault(name, []).append((block, uncertainty, path))
        super().add(name, data, block, path)

    def requirements(self) -> dict[str, Requirement]:
        if self._cache is None:
            # pyhf registers staterror sets after all samples are seen: sorted by name
            self._cache = {name: self._requirement(name) for name in sorted(self._names)}
        return self._cache

    def _requirement(self, name: str) -> Requirement:
        uses = self._data[name]
        channels_by_sample: dict[str, set[str]] = {}
        for block, _, _ in uses:
            channels_by_sample.setdefault(block.sample, set()).add(block.channel)
        channel_sets = {frozenset(v) for v in channels_by_sample.values()}
        if len(channel_sets) > 1:
            raise ConfigError(
                f"{self.layout.source}: staterror '{name}' must act on the same channels for "
                f"every sample that uses it, got {self._describe(channels_by_sample)}"
            )
        channels = [c for c in self.layout.channel_bins if c in next(iter(channel_sets))]
        sigmas = []
        offsets: dict[str, int] = {}
        n = 0
        for channel in channels:
            in_channel = [(b, u) for b, u, _ in uses if b.channel == channel]
            total = torch.stack([b.nominal for b, _ in in_channel]).sum(0)
            positive = total > 0
            safe_total = torch.where(positive, total, torch.ones_like(total))
            rel2 = torch.stack([(u / safe_total) ** 2 for _, u in in_channel]).sum(0)
            sigmas.append(torch.where(positive, rel2, torch.zeros_like(rel2)))
            offsets[channel] = n
            n += in_channel[0][0].nbins
        rel2 = torch.cat(sigmas)
        fixed = (rel2.detach() == 0).tolist()
        zero = torch.tensor(fixed, device=rel2.device)
        one = torch.ones_like(rel2)
        # double where: no NaN gradient from sqrt at the fixed (zero) bins
        sigma = torch.where(zero, one, torch.sqrt(torch.where(zero, one, rel2)))
        self._offsets[name] = offsets
        return Requirement(
            n=n,
            is_scalar=False,
            constraint="normal",
            inits=(1.0,) * n,
            bounds=((1e-10, 10.0),) * n,
            fixed=tuple(fixed),
            auxdata=(1.0,) * n,
            sigmas=sigma,
            unused=frozenset({"factors"}),
        )

    @staticmethod
    def _describe(channels_by_sample: Mapping[str, set[str]]) -> str:
        return "; ".join(f"{s}: {', '.join(sorted(c))}" for s, c in channels_by_sample.items())

    def finalize(self, par_slices: Mapping[str, slice], npars: int) -> None:
        self.requirements()
        super().finalize(par_slices, npars)

    def _units(self, name: str, block: Block, start: int) -> list[int]:
        first = start + self._offsets[name][block.channel]
        return [first + j for j in range(block.nbins)]
