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
from typing import Any

import mplhep
import numpy as np
from matplotlib.figure import Figure

from analysis.plotting._results import array, field
from analysis.plotting.style import (
    DATA_COLOR,
    color,
    display_name,
    minor_ticks,
    new_figure,
    ratio_figure,
    styled,
)

RELAXED_LABEL = "relaxed"
HARD_LABEL = "hard"
BEST_LABEL = "best (hard)"
FINAL_LABEL = "final (hard)"
HARD_ERROR_LABEL = "hard evaluation failed"
TAU_LABEL = r"$\tau$ (cut temperature)"
BANDWIDTH_LABEL = "KDE bandwidth [bin widths]"


def _series(history: list[Mapping[str, Any]], key: str) -> np.ndarray:
    """``entry[key]`` per entry, NaN where missing or ``null``."""
    values = []
    for entry in history:
        value = entry.get(key)
        values.append(math.nan if value is None else float(value))
    return np.asarray(values, dtype=np.float64)


@styled
def optimization_history(result: Any, *, ncols: int = 3) -> Figure:
    """Metric, cut values and annealing schedule against the optimization step.

    Panels, top to bottom:

    1. the objective: the relaxed metric at every step (line), the hard metric (boolean
       cuts, ordinary histograms, full fit) where it was evaluated (points) and at the final
       parameters (open square, one step after the last), the best hard point (star), the
       steps whose hard evaluation failed (red crosses on the axis) and the rejected steps
       (red dotted vertical lines);
    2. one small panel per cut (``ncols`` per row): its value against the step, and the best
       point's value (dashed);
    3. the schedule: cut temperature ``tau`` and KDE ``bandwidth`` (log scale), when the
       history has them (gradient runs; not for the grid/random baselines).

    Args:
        result: :class:`analysis.optimize.OptimizationResult` or its ``to_dict`` form.
        ncols: cut panels per row.

    Returns:
        A figure with ``1 + n_cuts (+ 1)`` axes.
    """
    data = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    history = list(field(data, "history"))
    if not history:
        raise ValueError("the optimization result has an empty history")
    steps = _series(history, "step")
    relaxed, hard = _series(history, "relaxed"), _series(history, "hard")
    cut_names = list(history[0]["cuts"])
    best = data.get("best") or {}
    has_schedule = any("tau" in entry for entry in history)

    ncols = max(1, min(ncols, len(cut_names)))
    cut_rows = math.ceil(len(cut_names) / ncols)
    heights = [2.5] + [1.6] * cut_rows + ([1.6] if has_schedule else [])
    figure = new_figure((3.2 * max(ncols, 2), 1.0 + sum(heights)))
    grid = figure.add_gridspec(len(heights), ncols, height_ratios=heights)

    ax = figure.add_subplot(grid[0, :])
    if np.isfinite(relaxed).any():
        ax.plot(steps, relaxed, "-", color=color(0), label=RELAXED_LABEL)
    finite = np.isfinite(hard)
    if finite.any():
        ax.plot(steps[finite], hard[finite], "o", color=DATA_COLOR, markersize=4, label=HARD_LABEL)
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
            label=FINAL_LABEL,
        )
    best_hard = best.get("hard")
    if best_hard is not None:
        at = [s for s, h in zip(steps, hard, strict=True) if h == best_hard]
        if not at and has_final and final["hard"] == best_hard:
            at = [final_step]
        if at:
            ax.plot(at[:1], [best_hard], "*", color=color(3), markersize=14, label=BEST_LABEL)
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
    for entry in history:
        if entry.get("rejected"):
            ax.axvline(float(entry["step"]), color="red", linestyle=":", linewidth=1)
    ax.set_ylabel(str(data.get("objective", "objective")))
    ax.set_xlabel("step")
    ax.legend(loc="best", fontsize="x-small")
    minor_ticks(ax)

    best_cuts = best.get("cuts") or {}
    for k, name in enumerate(cut_names):
        cax = figure.add_subplot(grid[1 + k // ncols, k % ncols])
        values = np.asarray([float(entry["cuts"][name]) for entry in history])
        cax.plot(steps, values, "-", color=color(0), label=name)
        if name in best_cuts:
            cax.axhline(float(best_cuts[name]), color=color(3), linestyle="--", linewidth=1)
        cax.set_title(name, fontsize="x-small")
        cax.tick_params(labelsize="xx-small")
        minor_ticks(cax)

    if has_schedule:
        sax = figure.add_subplot(grid[-1, :])
        tau, bandwidth = _series(history, "tau"), _series(history, "bandwidth")
        sax.plot(steps, tau, "-", color=color(2), label=TAU_LABEL)
        sax.plot(steps, bandwidth, "--", color=color(4), label=BANDWIDTH_LABEL)
        positive = np.concatenate([tau, bandwidth])
        if np.all(positive[np.isfinite(positive)] > 0):
            sax.set_yscale("log")
        sax.set_xlabel("step")
        sax.legend(loc="best", fontsize="x-small")
        minor_ticks(sax, y=sax.get_yscale() == "linear")
    return figure


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
) -> Figure:
    """Relaxed (KDE, soft cuts) histograms against hard ones at the same cut values.

    Drawn (top): each hard histogram as a solid step line with ``sqrt(sumw2)`` error bars
    and the soft histogram of the same template as a dashed step line in the same colour.
    Bottom: soft / hard per bin. The step artists have the gids ``"hard:NAME"``,
    ``"soft:NAME"`` and ``"ratio:NAME"`` (``NAME`` the key joined with " / ", empty for
    single histograms). The two agree as the cut temperature and the KDE bandwidth go
    to 0 (DESIGN.md); their difference at the final cuts is the bias of the relaxed objective.

    Args:
        soft, hard: :class:`analysis.histograms.Histogram` objects, or mappings with the same
            keys (e.g. ``(region, sample, variation)``) -> Histogram; the hard histograms'
            edges are used.
        observable: x-axis label.
        text: text in the upper-left corner.

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
    for k, key in enumerate(hard_map):
        h, s = hard_map[key], soft_map[key]
        edges = array(h.edges)
        hard_yields, soft_yields = array(h.yields), array(s.yields)
        if soft_yields.shape != hard_yields.shape:
            raise ValueError(f"{display_name(key)}: soft and hard histograms differ in bins")
        line_color = color(k)
        name = display_name(key)
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
        top = max(top, float(np.max(hard_yields)), float(np.max(soft_yields)))
    ratio_ax.axhline(1.0, color="0.3", linestyle=":", linewidth=1)
    ax.set_ylim(0.0, 1.4 * top if top > 0 else 1.0)
    ax.set_ylabel("Events")
    ax.legend(loc="upper right", fontsize="x-small")
    if text:
        ax.text(0.04, 0.95, text, transform=ax.transAxes, ha="left", va="top")
    ratio_ax.set_xlim(low_edge, high_edge)
    ratio_ax.set_ylim(0.5, 1.5)
    ratio_ax.set_ylabel("soft / hard")
    ratio_ax.set_xlabel(observable)
    for axes in (ax, ratio_ax):
        minor_ticks(axes)
    return figure
