"""CLs as a function of the POI: the "Brazil" plot (cabinetry's ``visualize.limit``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from analysis.plotting import _results
from analysis.plotting.labels import ExperimentLabel, draw_experiment_label
from analysis.plotting.style import (
    ONE_SIGMA_COLOR,
    TWO_SIGMA_COLOR,
    minor_ticks,
    new_figure,
    styled,
)

OBSERVED_LABEL = r"observed CL$_s$"
EXPECTED_LABEL = r"expected CL$_s$"
ONE_SIGMA_LABEL = r"expected $\pm 1\sigma$"
TWO_SIGMA_LABEL = r"expected $\pm 2\sigma$"
LIMIT_COLOR = "#3f90da"


def observed_limit_label(cl: float, value: float) -> str:
    return f"observed {cl:.0%} CL limit: {value:.3g}"


def expected_limit_label(cl: float, value: float) -> str:
    return f"expected {cl:.0%} CL limit: {value:.3g}"


@styled
def cls_brazil(
    hypotest_result: Any,
    limit: Any = None,
    *,
    cl: float | None = None,
    poi_name: str = r"$\mu$",
    log_y: bool = False,
    experiment: ExperimentLabel | None = None,
    observed: bool = True,
) -> Figure:
    """Observed and expected CLs against the POI with the +-1 and +-2 sigma bands.

    Drawn: the observed CLs (solid line with points), the median expected CLs (dashed), the
    band between the -1 and +1 sigma expected CLs (green) and between -2 and +2 sigma
    (yellow), as pyhf's ``brazil`` plot and cabinetry's limit figure; a red dash-dotted line at
    ``CLs = 1 - cl``; with ``limit``, vertical blue lines at the observed (solid) and median
    expected (dashed) upper limits, each with its value in the legend (every line and band has
    a legend entry).

    Args:
        hypotest_result: :class:`analysis.inference.HypotestResult` of
            ``hypotest(model, data, mu_grid)`` with a 1-D ``poi_value`` (``cls_obs`` shape
            ``(k,)``, ``cls_exp`` ``(k, 5)``, -2 sigma .. +2 sigma), or its ``to_dict`` form.
        limit: :class:`analysis.inference.LimitResult` (or the ``diffana limit`` JSON).
        cl: confidence level of the target line (default: the limit's, else 0.95).
        poi_name: x-axis label.
        log_y: logarithmic CLs axis.
        experiment: the experiment label drawn above the figure.
        observed: draw the observed CLs and limit; ``False`` for a blinded analysis, whose
            "observed" values are those of its Asimov signal-region data (expected only).
    """
    tests = _results.hypotests(hypotest_result)
    limits = None if limit is None else _results.limits(limit)
    if cl is None:
        cl = limits.cl if limits is not None else 0.95
    mu, exp = tests.poi_values, tests.cls_exp
    figure = new_figure((10.0, 6.0))  # the legend right of the axes, clear of the bands
    ax = figure.subplots()
    ax.fill_between(
        mu, exp[:, 0], exp[:, 4], color=TWO_SIGMA_COLOR, linewidth=0, label=TWO_SIGMA_LABEL
    )
    ax.fill_between(
        mu, exp[:, 1], exp[:, 3], color=ONE_SIGMA_COLOR, linewidth=0, label=ONE_SIGMA_LABEL
    )
    ax.plot(mu, exp[:, 2], "--", color="black", label=EXPECTED_LABEL)
    if observed:
        ax.plot(mu, tests.cls_obs, "o-", color="black", markersize=4, label=OBSERVED_LABEL)
    alpha = 1.0 - cl
    ax.axhline(alpha, color="red", linestyle="-.", linewidth=1.2, label=f"CL$_s$ = {alpha:.3g}")
    if limits is not None:
        if observed:
            ax.axvline(
                limits.observed,
                color=LIMIT_COLOR,
                linewidth=1.2,
                label=observed_limit_label(cl, limits.observed),
            )
        ax.axvline(
            limits.expected[2],
            color=LIMIT_COLOR,
            linestyle="--",
            linewidth=1.2,
            label=expected_limit_label(cl, limits.expected[2]),
        )
    ax.set_xlim(float(mu.min()), float(mu.max()))
    if log_y:
        ax.set_yscale("log")
        positive = np.concatenate([tests.cls_obs if observed else [], exp.reshape(-1)])
        positive = positive[positive > 0]
        ax.set_ylim(min(float(positive.min()) if positive.size else alpha, alpha) / 2, 1.5)
    else:
        ax.set_ylim(0.0, 1.05)
    ax.set_xlabel(poi_name)
    ax.set_ylabel(r"CL$_s$")
    # the bands are drawn first; the legend lists the lines first, then the bands
    handles, labels = ax.get_legend_handles_labels()
    order = [i for i, h in enumerate(handles) if not hasattr(h, "get_paths")]
    order += [i for i in range(len(handles)) if i not in order]
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="center left",
        bbox_to_anchor=(1.02, 0.5),
        fontsize="small",
    )
    draw_experiment_label(ax, experiment)
    minor_ticks(ax, y=not log_y)
    return figure
