"""Monte Carlo statistics of the background: the effective number of MC events per bin.

:func:`effective_events_per_bin` draws tables of
:func:`analysis.mc_statistics.effective_events_table` (region -> ``{background sample: [n_eff
per bin], ..., "background": [n_eff of their sum]}``) at two or more cut sets against the guard
``Optimization.MinEffectiveEvents``. From the ``result.json`` of ``diffana optimize`` /
``scan-cuts``::

    block = result["mc_statistics"]
    effective_events_per_bin(block["effective_events"], minimum=block["min_effective_events"])

and from a ``diffana cutflow`` file (``cutflow["mc_statistics"]``, one summary per cut set)::

    effective_events_per_bin(
        {name: s["effective_events"] for name, s in cutflow["mc_statistics"].items()},
        minimum=cutflow["mc_statistics"]["start"]["min_effective_events"],
    )
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from analysis.plotting.labels import region_axes
from analysis.plotting.style import DATA_COLOR, color, new_figure, sample_colours, styled

if TYPE_CHECKING:
    from analysis.config import Config

TOTAL = "background"
"""The key of a table row that holds the summed background (the quantity the guard watches)."""

TOTAL_LABEL = "total background"
GUARD_COLOR = "#008000"
"""The guard line's colour (dark green: not among the samples' colours)."""
LINE_STYLES = ("--", "-", ":", "-.")
"""Line style per cut set, in the order given: the first (initial) dashed, the second solid."""


def guard_label(minimum: float) -> str:
    """The legend entry of the guard line."""
    return f"guard: total background $n_\\mathrm{{eff}}$ = {minimum:g}"


def line_label(column: str, cut_set: str) -> str:
    """The legend entry of one line: ``"<sample>, <cut set> cuts"``."""
    return f"{TOTAL_LABEL if column == TOTAL else column}, {cut_set} cuts"


def line_gid(cut_set: str, region: str, column: str) -> str:
    """The gid of one line's artist: ``"<cut set>:<region>:<column>"`` (column ``background``
    for the sum)."""
    return f"{cut_set}:{region}:{column}"


@styled
def effective_events_per_bin(
    tables: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    *,
    minimum: float = 0.0,
    edges: Mapping[str, Sequence[float]] | None = None,
    observables: Mapping[str, str] | None = None,
    config: Config | None = None,
) -> Figure:
    r"""Effective number of background MC events per bin, ``n_eff = (sum w)^2 / sum w^2``,
    of each background sample and of their sum, at each cut set, against the guard.

    One panel per region (log y axis). Each background sample has its colour, the total
    background is black and thicker; the first cut set is dashed, the second solid (then dotted,
    dash-dotted); the guard ``minimum`` is a dark green dotted horizontal line (none when
    ``minimum <= 0``: the guard is off). Every line has its own legend entry
    (:func:`line_label`, :func:`guard_label`). A bin with ``n_eff = 0`` (no MC event, or weights
    that cancel) cannot be drawn on a log axis: its line drops out through the bottom of the
    panel, which a note says. The step artists (:class:`matplotlib.patches.StepPatch`) carry
    the gids of :func:`line_gid` and hold the table's values.

    Args:
        tables: cut set (``"initial"``, ``"best"``) -> region -> row -> ``n_eff`` per bin, as
            :func:`analysis.mc_statistics.effective_events_table`; every cut set has the same
            regions, rows and bins.
        minimum: the guard (``Optimization.MinEffectiveEvents``).
        edges: region -> bin edges (the region's ``Binning``); bin numbers ``0 .. B`` when not
            given or of the wrong length.
        observables: region -> x-axis label (the region's ``Variable``).
        config: the analysis configuration: the edges and x-axis titles (with units,
            :func:`analysis.plotting.labels.region_axes`) of the regions not in ``edges``
            and ``observables``.

    Returns:
        A figure with one axes per region of the first cut set.

    Raises:
        ValueError: no cut set or no region, or the cut sets differ in regions, rows or bins.
    """
    if not tables:
        raise ValueError("no effective-events table to draw")
    cut_sets = list(tables)
    first = tables[cut_sets[0]]
    regions = list(first)
    if not regions:
        raise ValueError("the effective-events tables have no region (no background sample)")
    for name in cut_sets[1:]:
        _check_same_shape(cut_sets[0], first, name, tables[name])
    edges, observables = dict(edges or {}), dict(observables or {})
    for region in regions:
        region_edges, title, _ = region_axes(config, region)
        if region not in edges and region_edges is not None:
            edges[region] = region_edges
        if region not in observables and title:
            observables[region] = title
    # with the configuration, each sample has its colour of the other figures
    colours = {} if config is None else sample_colours(s.name for s in config.samples if not s.data)
    columns_max = max(len(first[region]) for region in regions)
    figure = new_figure((11.0, 1.0 + max(3.6, 0.35 * 2 * columns_max) * len(regions)))
    axes = figure.subplots(len(regions), 1, squeeze=False)[:, 0]
    for ax, region in zip(axes, regions, strict=True):
        rows = first[region]
        n_bins = len(next(iter(rows.values())))
        x, binned = _edges(edges.get(region), n_bins)
        positive: list[float] = []
        has_zero = False
        for k, cut_set in enumerate(cut_sets):
            style = LINE_STYLES[k % len(LINE_STYLES)]
            for j, column in enumerate(rows):
                values = np.asarray(tables[cut_set][region][column], dtype=np.float64)
                total = column == TOTAL
                ax.stairs(
                    values,
                    x,
                    baseline=None,
                    color=DATA_COLOR if total else colours.get(column, color(j)),
                    linestyle=style,
                    linewidth=2.5 if total else 1.5,
                    label=line_label(column, cut_set),
                    gid=line_gid(cut_set, region, column),
                )
                positive += [v for v in values.tolist() if v > 0 and math.isfinite(v)]
                has_zero = has_zero or bool(np.any(values <= 0))
        if minimum > 0:
            ax.axhline(
                minimum,
                color=GUARD_COLOR,
                linestyle=":",
                linewidth=2,
                label=guard_label(minimum),
                gid="guard",
            )
        ax.set_yscale("log")
        low = min(positive + ([minimum] if minimum > 0 else []), default=1.0)
        high = max(positive + ([minimum] if minimum > 0 else []), default=10.0)
        ax.set_ylim(low / 3, high * 3)
        ax.set_xlim(x[0], x[-1])
        ax.set_xlabel(observables.get(region) or ("observable" if binned else "bin"))
        ax.set_ylabel(r"effective MC events $n_\mathrm{eff}$")
        ax.set_title(region, fontsize="small")
        if has_zero:
            ax.text(
                0.02,
                0.03,
                r"$n_\mathrm{eff}$ = 0: the line leaves through the bottom",
                transform=ax.transAxes,
                fontsize="xx-small",
                color="0.3",
            )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="xx-small")
    return figure


def _edges(edges: Sequence[float] | None, n_bins: int) -> tuple[np.ndarray, bool]:
    """The x edges of a region and whether they are its bin edges (not bin numbers)."""
    if edges is not None and len(edges) == n_bins + 1:
        return np.asarray(edges, dtype=np.float64), True
    return np.arange(n_bins + 1, dtype=np.float64), False


def _check_same_shape(
    name: str,
    table: Mapping[str, Mapping[str, Sequence[float]]],
    other_name: str,
    other: Mapping[str, Mapping[str, Sequence[float]]],
) -> None:
    shape = {region: {c: len(v) for c, v in rows.items()} for region, rows in table.items()}
    other_shape = {region: {c: len(v) for c, v in rows.items()} for region, rows in other.items()}
    if shape != other_shape:
        raise ValueError(
            f"the effective-events tables of '{name}' and '{other_name}' differ in regions, "
            f"samples or bins: {shape} vs {other_shape}"
        )
