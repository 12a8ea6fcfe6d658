"""Histograms of the observable: yields and sum of squared weights per bin.

Hard histograms follow boost-histogram's (and so cabinetry's) convention: bins are half-open,
``[e_b, e_{b+1})``, and events outside ``[e_0, e_B)`` are not counted (no flow bins). For bin b

    n_b = sum_i w_i 1[e_b <= y_i < e_{b+1}],      s_b = sum_i w_i^2 1[e_b <= y_i < e_{b+1}],

where ``s_b`` estimates the variance of ``n_b`` (staterror uses ``sqrt(s_b)``). Sums are
accumulated in float64 and returned in the dtype of the weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from analysis.config import Config, Cut
from analysis.io import Events, TemplateKey, read_events


@dataclass(frozen=True)
class Histogram:
    """Bin ``edges`` (B+1), ``yields`` (B) and ``sumw2`` (B, the sum of squared weights)."""

    edges: torch.Tensor
    yields: torch.Tensor
    sumw2: torch.Tensor

    @property
    def stdev(self) -> torch.Tensor:
        """Statistical uncertainty per bin, ``sqrt(sumw2)``."""
        return torch.sqrt(self.sumw2)

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "edges": self.edges.tolist(),
            "yields": self.yields.tolist(),
            "sumw2": self.sumw2.tolist(),
        }


def hard_histogram(values: torch.Tensor, weights: torch.Tensor, edges: torch.Tensor) -> Histogram:
    """Weighted histogram of ``values`` with half-open bins and no flow (see module docstring)."""
    n_bins = edges.shape[0] - 1
    index = torch.bucketize(values, edges, right=True) - 1
    inside = (index >= 0) & (index < n_bins)  # also drops NaN, which bucketizes past the end
    index, w = index[inside], weights[inside].to(torch.float64)
    yields = torch.zeros(n_bins, dtype=torch.float64, device=weights.device).index_add_(0, index, w)
    sumw2 = torch.zeros_like(yields).index_add_(0, index, w * w)
    return Histogram(edges=edges, yields=yields.to(weights.dtype), sumw2=sumw2.to(weights.dtype))


def hard_cut_mask(events: Events, cuts: tuple[Cut, ...]) -> torch.Tensor:
    """Boolean mask of events passing every cut (``x > c`` or ``x < c``, strict)."""
    mask = torch.ones_like(events.weight, dtype=torch.bool)
    for cut in cuts:
        x = events.columns[cut.variable]
        mask &= (x > cut.value) if cut.direction == ">" else (x < cut.value)
    return mask


def hard_histograms(
    config: Config,
    events: Mapping[TemplateKey, Events] | None = None,
    *,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[TemplateKey, Histogram]:
    """Histogram every template of ``config`` with boolean cuts at the configured values.

    ``events`` may be given (from :func:`analysis.io.read_events`) to avoid reading again.
    Returns ``{(region, sample, variation): Histogram}`` in float64.
    """
    if events is None:
        events = read_events(config, device=device, cache_dir=cache_dir)
    regions = {region.name: region for region in config.regions}
    out = {}
    for key, ev in events.items():
        region = regions[key[0]]
        edges = torch.tensor(region.binning, dtype=ev.weight.dtype, device=ev.weight.device)
        mask = hard_cut_mask(ev, region.cuts)
        out[key] = hard_histogram(ev.observable[mask], ev.weight[mask], edges)
    return out


def histograms_to_dict(histograms: Mapping[TemplateKey, Histogram]) -> dict:
    """``{region: {sample: {variation: {edges, yields, sumw2}}}}`` for JSON output."""
    out: dict = {}
    for (region, sample, variation), hist in histograms.items():
        out.setdefault(region, {}).setdefault(sample, {})[variation] = hist.to_dict()
    return out
