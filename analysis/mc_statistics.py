r"""Monte Carlo statistics of the prediction: effective events per bin and the guard on them.

A prediction histogram filled from weighted simulated events ``w_i`` carries the statistical
uncertainty of the simulation, ``sqrt(sum w_i^2)`` per bin. Its *effective number of events*
is the number of unit-weight events with the same relative uncertainty:

.. math:: n_\mathrm{eff} = \frac{(\sum_i w_i)^2}{\sum_i w_i^2}

(Kish's effective sample size; CMS Combine's ``autoMCStats`` threshold is on this quantity).
A bin with ``n_eff = 0`` holds no simulated event (or events whose weights cancel): its yield
is not "no background", it is "unknown background". Gradient optimizers find such holes
faster than people do: raising a cut until the background simulation of some bins runs out
while signal remains makes the bins look background-free, and the expected significance grows
without bound.

**What the field does** (and what diffana takes from it):

- *Barlow-Beeston-lite* (R. Barlow, C. Beeston, Comput. Phys. Commun. 77 (1993) 219;
  J. Conway, arXiv:1103.0354): one Gaussian-constrained factor per bin, relative width
  ``sqrt(sum_s sum w^2) / sum_s sum w``, acting on all samples of the bin: pyhf's and
  HistFactory's ``staterror``, which cabinetry builds from ``sum w^2``. diffana builds exactly
  cabinetry's ``staterror`` (:mod:`analysis.workspace`). It describes *thin* bins, but in the
  multiplicative HistFactory form it cannot add events to a bin whose background is empty.
- *CMS Combine* ``autoMCStats threshold``: bins with ``n_eff`` below the threshold get one
  Poisson-constrained parameter per process (full Barlow-Beeston); a process with no events in
  a bin gets the 68% Poisson upper limit for zero events (1.84) times its average weight as
  uncertainty. Combine's per-bin parameter is additive, so that uncertainty matters even
  at zero yield.
- *HistFactory* ``StatErrorConfig RelErrorThreshold`` (bins below a relative error get no
  parameter) and TRExFitter's ``GuessMCStatEmptyBins`` (an uncertainty guessed for empty bins)
  act on the workspace, not on the choice of cuts.
- *Differentiable binning* (gato-hep, arXiv:2601.07756): penalties during optimization that
  keep at least 10 background events and at most 20% relative MC uncertainty per bin.

**diffana's choice.** The likelihood stays cabinetry's (``staterror`` from ``sum w^2``), so a
workspace at a well-populated point is cabinetry's number for number. What the optimizer may
do is bounded by a **guard**: every bin of every region must keep a total background (all
prediction samples not scaled by the POI, summed) with ``n_eff >= N_min``
(``Optimization.MinEffectiveEvents``, default 10: a relative MC uncertainty of at most
``1/sqrt(10) = 32%``; 25 would be gato-hep's 20%; 0 switches the guard off). It enters every
objective alike, relaxed and hard:

- relaxed (during optimization): the figure of merit ``F > 0`` is discounted by the smooth
  factor (:func:`guard_factor`, computed from the relaxed histograms, so it has a gradient)

  .. math:: g = \prod_{r,b} \min\left(1, \frac{n_{\mathrm{eff},rb}}{N_\mathrm{min}}\right)^2
            \in [0, 1],

  ``F g`` for an objective to maximize and ``F / max(g, 1e-12)`` for one to minimize. ``g = 1``
  (no effect, no gradient) while every bin satisfies the guard; a bin whose background runs
  out drives ``g`` towards 0, however large the signal there. The relaxed ``n_eff`` is that of
  the *expected hard selection* in the ordinary bins: with ``s_i`` the soft-cut weight of event
  ``i`` read as its probability to pass, ``(sum w s)^2 / sum w^2 s``
  (:meth:`analysis.pipeline.AnalysisPipeline.selected_counts`), which is the hard ``n_eff``
  at ``tau = 0``. Not the KDE histograms, whose smoothing fills the holes that the hard
  histograms have, and not ``(sum w s)^2 / sum (w s)^2``, which does not depend on the scale
  of the weights and so counts a barely passing event as a whole one;
- hard (boolean cuts, ordinary histograms): a point with any bin below the guard is never
  reported as the best point; it is named (region, bin, ``n_eff``) in ``result.json`` and a
  warning (:func:`below_guard`).

A bin whose background prediction is empty or negative gets a floor in the workspace
(:mod:`analysis.workspace`, "Yield floor"): a pad of about ``1e-6`` of the region's total with a
100% uncertainty, so the likelihood stays finite at ``mu = 0``; no bin is background-free, but
the pad is no estimate of the missing background either, which is why the guard exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from analysis.config import Config, Region, Sample
from analysis.histograms import Histogram
from analysis.io import TemplateKey

__all__ = [
    "background_effective_events",
    "background_samples",
    "background_templates",
    "below_guard",
    "describe",
    "effective_events",
    "effective_events_table",
    "guard_factor",
    "guard_warning",
    "guarded",
    "summary",
]

GUARD_FLOOR = 1e-12
"""Smallest guard factor an objective to minimize is divided by (finite loss at ``g = 0``)."""


def effective_events(yields: torch.Tensor, sumw2: torch.Tensor) -> torch.Tensor:
    """``n_eff = (sum w)^2 / sum w^2`` per bin; 0 where ``sum w <= 0`` or ``sum w^2 <= 0``
    (no events, or weights that cancel). Differentiable where it is positive."""
    populated = (yields > 0) & (sumw2 > 0)
    safe = torch.where(populated, sumw2, torch.ones_like(sumw2))
    return torch.where(populated, yields * yields / safe, torch.zeros_like(yields))


def background_samples(config: Config, region: Region) -> tuple[Sample, ...]:
    """The prediction samples of ``region`` that the POI does not scale (all of them when the
    configuration has no POI): the background whose simulation the guard watches."""
    poi = config.general.poi
    return tuple(
        sample
        for sample in config.samples_in(region)
        if not any(nf.name == poi for nf in config.norm_factors_for(region, sample))
    )


def background_templates(config: Config) -> list[TemplateKey]:
    """The nominal templates of the background samples of every region (the events whose
    effective number the guard watches)."""
    return [
        (region.name, sample.name, "nominal")
        for region in config.regions
        for sample in background_samples(config, region)
    ]


def _background(
    config: Config, region: Region, histograms: Mapping[TemplateKey, Histogram]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Summed nominal ``(yields, sumw2)`` of the region's background samples, or ``None``."""
    hists = [
        histograms[(region.name, s.name, "nominal")] for s in background_samples(config, region)
    ]
    if not hists:
        return None
    return sum(h.yields for h in hists), sum(h.variances for h in hists)  # type: ignore[return-value]


