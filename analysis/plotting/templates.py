"""Systematic variations: a sample's nominal template against its up and down variations.

After cabinetry's ``visualize.templates``: per (region, sample, systematic) the nominal
histogram with its statistical uncertainty and the varied histograms as read (tree- or
weight-based, before the NormPlusShape split into normalisation and shape), with a ratio panel
variation / nominal. A side given as ``Symmetrize`` has no histogram of its own: it is drawn as
the mirror of the other side, ``2 n - v`` (what the workspace uses, up to the normalisation).
Inputs are the histograms ``diffana histograms`` writes (region -> sample -> variation ->
``{edges, yields, sumw2}``) or :class:`analysis.histograms.Histogram` records in that nesting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import mplhep
import numpy as np
from matplotlib.figure import Figure

from analysis.plotting._results import array, field
from analysis.plotting.labels import (
    ExperimentLabel,
    draw_experiment_label,
    events_label,
    region_axes,
)
from analysis.plotting.style import corner_text, minor_ticks, ratio_figure, styled

if TYPE_CHECKING:
    from analysis.config import Config

NOMINAL_COLOR = "black"
UP_COLOR = "#e42536"
DOWN_COLOR = "#5790fc"
STAT_LABEL = "nominal MC stat. unc."
NOMINAL_LABEL = "nominal"


def _relative_change(varied: np.ndarray, nominal: np.ndarray) -> str:
    total = float(np.sum(nominal))
    return f"{100 * (float(np.sum(varied)) / total - 1):+.1f}%" if total else "n/a"


def variation_label(side: str, varied: np.ndarray, nominal: np.ndarray, mirrored: bool) -> str:
    """The legend entry of a variation: ``"up: +5.2% yield"``, ``"down (symmetrized): -5.2%
    yield"``."""
    name = f"{side} (symmetrized)" if mirrored else side
    return f"{name}: {_relative_change(varied, nominal)} yield"


