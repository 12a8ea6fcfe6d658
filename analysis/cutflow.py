"""The hard cut flow of an analysis: events and yields after each cut, per region and sample.

A cut flow lists, for every region and every sample, what survives the selection step by step,
with boolean cuts applied cumulatively in config order. The steps are

- ``preselection``: all events read for the template; the Filter (a sample's Filter replaces
  the region's) is applied when reading, see :mod:`analysis.io`;
- one step per cut, named by the cut (``Name`` in the config): the previous step and this cut,
  ``x > c`` or ``x < c`` (strict), evaluated by :func:`analysis.histograms.hard_cut_mask`;
- ``in histogram range``: the last cut and ``e_0 <= y < e_B`` for the region's observable ``y``
  and bin edges ``e`` (half-open bins, no flow), counted by
  :func:`analysis.histograms.hard_histogram` itself.

The last step is what the histograms, and so the workspace and every fit, see: its weighted
yield is the sum of the bins of :func:`analysis.histograms.hard_histograms`. It is a step of its
own because events outside the binning pass every cut yet never enter the likelihood; keeping it
separate shows how much of a sample the range removes.

For each step and sample the cut flow holds the number of Monte Carlo events (unweighted count),
the weighted yield ``sum_i w_i`` and its statistical uncertainty ``sqrt(sum_i w_i^2)``. Sums are
accumulated in float64. Only nominal templates are used (no systematic variations). The data
sample is included (weight 1 per event, so its yield is its event count) unless
``include_data=False``.

:func:`cut_comparison` and :func:`cut_flow_table` turn starting and optimized cuts into rows for
the report (:mod:`analysis.report`).

:func:`mc_statistics_summary` looks at the bins of the last step: the effective number of
background Monte Carlo events per bin, ``n_eff = (sum w)^2 / sum w^2``, of each background sample
and of their sum, and the bins below the guard ``Optimization.MinEffectiveEvents``
(:mod:`analysis.mc_statistics`). A bin whose background simulation has run out is not free of
background; this is where a cut flow shows it.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from analysis import mc_statistics
from analysis.config import Config, Cut, Region, load_cuts
from analysis.histograms import hard_cut_mask, hard_histogram, hard_histograms
from analysis.io import Events, TemplateKey, read_events, template_key

__all__ = [
    "IN_RANGE_STEP",
    "PRESELECTION_STEP",
    "TOTAL_PREDICTION",
    "CutFlow",
    "cut_comparison",
    "cut_flow",
    "cut_flow_sums",
    "cut_flow_table",
    "format_yield",
    "mc_statistics_summary",
]

PRESELECTION_STEP = "preselection"
"""Name of the first step: all events after the Filter."""

IN_RANGE_STEP = "in histogram range"
"""Name of the last step: events passing every cut with the observable inside the binning."""

TOTAL_PREDICTION = "Total prediction"
"""Column of :func:`cut_flow_table` with the sum over the prediction (non-data) samples."""

CutValues = Mapping[str, float] | str | os.PathLike[str]

StepSums = tuple[list[float], list[float], list[float]]
"""Per step of a sample's cut flow: the event count, ``sum w`` and ``sum w^2`` (additive over
disjoint sets of events, e.g. the partitions of :mod:`analysis.dask_histograms`)."""


@dataclass(frozen=True)
class CutFlow:
    """The cut flow of one region: per sample, what is left after each step.

    Attributes:
        region: the region's name.
        steps: step names: ``"preselection"``, the cut names in config order, then
            ``"in histogram range"``.
        selections: what each step requires, for humans (``"mu1_pt > 30"``,
            ``"120 <= mass < 180"``); the preselection shows the region's Filter.
        samples: the prediction samples in config order, then the data sample (if included).
        data: the name of the data sample among ``samples``, or None.
        events: sample -> number of Monte Carlo events after each step (unweighted).
        yields: sample -> weighted yield ``sum w`` after each step.
        uncertainties: sample -> statistical uncertainty ``sqrt(sum w^2)`` after each step.
    """

    region: str
    steps: tuple[str, ...]
    selections: tuple[str, ...]
    samples: tuple[str, ...]
    data: str | None
    events: Mapping[str, tuple[int, ...]]
    yields: Mapping[str, tuple[float, ...]]
    uncertainties: Mapping[str, tuple[float, ...]]

    @property
    def predictions(self) -> tuple[str, ...]:
        """The prediction (Monte Carlo) samples, without the data."""
        return tuple(s for s in self.samples if s != self.data)

    def total_prediction(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Summed yield of the prediction samples per step and its uncertainty (in quadrature)."""
        yields, uncertainties = [], []
        for i in range(len(self.steps)):
            yields.append(math.fsum(self.yields[s][i] for s in self.predictions))
            sumw2 = math.fsum(self.uncertainties[s][i] ** 2 for s in self.predictions)
            uncertainties.append(math.sqrt(sumw2))
        return tuple(yields), tuple(uncertainties)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of every field."""
        return {
            "region": self.region,
            "steps": list(self.steps),
            "selections": list(self.selections),
            "samples": list(self.samples),
            "data": self.data,
            "events": {s: list(self.events[s]) for s in self.samples},
            "yields": {s: list(self.yields[s]) for s in self.samples},
            "uncertainties": {s: list(self.uncertainties[s]) for s in self.samples},
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> CutFlow:
        """The inverse of :meth:`to_dict` (one region of a ``diffana cutflow`` JSON file)."""
        samples = tuple(payload["samples"])
        return cls(
            region=payload["region"],
            steps=tuple(payload["steps"]),
            selections=tuple(payload["selections"]),
            samples=samples,
            data=payload["data"],
            events={s: tuple(int(n) for n in payload["events"][s]) for s in samples},
            yields={s: tuple(float(x) for x in payload["yields"][s]) for s in samples},
            uncertainties={
                s: tuple(float(x) for x in payload["uncertainties"][s]) for s in samples
            },
        )


def cut_flow(
    config: Config,
    events: Mapping[TemplateKey, Events] | None = None,
    cuts: CutValues | None = None,
    *,
    include_data: bool = True,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    sums: Mapping[TemplateKey, StepSums] | None = None,
) -> dict[str, CutFlow]:
    """The hard cut flow of every region of ``config`` (see the module docstring for the steps).

    Args:
        config: the analysis.
        events: events from :func:`analysis.io.read_events` for this configuration (any cut
            values: the columns do not depend on them); only the nominal templates are used.
            Read (nominal templates only) when not given.
        cuts: cut name -> value replacing the configured thresholds (the content of a
            ``cuts.json``), or the path of such a file; unknown names and values outside a
            cut's Bounds raise :class:`~analysis.errors.ConfigError`.
        include_data: include the data sample (weights 1).
        device, cache_dir: passed to :func:`analysis.io.read_events` when reading.
        sums: the :func:`cut_flow_sums` of the events at these cuts, instead of ``events``
            (summed over partitions by :mod:`analysis.dask_histograms`).

    Returns:
        region name -> :class:`CutFlow`, in config order.

    Raises:
        KeyError: ``events`` lacks a nominal template that a region needs.
    """
    config = _apply_cuts(config, cuts)
    if sums is None and events is None:
        templates = [t for t in config.templates() if t.variation == "nominal"]
        if not include_data:
            templates = [t for t in templates if not t.sample.data]
        events = read_events(config, templates, device=device, cache_dir=cache_dir)
    if sums is None:
        sums = cut_flow_sums(config, events or {})
    flows = {}
    for region in config.regions:
        samples = config.samples_in(region)
        if include_data:
            samples += config.samples_in(region, data=True)
        counts, yields, uncertainties = {}, {}, {}
        for sample in samples:
            key = (region.name, sample.name, "nominal")
            if key not in sums:
                raise KeyError(
                    f"no events for {key}; cut_flow needs the nominal template of sample "
                    f"'{sample.name}' in region '{region.name}'"
                )
            n, sumw, sumw2 = sums[key]
            counts[sample.name] = tuple(int(round(x)) for x in n)
            yields[sample.name] = tuple(sumw)
            uncertainties[sample.name] = tuple(math.sqrt(max(x, 0.0)) for x in sumw2)
        data = [s.name for s in samples if s.data]
        flows[region.name] = CutFlow(
            region=region.name,
            steps=(PRESELECTION_STEP, *(cut.name for cut in region.cuts), IN_RANGE_STEP),
            selections=_selections(region),
            samples=tuple(s.name for s in samples),
            data=data[0] if data else None,
            events=counts,
            yields=yields,
            uncertainties=uncertainties,
        )
    return flows


def cut_flow_sums(
    config: Config, events: Mapping[TemplateKey, Events]
) -> dict[TemplateKey, StepSums]:
    """:data:`StepSums` of every nominal template of ``events`` that a region's cut flow shows
    (its prediction and data samples), at the cuts of ``config``."""
    out = {}
    for region in config.regions:
        for sample in config.samples_in(region) + config.samples_in(region, data=True):
            key = (region.name, sample.name, "nominal")
            if key in events:
                out[key] = _sample_flow(events[key], region)
    return out


def cut_comparison(config: Config, cuts: CutValues) -> list[dict[str, Any]]:
    """One row per cut: the configured (starting) threshold beside the optimized one.

    ``cuts`` is a cut name -> value mapping (``cuts.json``) or the path of such a file; a cut
    it does not name keeps its starting value. Rows have the keys ``name``, ``region``,
    ``variable``, ``direction``, ``start``, ``optimized``, ``bounds`` (``[low, high]``) and
    ``trainable``, in config order.
    """
    optimized = {cut.name: cut.value for cut in _apply_cuts(config, cuts).cuts}
    return [
        {
            "name": cut.name,
            "region": region.name,
            "variable": cut.variable,
            "direction": cut.direction,
            "start": cut.value,
            "optimized": optimized[cut.name],
            "bounds": list(cut.bounds),
            "trainable": cut.trainable,
        }
        for region in config.regions
        for cut in region.cuts
    ]


def cut_flow_table(
    start: CutFlow, optimized: CutFlow | None = None, *, weighted: bool = True
) -> list[dict[str, Any]]:
    """Rows of a cut-flow table for the report: one per step, one column per sample.

    Cells are ``"yield ± uncertainty"`` strings (the uncertainty to two significant digits and
    the yield to the same decimal place) or, with ``weighted=False``, Monte Carlo event counts.
    Columns: ``step``, ``selection``, each prediction sample, ``Total prediction``, the data
    sample (its event count). With ``optimized`` (the same region and steps, cuts at other
    values) every column but ``step`` comes twice, the second labelled ``"... (optimized)"``.

    Raises:
        ValueError: ``optimized`` is for another region or has other steps.
    """
    flows = [("", start)]
    if optimized is not None:
        _check_comparable(start, optimized)
        flows.append((" (optimized)", optimized))
    rows = []
    for i, step in enumerate(start.steps):
        row: dict[str, Any] = {"step": step}
        for suffix, flow in flows:
            row[f"selection{suffix}"] = flow.selections[i]
        columns = list(start.predictions) + [TOTAL_PREDICTION]
        columns += [start.data] if start.data is not None else []
        for column in columns:
            for suffix, flow in flows:
                row[f"{column}{suffix}"] = _cell(flow, column, i, weighted)
        rows.append(row)
    return rows


def mc_statistics_summary(
    config: Config,
    events: Mapping[TemplateKey, Events] | None = None,
    cuts: CutValues | None = None,
    *,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The Monte Carlo statistics of the background at the last step of the cut flow.

    The last step (``in histogram range``) is what the histograms hold; per region and bin of
    its binning this gives the effective number of MC events ``n_eff = (sum w)^2 / sum w^2`` of
    each background sample (the prediction samples the POI does not scale) and of their sum,
    and the bins whose summed background is below the guard ``Optimization.MinEffectiveEvents``
    of ``config`` (:func:`analysis.mc_statistics.summary`)::

        {"min_effective_events": 10.0,
         "effective_events": {region: {sample: [n_eff per bin], ..., "background": [...]}},
         "below_guard": [{"region", "bin", "low", "high", "n_eff"}, ...]}

    Args:
        config, events, cuts, device, cache_dir: as for :func:`cut_flow`; only the nominal
            templates of the background samples are used (and read, when ``events`` is not
            given).

    Raises:
        KeyError: ``events`` lacks the nominal template of a background sample.
    """
    config = _apply_cuts(config, cuts)
    keys = mc_statistics.background_templates(config)
    if events is None:
        templates = [t for t in config.templates() if template_key(t) in keys]
        events = read_events(config, templates, device=device, cache_dir=cache_dir)
    missing = [key for key in keys if key not in events]
    if missing:
        raise KeyError(
            f"no events for {missing[0]}; mc_statistics_summary needs the nominal templates of "
            "the background samples"
        )
    histograms = hard_histograms(config, {key: events[key] for key in keys})
    return mc_statistics.summary(config, histograms, config.optimization.min_effective_events)