def background_effective_events(
    config: Config, histograms: Mapping[TemplateKey, Histogram]
) -> dict[str, torch.Tensor]:
    """Region name -> ``n_eff`` per bin of the region's total background (nominal templates of
    :func:`background_samples` summed, then :func:`effective_events`); regions without a
    background sample are left out. Differentiable in the histograms."""
    out = {}
    for region in config.regions:
        total = _background(config, region, histograms)
        if total is not None:
            out[region.name] = effective_events(*total)
    return out


def guard_factor(n_eff: Mapping[str, torch.Tensor], minimum: float) -> torch.Tensor | None:
    """``g = prod_{r,b} min(1, n_eff_rb / minimum)^2`` (module docstring), a scalar tensor;
    ``None`` when the guard is off (``minimum <= 0``) or there is nothing to guard."""
    if minimum <= 0 or not n_eff:
        return None
    factors = [torch.clamp(n / minimum, max=1.0).square().prod() for n in n_eff.values()]
    return torch.stack(factors).prod()


def guarded(value: torch.Tensor, factor: torch.Tensor | None, maximize: bool) -> torch.Tensor:
    """The objective ``value`` discounted by the guard ``factor`` (module docstring): ``value *
    g`` when larger is better, ``value / max(g, 1e-12)`` otherwise; ``value`` itself without a
    guard."""
    if factor is None:
        return value
    return value * factor if maximize else value / torch.clamp(factor, min=GUARD_FLOOR)


def below_guard(
    config: Config, n_eff: Mapping[str, torch.Tensor], minimum: float
) -> list[dict[str, Any]]:
    """Every bin whose background ``n_eff`` is below ``minimum``: ``{"region", "bin" (0-based),
    "low", "high" (its edges), "n_eff"}``, in region and bin order; empty when ``minimum <= 0``."""
    if minimum <= 0:
        return []
    out = []
    for region in config.regions:
        if region.name not in n_eff:
            continue
        values = n_eff[region.name].detach().cpu().tolist()
        for b, value in enumerate(values):
            if value < minimum:
                out.append(
                    {
                        "region": region.name,
                        "bin": b,
                        "low": float(region.binning[b]),
                        "high": float(region.binning[b + 1]),
                        "n_eff": value,
                    }
                )
    return out


def effective_events_table(
    config: Config, histograms: Mapping[TemplateKey, Histogram]
) -> dict[str, dict[str, list[float]]]:
    """Region -> ``{background sample: n_eff per bin, ..., "background": n_eff per bin of their
    sum}`` as plain floats, for ``result.json``, the cutflow and the report."""
    out: dict[str, dict[str, list[float]]] = {}
    for region in config.regions:
        samples = background_samples(config, region)
        if not samples:
            continue
        row = {}
        for sample in samples:
            hist = histograms[(region.name, sample.name, "nominal")]
            row[sample.name] = _floats(effective_events(hist.yields, hist.variances))
        total = _background(config, region, histograms)
        assert total is not None
        row["background"] = _floats(effective_events(*total))
        out[region.name] = row
    return out


def summary(
    config: Config, histograms: Mapping[TemplateKey, Histogram], minimum: float
) -> dict[str, Any]:
    """The MC-statistics record of one point: ``{"min_effective_events": minimum,
    "effective_events": effective_events_table, "below_guard": below_guard}``."""
    n_eff = background_effective_events(config, histograms)
    return {
        "min_effective_events": minimum,
        "effective_events": effective_events_table(config, histograms),
        "below_guard": below_guard(config, n_eff, minimum),
    }


def describe(bins: Sequence[Mapping[str, Any]], limit: int | None = None) -> str:
    """``region bin [low, high): n_eff = x; ...`` for every bin (the first ``limit``), for a
    warning."""
    limit = len(bins) if limit is None else limit
    parts = [
        f"{b['region']} bin {b['bin']} [{b['low']:g}, {b['high']:g}): n_eff = {b['n_eff']:.3g}"
        for b in bins[:limit]
    ]
    more = len(bins) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def guard_warning(minimum: float, where: str, bins: Sequence[Mapping[str, Any]]) -> str:
    """The warning for ``bins`` (:func:`below_guard`) at the cuts ``where``: one line naming
    every bin."""
    return (
        f"background MC below {minimum:g} effective events per bin "
        f"(Optimization.MinEffectiveEvents) at the {where}: {describe(bins)}"
    )


def _floats(values: torch.Tensor) -> list[float]:
    return [float(x) if math.isfinite(float(x)) else 0.0 for x in values.detach().cpu().tolist()]
