"""Cut optimization: the training history, and relaxed (KDE) against hard histograms.

:func:`optimization_history` reads :class:`analysis.optimize.OptimizationResult` or the
``result.json`` that ``diffana optimize`` / ``scan-cuts`` write (DESIGN.md, CLI contract).
Each history entry has ``step`` and ``cuts`` (name -> value), ``hard`` where the hard metric
was evaluated (``null`` where an evaluation failed), and for gradient runs ``relaxed``,
``tau`` (relative cut temperature), ``bandwidth`` (KDE bandwidth in bin widths) and
``rejected`` (the cause, for steps without an update).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import mplhep
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from analysis.plotting._results import array, field
from analysis.plotting.labels import (
    ExperimentLabel,
    axis_title,
    draw_experiment_label,
    events_label,
    variable_label,
)
from analysis.plotting.style import (
    DATA_COLOR,
    color,
    corner_text,
    display_name,
    minor_ticks,
    new_figure,
    ratio_figure,
    sample_colours,
    styled,
)

if TYPE_CHECKING:
    from analysis.config import Config

RELAXED_LABEL = "relaxed (soft cuts, KDE)"
HARD_LABEL = "hard (boolean cuts, full fit)"
BEST_LABEL = "best (hard)"
FINAL_LABEL = "final (hard, after the last step)"
HARD_ERROR_LABEL = "hard evaluation failed"
REJECTED_LABEL = "rejected step"
TAU_LABEL = r"$\tau$ (cut temperature)"
BANDWIDTH_LABEL = "KDE bandwidth [bin widths]"
CUT_LABEL = "cut value"
BEST_CUT_LABEL = "best point's value"
BEST_COLOR = "#ffa90e"
"""The best point's colour (the star and the dashed lines of the cut panels)."""

#: readable y-axis titles of the objectives (:data:`analysis.objectives.OBJECTIVES`)
OBJECTIVE_TITLES = {
    "discovery_significance": "expected $Z_0$\n(higher is better)",
    "asimov_significance": "$Z_A$, stat. only\n(higher is better)",
    "cls": "expected CL$_s$ at $\\mu = 1$\n(lower is better)",
    "poi_uncertainty": "$\\sigma_\\mu$\n(lower is better)",
    "upper_limit": "expected limit on $\\mu$\n(lower is better)",
}


def _series(history: list[Mapping[str, Any]], key: str) -> np.ndarray:
    """``entry[key]`` per entry, NaN where missing or ``null``."""
    values = []
    for entry in history:
        value = entry.get(key)
        values.append(math.nan if value is None else float(value))
    return np.asarray(values, dtype=np.float64)


