"""Cut-flow chart: each sample's yield after each step of the selection, starting vs optimized.

One line per sample over the steps of :class:`analysis.cutflow.CutFlow` (``preselection``, each
cut, ``in histogram range``) on a logarithmic axis: the starting cuts solid with round markers,
the optimized cuts dashed with open square markers in the same colour, the data as black
markers (round: starting cuts, open squares: optimized). The legend, right of the axes, names
each sample once and says which line style is which set of cuts.
Steps where a yield is not positive are not drawn (a logarithmic axis cannot show them).

Object-oriented matplotlib only: a new :class:`matplotlib.figure.Figure` per call, no pyplot, in
the package's shared style applied locally (:func:`analysis.plotting.style.styled`), so it works
in scripts, Snakemake rules and notebooks alike and leaves the caller's rcParams alone.
"""

from __future__ import annotations

from typing import Literal, cast

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.cutflow import CutFlow
from analysis.plotting.style import DATA_COLOR, new_figure, sample_colours, styled

__all__ = ["cutflow_chart"]

_OPTIMIZED = " (optimized)"
LineStyle = Literal["-", "--"]


@styled
def cutflow_chart(
    start: CutFlow,
    optimized: CutFlow | None = None,
    *,
    weighted: bool = True,
    ax: Axes | None = None,
) -> Figure:
    """Plot the per-sample yield after each cut for the starting (and optimized) cuts.

    Args:
        start: the cut flow with the configured (starting) cuts.
        optimized: the cut flow of the same region with the optimized cuts, drawn dashed.
        weighted: plot weighted yields ``sum w`` (default) or numbers of Monte Carlo events.
        ax: draw into these axes instead of a new figure.

    Returns:
        The figure. Its lines are labelled with the sample name, with ``" (optimized)"``
        appended for the optimized cuts; each line's y data are the plotted numbers, one per
        step.

    Raises:
        ValueError: ``optimized`` is for another region or has other steps or samples.
    """
    if optimized is not None and (
        optimized.region != start.region
        or optimized.steps != start.steps
        or optimized.samples != start.samples
    ):
        raise ValueError(
            f"cannot compare cut flows of region '{start.region}' (steps {list(start.steps)}, "
            f"samples {list(start.samples)}) and region '{optimized.region}' "
            f"(steps {list(optimized.steps)}, samples {list(optimized.samples)})"
        )
    if ax is None:
        figure = new_figure((max(7.0, 1.1 * len(start.steps) + 2.5), 6.0))
        ax = figure.add_subplot()
    else:
        figure = cast(Figure, ax.figure.figure)  # the root figure, also for a SubFigure's axes
    positions = list(range(len(start.steps)))
    colours = _colours(start.predictions)
    styles: list[tuple[CutFlow, str, LineStyle, str, str | None]] = [(start, "", "-", "o", None)]
    if optimized is not None:
        styles.append((optimized, _OPTIMIZED, "--", "s", "none"))

    legend = []
    for sample in start.samples:
        is_data = sample == start.data
        for flow, suffix, linestyle, marker, facecolor in styles:
            (line,) = ax.plot(
                positions,
                _values(flow, sample, weighted),
                label=sample + suffix,
                color=DATA_COLOR if is_data else colours[sample],
                linestyle="none" if is_data else linestyle,
                marker=marker,
                markersize=6 if is_data else 5,
                markerfacecolor=facecolor,
            )
            if not suffix:
                legend.append(line)
    if optimized is not None:  # one legend entry per sample, plus what solid and dashed mean
        legend += [
            Line2D([], [], color="grey", linestyle="-", marker="o", label="starting cuts"),
            Line2D(
                [],
                [],
                color="grey",
                linestyle="--",
                marker="s",
                markerfacecolor="none",
                label="optimized cuts",
            ),
        ]

    ax.set_yscale("log", nonpositive="mask")
    ax.set_xticks(positions, labels=list(start.steps), rotation=30, ha="right")
    ax.set_xlim(-0.3, len(positions) - 0.7)
    ax.set_xlabel("selection step (cumulative)")
    ax.set_ylabel("yield (sum of weights)" if weighted else "events (unweighted)")
    ax.set_title(f"Cut flow, region {start.region}", loc="left")
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(
        handles=legend,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="small",
        frameon=False,
    )
    return figure


def _values(flow: CutFlow, sample: str, weighted: bool) -> list[float]:
    return [float(v) for v in (flow.yields if weighted else flow.events)[sample]]


def _colours(samples: tuple[str, ...]) -> dict[str, str]:
    """One colour per prediction sample: the colour the sample has in the distributions
    (:func:`analysis.plotting.style.color` of its position among the samples sorted by name,
    which is the likelihood model's order), so a sample looks the same in every figure."""
    return sample_colours(samples)