# ----------------------------------------------------------------------------- helpers
def _apply_cuts(config: Config, cuts: CutValues | None) -> Config:
    if cuts is None:
        return config
    if isinstance(cuts, (str, os.PathLike)):
        return load_cuts(pathlib.Path(cuts), config)
    return config.with_cut_values(cuts)


def _sample_flow(events: Events, region: Region) -> tuple[list[float], list[float], list[float]]:
    """Event count, ``sum w`` and ``sum w^2`` after each step (one host transfer)."""
    weight = events.weight.to(torch.float64)
    ones = torch.ones_like(weight)
    mask = torch.ones_like(events.weight, dtype=torch.bool)
    sums = [_masked_sums(mask, weight)]
    for cut in region.cuts:
        mask = mask & hard_cut_mask(events, (cut,))
        sums.append(_masked_sums(mask, weight))
    # the last step is exactly what hard_histogram counts: reuse it (same edge convention)
    edges = torch.tensor(region.binning, dtype=weight.dtype, device=weight.device)
    observable = events.observable[mask].to(torch.float64)
    histogram = hard_histogram(observable, weight[mask], edges)
    count = hard_histogram(observable, ones[mask], edges)
    sums.append(
        torch.stack([count.yields.sum(), histogram.yields.sum(), histogram.variances.sum()])
    )
    n, sumw, sumw2 = torch.stack(sums).T.tolist()
    return n, sumw, sumw2