@styled
def optimization_history(result: Any, *, ncols: int = 3, config: Config | None = None) -> Figure:
    """Metric, cut values and annealing schedule against the optimization step.

    Panels, top to bottom:

    1. the objective: the relaxed metric at every step (line), the hard metric (boolean
       cuts, ordinary histograms, full fit) where it was evaluated (black points) and at the
       final parameters (open square, one step after the last), the best hard point (a large
       star drawn under the points, so the point it marks stays visible), the steps whose
       hard evaluation failed (red crosses on the axis) and the rejected steps (red dotted
       vertical lines); the legend, above the panel, names each of them;
    2. one small panel per cut (``ncols`` per row): its value against the step (solid), and
       the best point's value (dashed, the star's colour), both explained in the legend above
       the first panel; with ``config``, each title has the cut variable's unit. Cuts with
       one value at every step (not trainable) get no panel but a note at the bottom with
       their values;
    3. the schedule: cut temperature ``tau`` and KDE ``bandwidth`` (log scale), when the
       history has them (gradient runs; not for the grid/random baselines).

    Args:
        result: :class:`analysis.optimize.OptimizationResult` or its ``to_dict`` form.
        ncols: cut panels per row.
        config: the analysis configuration: units of the cut variables.

    Returns:
        A figure with ``1 + n_cuts (+ 1)`` axes (``n_cuts``: the cuts that moved).
    """
    data = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    history = list(field(data, "history"))
    if not history:
        raise ValueError("the optimization result has an empty history")
    steps = _series(history, "step")
    relaxed, hard = _series(history, "relaxed"), _series(history, "hard")
    # a cut that never moved (not trainable, or the run too short) gets no panel, a note
    constant = {
        name: float(history[0]["cuts"][name])
        for name in history[0]["cuts"]
        if len({float(entry["cuts"][name]) for entry in history}) == 1
        and float((data.get("best") or {}).get("cuts", {}).get(name, history[0]["cuts"][name]))
        == float(history[0]["cuts"][name])
    }
    cut_names = [name for name in history[0]["cuts"] if name not in constant]
    best = data.get("best") or {}
    has_schedule = any("tau" in entry for entry in history)

    ncols = max(1, min(ncols, len(cut_names)))
    cut_rows = math.ceil(len(cut_names) / ncols)
    heights = [2.5] + [1.6] * cut_rows + ([1.6] if has_schedule else [])
    figure = new_figure((3.2 * max(ncols, 2), 1.0 + sum(heights)))
    grid = figure.add_gridspec(len(heights), ncols, height_ratios=heights)

    ax = figure.add_subplot(grid[0, :])
    if np.isfinite(relaxed).any():
        ax.plot(steps, relaxed, "-", color=color(0), label=RELAXED_LABEL, zorder=2)
    finite = np.isfinite(hard)
    if finite.any():
        ax.plot(
            steps[finite],
            hard[finite],
            "o",
            color=DATA_COLOR,
            markersize=5,
            label=HARD_LABEL,
            zorder=4,
        )
    # a gradient run evaluates the hard metric once more after its last update
    final = data.get("final") or {}
    final_step = float(np.nanmax(steps)) + 1
    has_final = final.get("hard") is not None and final.get("cuts") != history[-1]["cuts"]
    if has_final:
        ax.plot(
            [final_step],
            [final["hard"]],
            "s",
            color=DATA_COLOR,
            fillstyle="none",
            markersize=10,
            markeredgewidth=1.8,
            label=FINAL_LABEL,
            zorder=5,
        )
    best_hard = best.get("hard")
    if best_hard is not None:
        at = [s for s, h in zip(steps, hard, strict=True) if h == best_hard]
        if not at and has_final and final["hard"] == best_hard:
            at = [final_step]
        if at:  # under the hard point (or final square) it marks, which stay visible
            ax.plot(
                at[:1],
                [best_hard],
                "*",
                color=BEST_COLOR,
                markersize=22,
                markeredgecolor="black",
                markeredgewidth=0.5,
                label=BEST_LABEL,
                zorder=3,
            )
    failed = [float(e["step"]) for e in history if e.get("hard_error")]
    if failed:
        ax.plot(
            failed,
            [0.03] * len(failed),
            "x",
            color="red",
            transform=ax.get_xaxis_transform(),
            label=HARD_ERROR_LABEL,
        )
    rejected = [float(entry["step"]) for entry in history if entry.get("rejected")]
    for k, step in enumerate(rejected):
        ax.axvline(
            step,
            color="red",
            linestyle=":",
            linewidth=1,
            label=REJECTED_LABEL if k == 0 else "_nolegend_",
        )
    objective = str(data.get("objective", "objective"))
    ax.set_ylabel(OBJECTIVE_TITLES.get(objective, objective), fontsize="small")
    ax.set_xlabel("step")
    handles, labels = ax.get_legend_handles_labels()
    if cut_names:  # the cut panels' line styles, explained once for all of them
        handles += [
            Line2D([], [], color=color(0), linewidth=1),
            Line2D([], [], color=BEST_COLOR, linestyle="--", linewidth=1.5),
        ]
        labels += [f"{CUT_LABEL} at each step (cut panels)", BEST_CUT_LABEL + " (cut panels)"]
    ax.legend(
        handles,
        labels,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.02),
        ncols=2,
        fontsize="x-small",
        frameon=False,
    )
    minor_ticks(ax)

    best_cuts = best.get("cuts") or {}
    units = _cut_units(config)
    for k, name in enumerate(cut_names):
        cax = figure.add_subplot(grid[1 + k // ncols, k % ncols])
        values = np.asarray([float(entry["cuts"][name]) for entry in history])
        cax.plot(steps, values, "-", color=color(0), label=name)
        if name in best_cuts:
            cax.axhline(float(best_cuts[name]), color=BEST_COLOR, linestyle="--", linewidth=1.5)
        cax.set_title(axis_title(name, units.get(name)), fontsize="x-small")
        cax.tick_params(labelsize="xx-small")
        minor_ticks(cax)
    if constant:
        figure.text(
            0.01,
            0.0,
            "not drawn (the same value at every step): "
            + ", ".join(f"{name} = {value:.4g}" for name, value in constant.items()),
            fontsize="xx-small",
            color="0.3",
            ha="left",
            va="bottom",
            wrap=True,
        )

    if has_schedule:
        sax = figure.add_subplot(grid[-1, :])
        tau, bandwidth = _series(history, "tau"), _series(history, "bandwidth")
        sax.plot(steps, tau, "-", color=color(2), label=TAU_LABEL)
        sax.plot(steps, bandwidth, "--", color=color(4), label=BANDWIDTH_LABEL)
        positive = np.concatenate([tau, bandwidth])
        if np.all(positive[np.isfinite(positive)] > 0):
            sax.set_yscale("log")
            # labels at 1 and 3 times the decades, as plain numbers: labels at every minor
            # tick (2x10^-1, 3x10^-1, 4x10^-1, ...) overlap in a panel this low
            sax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
            sax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            sax.yaxis.set_minor_formatter(NullFormatter())
            sax.tick_params(axis="y", labelsize="x-small")
        sax.set_xlabel("step")
        sax.legend(loc="best", fontsize="x-small")
        minor_ticks(sax, y=sax.get_yscale() == "linear")
    for axis in figure.axes:  # steps are whole numbers
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def _cut_units(config: Config | None) -> dict[str, str | None]:
    """Cut name -> the unit of its variable (:func:`analysis.plotting.labels.variable_label`)."""
    if config is None:
        return {}
    return {cut.name: variable_label(config, cut.variable)[1] for cut in config.cuts}


def _histograms(value: Any) -> dict[Any, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    return {"": value}


@styled
def soft_vs_hard(
    soft: Any,
    hard: Any,
    *,
    observable: str = "observable",
    text: str | None = None,
    unit: str | None = None,
    experiment: ExperimentLabel | None = None,
) -> Figure:
    """Relaxed (KDE, soft cuts) histograms against hard ones at the same cut values.

    Drawn (top): each hard histogram as a solid step line with ``sqrt(sumw2)`` error bars
    and the soft histogram of the same template as a dashed step line in the same colour.
    Bottom: soft / hard per bin. The legend has one entry per template (its colour, the
    sample's colour in the other figures: :func:`analysis.plotting.style.sample_colours`) and
    two for the line styles (solid: hard, dashed: soft). The step artists have the gids
    ``"hard:NAME"``, ``"soft:NAME"`` and ``"ratio:NAME"`` (``NAME`` the key joined with
    " / ", empty for single histograms). The two agree as the cut temperature and the KDE
    bandwidth go to 0 (DESIGN.md); their difference at the final cuts is the bias of the
    relaxed objective.

    Args:
        soft, hard: :class:`analysis.histograms.Histogram` objects, or mappings with the same
            keys (e.g. ``(region, sample, variation)``) -> Histogram; the hard histograms'
            edges are used.
        observable: x-axis title (with its unit).
        text: text in the upper-left corner.
        unit: the observable's unit, for the bin width in the y-axis title.
        experiment: the experiment label drawn above the figure.

    Returns:
        A figure with two axes: the histograms and the ratio.
    """
    soft_map, hard_map = _histograms(soft), _histograms(hard)
    if set(soft_map) != set(hard_map):
        raise ValueError(
            f"soft and hard histograms have different keys: {sorted(map(str, soft_map))} "
            f"vs {sorted(map(str, hard_map))}"
        )
    figure, ax, ratio_ax = ratio_figure()
    low_edge, high_edge, top = math.inf, -math.inf, 0.0
    handles: list[Any] = []
    names: list[str] = []
    colours = sample_colours(display_name(key) for key in hard_map)
    for key in hard_map:
        h, s = hard_map[key], soft_map[key]
        edges = array(h.edges)
        hard_yields, soft_yields = array(h.yields), array(s.yields)
        if soft_yields.shape != hard_yields.shape:
            raise ValueError(f"{display_name(key)}: soft and hard histograms differ in bins")
        name = display_name(key)
        line_color = colours[name]
        (hard_artists,) = mplhep.histplot(
            hard_yields,
            edges,
            yerr=np.sqrt(np.clip(array(h.sumw2), 0.0, None)),
            histtype="step",
            color=line_color,
            label=f"{name} hard" if name else HARD_LABEL,
            ax=ax,
        )
        hard_artists.stairs.set_gid(f"hard:{name}")
        soft_stairs = ax.stairs(
            soft_yields,
            edges,
            color=line_color,
            linestyle="--",
            linewidth=1.5,
            label=f"{name} soft" if name else "soft (KDE)",
        )
        ratio = np.full_like(soft_yields, np.nan)
        np.divide(soft_yields, hard_yields, out=ratio, where=hard_yields != 0)
        soft_stairs.set_gid(f"soft:{name}")
        ratio_ax.stairs(
            ratio, edges, color=line_color, linestyle="--", linewidth=1.5, gid=f"ratio:{name}"
        )
        low_edge, high_edge = min(low_edge, edges[0]), max(high_edge, edges[-1])
        errors = np.sqrt(np.clip(array(h.sumw2), 0.0, None))
        top = max(top, float(np.max(hard_yields + errors)), float(np.max(soft_yields)))
        if name and (np.any(hard_yields != 0) or np.any(soft_yields != 0)):
            handles.append(Line2D([], [], color=line_color, linewidth=6))
            names.append(name)
    handles += [
        Line2D([], [], color="0.3", linestyle="-", marker="|", markersize=8),
        Line2D([], [], color="0.3", linestyle="--"),
    ]
    names += [r"hard: boolean cuts ($\pm\sqrt{\sum w^2}$)", "soft: sigmoid cuts, KDE"]
    ratio_ax.axhline(1.0, color="0.3", linestyle=":", linewidth=1)
    ax.set_ylim(0.0, (1.25 + 0.08 * len(names)) * top if top > 0 else 1.0)
    ax.set_ylabel(events_label(edges, unit), loc="top")
    ax.legend(handles, names, loc="upper right", fontsize="x-small")
    if text:
        corner_text(ax, text)
    draw_experiment_label(ax, experiment)
    ratio_ax.set_xlim(low_edge, high_edge)
    ratio_ax.set_ylim(0.5, 1.5)
    ratio_ax.set_ylabel("soft / hard")
    ratio_ax.set_xlabel(observable)
    for axes in (ax, ratio_ax):
        minor_ticks(axes)
    return figure