@styled
def systematic_templates(
    nominal: Any,
    up: Any = None,
    down: Any = None,
    *,
    observable: str = "observable",
    text: str | None = None,
    unit: str | None = None,
    experiment: ExperimentLabel | None = None,
) -> Figure:
    """Nominal template with its ``sqrt(sum w^2)`` band, and the up and down variations.

    Drawn (top): nominal as a black step line with a grey band ``n +- sqrt(sum w^2)`` (the MC
    statistical uncertainty of the nominal), up (red) and down (blue) as step lines labelled
    with their change of the total yield (:func:`variation_label`). Bottom: variation /
    nominal and the relative statistical band, in a range symmetric about 1 that holds them
    (at least +-5%, at most 0 .. 2). A missing side (``None``) is drawn as the mirror
    ``2 n - v`` of the other (dashed, "symmetrized"). The step artists have the gids
    ``"nominal"``, ``"up"``, ``"down"`` and ``"ratio:up"``, ``"ratio:down"``. The y axis says
    what a bin holds ("Events / 3 GeV", :func:`analysis.plotting.labels.events_label`).

    Args:
        nominal, up, down: histograms (records or dicts with ``edges``, ``yields``,
            ``sumw2``); at least one of ``up`` and ``down``.
        observable: x-axis title (with its unit).
        text: corner text (e.g. region, sample and systematic).
        unit: the observable's unit, for the bin width in the y-axis title.
        experiment: the experiment label drawn above the figure.

    Returns:
        A figure with two axes: the templates and the ratio.
    """
    if up is None and down is None:
        raise ValueError("systematic_templates needs an up or a down variation")
    edges = array(field(nominal, "edges"))
    n = array(field(nominal, "yields"))
    stat = np.sqrt(np.clip(array(field(nominal, "sumw2")), 0.0, None))
    sides = {}
    for side, hist in (("up", up), ("down", down)):
        if hist is not None:
            values = array(field(hist, "yields"))
            if values.shape != n.shape:
                raise ValueError(f"the {side} variation has {values.size} bins, nominal {n.size}")
            sides[side] = (values, False)
    for side, other in (("up", "down"), ("down", "up")):
        if side not in sides:
            sides[side] = (2 * n - sides[other][0], True)

    figure, ax, ratio_ax = ratio_figure()
    ax.stairs(n + stat, edges, baseline=n - stat, fill=True, color="0.85", label=STAT_LABEL)
    (nominal_artists,) = mplhep.histplot(
        n, edges, histtype="step", color=NOMINAL_COLOR, label=NOMINAL_LABEL, ax=ax
    )
    nominal_artists.stairs.set_gid("nominal")
    relative_stat = np.divide(stat, n, out=np.zeros_like(n), where=n != 0)
    ratio_ax.stairs(1 + relative_stat, edges, baseline=1 - relative_stat, fill=True, color="0.85")
    ratio_ax.axhline(1.0, color=NOMINAL_COLOR, linewidth=1)
    top = float(np.max(n + stat))
    reach = [relative_stat[n != 0]]
    for side, line_color in (("up", UP_COLOR), ("down", DOWN_COLOR)):
        values, mirrored = sides[side]
        style = "--" if mirrored else "-"
        label = variation_label(side, values, n, mirrored)
        ax.stairs(
            values, edges, color=line_color, linestyle=style, linewidth=2, label=label, gid=side
        )
        ratio = np.divide(values, n, out=np.full_like(n, np.nan), where=n != 0)
        ratio_ax.stairs(
            ratio, edges, color=line_color, linestyle=style, linewidth=2, gid=f"ratio:{side}"
        )
        top = max(top, float(np.max(values)))
        reach.append(np.abs(ratio[np.isfinite(ratio)] - 1.0))
    ax.set_ylim(0.0, 1.6 * top if top > 0 else 1.0)
    ax.set_ylabel(events_label(edges, unit), loc="top")
    ax.legend(loc="upper right")
    if text:
        corner_text(ax, text)
    draw_experiment_label(ax, experiment)
    ratio_ax.set_xlim(edges[0], edges[-1])
    largest = float(np.max(np.concatenate(reach))) if any(r.size for r in reach) else 0.0
    span = min(max(0.05, 1.15 * largest), 1.0)
    ratio_ax.set_ylim(1.0 - span, 1.0 + span)
    ratio_ax.set_ylabel("Var. / nominal")
    ratio_ax.set_xlabel(observable)
    for axes in (ax, ratio_ax):
        minor_ticks(axes)
    return figure


def templates(
    histograms: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    observable: str | Mapping[str, str] | None = None,
    config: Config | None = None,
) -> dict[tuple[str, str, str], Figure]:
    """:func:`systematic_templates` for every (region, sample, systematic) that has a
    ``<systematic>_Up`` or ``<systematic>_Down`` histogram: ``{(region, sample, systematic):
    Figure}``, in the order of ``histograms``. ``observable``: one x-axis label or region ->
    label; ``config``: the analysis configuration, for the axis titles and units not given
    (:func:`analysis.plotting.labels.region_axes`) and the experiment label."""
    figures = {}
    experiment = ExperimentLabel.from_config(config)
    for region, samples in histograms.items():
        label = observable.get(region) if isinstance(observable, Mapping) else observable
        _, title, unit = region_axes(config, region)
        label = label or title
        for sample, variations in samples.items():
            names = dict.fromkeys(
                v.rsplit("_", 1)[0] for v in variations if v.endswith(("_Up", "_Down"))
            )
            for syst in names:
                figures[(region, sample, syst)] = systematic_templates(
                    variations["nominal"],
                    variations.get(f"{syst}_Up"),
                    variations.get(f"{syst}_Down"),
                    observable=label or "observable",
                    text=f"{region}, {sample}\nsystematic: {syst}",
                    unit=unit,
                    experiment=experiment,
                )
    return figures