def _masked_sums(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    selected = weight[mask]
    return torch.stack([mask.sum().to(torch.float64), selected.sum(), (selected * selected).sum()])


def _selections(region: Region) -> tuple[str, ...]:
    low, high = region.binning[0], region.binning[-1]
    return (
        f"Filter: {region.filter}" if region.filter else "no Filter",
        *(_describe_cut(cut) for cut in region.cuts),
        f"{low:g} <= {region.variable} < {high:g}",
    )


def _describe_cut(cut: Cut) -> str:
    return f"{cut.variable} {cut.direction} {cut.value:.6g}"


def _check_comparable(start: CutFlow, optimized: CutFlow) -> None:
    if optimized.region != start.region or optimized.steps != start.steps:
        raise ValueError(
            f"cannot compare cut flows of region '{start.region}' (steps {list(start.steps)}) "
            f"and region '{optimized.region}' (steps {list(optimized.steps)})"
        )
    if optimized.samples != start.samples:
        raise ValueError(
            f"cannot compare cut flows with samples {list(start.samples)} and "
            f"{list(optimized.samples)}"
        )


def _cell(flow: CutFlow, column: str, step: int, weighted: bool) -> str | int:
    if column == TOTAL_PREDICTION:
        if not weighted:
            return sum(flow.events[s][step] for s in flow.predictions)
        yields, uncertainties = flow.total_prediction()
        return format_yield(yields[step], uncertainties[step])
    if column == flow.data or not weighted:
        return flow.events[column][step]
    return format_yield(flow.yields[column][step], flow.uncertainties[column][step])


def format_yield(value: float, uncertainty: float) -> str:
    """``"value ± uncertainty"``, the uncertainty to two significant digits, the value alike.

    >>> format_yield(1234.567, 12.34)
    '1235 ± 12'
    >>> format_yield(11.9012, 0.4321)
    '11.90 ± 0.43'
    """
    if not (math.isfinite(value) and math.isfinite(uncertainty)):
        return f"{value} ± {uncertainty}"
    reference = uncertainty if uncertainty > 0 else abs(value)
    if reference == 0:
        return "0 ± 0"
    decimals = min(max(1 - math.floor(math.log10(reference)), 0), 8)
    return f"{value:.{decimals}f} ± {uncertainty:.{decimals}f}"
