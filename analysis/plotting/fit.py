r"""Fit results: nuisance-parameter pulls, correlation matrix, impact ranking, likelihood scan.

The figures of cabinetry's ``visualize.pulls``, ``correlation_matrix``, ``ranking`` and
``scan`` (``cabinetry.visualize.plot_result``), drawn from :class:`analysis.fit.FitResult`,
:class:`analysis.inference.RankingResult` and :class:`analysis.inference.ScanResult` or the
JSON the ``diffana fit`` / ``ranking`` / ``scan`` commands write.

A *pull* is :math:`(\hat\theta - \theta_0) / \Delta\theta` with :math:`\theta_0` the nominal
value of the parameter's constraint (0 for ``histosys``/``normsys``, 1 for ``staterror``,
``lumi`` and ``shapesys``; :func:`analysis.prediction.asimov_parameters`) and
:math:`\Delta\theta` its pre-fit (constraint) width; its error bar is the post-fit uncertainty
in the same units, :math:`\Delta\hat\theta / \Delta\theta`. For ``histosys``/``normsys``
parameters (:math:`\theta_0 = 0`, :math:`\Delta\theta = 1`) this is cabinetry's pull plot.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from analysis.plotting import _results
from analysis.plotting.style import (
    ONE_SIGMA_COLOR,
    TWO_SIGMA_COLOR,
    color,
    minor_ticks,
    new_figure,
    styled,
)
from analysis.prediction import asimov_parameters, parameter_types

PULL_LABEL = r"$(\hat{\theta} - \theta_0) / \Delta\theta$"
SCAN_LABEL = "profile likelihood"
GAUSSIAN_LABEL = "Gaussian approximation"


def _constraint_info(model) -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]:
    """Nominal value, pre-fit width and modifier types of each of ``model``'s parameters."""
    nominal = _results.array(asimov_parameters(model))
    width = _results.array(model.prefit_uncertainties())
    set_types = parameter_types(model)
    types: list[tuple[str, ...]] = [()] * model.npars
    for name, sl in model.par_slices.items():
        for i in range(sl.start, sl.stop):
            types[i] = set_types.get(name, ())
    return nominal, width, types


def pull_values(fit_result: Any, model) -> dict[str, tuple[float, float]]:
    """Parameter name -> (pull, post-fit error in units of the pre-fit width) for every
    constrained parameter that is free in the fit (module docstring)."""
    fit = _results.fit(fit_result)
    if tuple(fit.labels) != tuple(model.par_names):
        raise ValueError("the fit result's parameters are not the model's")
    nominal, width, _ = _constraint_info(model)
    out = {}
    for i, name in enumerate(fit.labels):
        if width[i] > 0 and fit.uncertainty[i] > 0:
            out[name] = (
                float((fit.bestfit[i] - nominal[i]) / width[i]),
                float(fit.uncertainty[i] / width[i]),
            )
    return out


@styled
def pulls(
    fit_result: Any,
    model,
    *,
    exclude: str | Iterable[str] | None = None,
    include_staterror: bool = False,
) -> Figure:
    """Nuisance-parameter pulls with post-fit error bars (cabinetry's ``visualize.pulls``).

    Drawn: one row per parameter, top to bottom in the model's order, a point at the pull
    :math:`(\\hat\\theta - \\theta_0)/\\Delta\\theta` with horizontal error bar
    :math:`\\Delta\\hat\\theta/\\Delta\\theta` (module docstring), on green (+-1) and yellow
    (+-2) bands and a dotted line at 0.

    Left out: unconstrained parameters (the POI, other normfactors and shapefactors: no pre-fit
    width), parameters fixed in the fit (post-fit uncertainty 0), ``staterror`` parameters
    unless ``include_staterror`` (cabinetry leaves them out too), and the names in ``exclude``.

    Args:
        fit_result: :class:`analysis.fit.FitResult` (or its ``to_dict`` form) of ``model``.
        model: the :class:`analysis.likelihood.Model` that was fitted (for the constraints).
        exclude: parameter name(s) not to draw.
        include_staterror: draw the ``staterror`` gammas too.
    """
    excluded = {exclude} if isinstance(exclude, str) else set(exclude or ())
    _, _, types = _constraint_info(model)
    values = pull_values(fit_result, model)
    rows = [
        (name, *values[name])
        for i, name in enumerate(model.par_names)
        if name in values
        and name not in excluded
        and (include_staterror or "staterror" not in types[i])
    ]
    n = len(rows)
    y = np.arange(n)[::-1].astype(np.float64)
    figure = new_figure((7.0, 1.5 + 0.4 * max(n, 1)))
    ax = figure.subplots()
    ax.fill_betweenx([-0.5, n - 0.5], -2, 2, color=TWO_SIGMA_COLOR, linewidth=0)
    ax.fill_betweenx([-0.5, n - 0.5], -1, 1, color=ONE_SIGMA_COLOR, linewidth=0)
    ax.axvline(0.0, color="black", linestyle=":", linewidth=1)
    if rows:
        ax.errorbar(
            [r[1] for r in rows], y, xerr=[r[2] for r in rows], fmt="o", color="black", label="pull"
        )
    reach = max([3.0] + [abs(r[1]) + r[2] + 0.5 for r in rows])
    ax.set_xlim(-reach, reach)
    ax.set_ylim(-0.5, n - 0.5)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.tick_params(axis="y", which="minor", left=False, right=False)
    ax.set_xlabel(PULL_LABEL)
    minor_ticks(ax, y=False)
    return figure


@styled
def correlation_matrix(
    fit_result: Any, *, pruning_threshold: float = 0.0, annotate: bool = True
) -> Figure:
    """Parameter correlation matrix (cabinetry's ``visualize.correlation_matrix``).

    Drawn: the matrix as a red-blue image from -1 to +1 with a colour bar, parameters in the
    fit's order on both axes, and (``annotate``) each correlation above 0.005 in magnitude
    written in its cell, in a font that fits the cell (10 pt in cells of 0.6 inch).
    Parameters fixed in the fit (all-zero row) are left out, and so is every parameter whose
    correlations with all others are below ``pruning_threshold`` in magnitude.

    Returns:
        A figure with two axes: the matrix and the colour bar.
    """
    fit = _results.fit(fit_result)
    corr = fit.corr_mat
    below = np.abs(corr) < pruning_threshold
    np.fill_diagonal(below, True)
    keep = ~(np.all(below, axis=0) | np.all(corr == 0.0, axis=0))
    corr = corr[np.ix_(keep, keep)]
    labels = [label for label, k in zip(fit.labels, keep, strict=True) if k]
    n = len(labels)
    figure = new_figure((4.0 + 0.6 * n, 3.0 + 0.6 * n))
    ax = figure.subplots()
    image = ax.imshow(corr, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
    figure.colorbar(image, ax=ax, label="correlation")
    ax.set_xticks(np.arange(n), labels, rotation=45, ha="right")
    ax.set_yticks(np.arange(n), labels)
    ax.tick_params(which="minor", bottom=False, top=False, left=False, right=False)
    if annotate:
        # a cell is 0.6 inch (43 pt) wide; "-0.40" is about 3 font sizes wide
        fontsize = 10.0
        for (row, column), value in np.ndenumerate(corr):
            if abs(value) > 0.005:
                color = "white" if abs(value) > 0.75 else "black"
                ax.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    color=color,
                    fontsize=fontsize,
                )
    return figure


@styled
def ranking(ranking_result: Any, model=None, *, max_pars: int | None = None) -> Figure:
    """Impact of the nuisance parameters on the POI (cabinetry's ``visualize.ranking``).

    Parameters are sorted by their mean post-fit impact ``(|up| + |down|) / 2``, largest at the
    top; ``max_pars`` keeps that many. Drawn on the top axis (``Delta mu``): pre-fit impacts as
    empty bars and post-fit impacts as filled bars (up variation blue, down orange). Drawn on
    the bottom axis: each parameter's pull with its post-fit error bar and dashed lines at -1,
    0, +1. With ``model`` the pulls are :math:`(\\hat\\theta - \\theta_0)/\\Delta\\theta`
    (module docstring; unconstrained parameters get no pull marker); without it, as cabinetry
    draws them, the raw best fit and uncertainty.

    Returns:
        A figure with two axes (pulls, and impacts on a twin x-axis).
    """
    rank = _results.ranking(ranking_result)
    pull = rank.bestfit.copy()
    error = rank.uncertainty.copy()
    if model is not None:
        nominal, width, _ = _constraint_info(model)
        index = [list(model.par_names).index(name) for name in rank.labels]
        nominal, width = nominal[index], width[index]
        constrained = width > 0
        safe = np.where(constrained, width, 1.0)
        pull = np.where(constrained, (rank.bestfit - nominal) / safe, np.nan)
        error = np.where(constrained, rank.uncertainty / safe, np.nan)
    # an impact that could not be computed (NaN) is drawn as no bar
    impacts = [
        np.nan_to_num(v, nan=0.0)
        for v in (rank.prefit_up, rank.prefit_down, rank.postfit_up, rank.postfit_down)
    ]
    mean_impact = (np.abs(impacts[2]) + np.abs(impacts[3])) / 2
    order = np.argsort(-mean_impact, kind="stable")[:max_pars]
    n = len(order)
    y = np.arange(n)[::-1].astype(np.float64)

    figure = new_figure((8.0, 2.5 + 0.45 * max(n, 1)))
    ax_pulls = figure.subplots()
    ax_impact = ax_pulls.twiny()
    ax_pulls.set_zorder(1)  # pulls on top of the impact bars
    ax_pulls.patch.set_visible(False)
    for x in (-1.0, 0.0, 1.0):
        ax_pulls.vlines(x, -1, n - 0.5, linestyles="dashed", color="black", linewidth=0.75)
    bars = [
        ax_impact.barh(y, impacts[0][order], fill=False, edgecolor=color(0), linewidth=1),
        ax_impact.barh(y, impacts[1][order], fill=False, edgecolor=color(1), linewidth=1),
        ax_impact.barh(y, impacts[2][order], color=color(0)),
        ax_impact.barh(y, impacts[3][order], color=color(1)),
    ]
    drawn = np.isfinite(pull[order])
    points = ax_pulls.errorbar(
        pull[order][drawn], y[drawn], xerr=error[order][drawn], fmt="o", color="black"
    )
    largest = max([1e-9] + [float(np.max(np.abs(v[order]))) if n else 0.0 for v in impacts])
    ax_impact.set_xlim(-1.1 * largest, 1.1 * largest)
    ax_impact.set_xlabel(r"$\Delta\mu$")
    reach = max([2.0] + [abs(p) + e + 0.2 for p, e in zip(pull, error, strict=True) if p == p])
    ax_pulls.set_xlim(-reach, reach)
    ax_pulls.set_ylim(-1, n)
    ax_pulls.set_yticks(y, [rank.labels[i] for i in order])
    ax_pulls.set_xlabel(PULL_LABEL if model is not None else r"$\hat{\theta}$")
    ax_pulls.tick_params(axis="y", which="minor", left=False, right=False)
    for axes in (ax_pulls, ax_impact):
        minor_ticks(axes, y=False)
    handles: list[Any] = [*bars, points]  # containers, which legends accept
    figure.legend(
        handles,
        [
            r"pre-fit impact: $\theta = \hat{\theta} + \Delta\theta$",
            r"pre-fit impact: $\theta = \hat{\theta} - \Delta\theta$",
            r"post-fit impact: $\theta = \hat{\theta} + \Delta\hat{\theta}$",
            r"post-fit impact: $\theta = \hat{\theta} - \Delta\hat{\theta}$",
            "pull",
        ],
        loc="outside upper center",
        ncols=2,
        fontsize="x-small",
    )
    return figure


@styled
def likelihood_scan(scan_result: Any, *, gaussian: bool = True) -> Figure:
    """Profile-likelihood scan of one parameter (cabinetry's ``visualize.scan``).

    Drawn: :math:`-2\\Delta\\ln L` at each scanned value (points joined by a line), dotted
    lines at 1 and 4 (68.3% and 95.5% CL for one parameter), and (``gaussian``) the parabola
    :math:`((x - \\hat{x}) / \\sigma_x)^2` of the HESSE uncertainty for comparison.
    """
    scan = _results.scan(scan_result)
    figure = new_figure((7.0, 6.0))
    ax = figure.subplots()
    low, high = float(scan.values.min()), float(scan.values.max())
    for level, text in ((1.0, "68.3% CL"), (4.0, "95.5% CL")):
        ax.axhline(level, color="gray", linestyle=":", linewidth=1)
        ax.text(high - 0.01 * (high - low), level, text, ha="right", va="bottom", color="gray")
    if gaussian and scan.uncertainty > 0:
        grid = np.linspace(low, high, 200)
        ax.plot(
            grid,
            ((grid - scan.bestfit) / scan.uncertainty) ** 2,
            "--",
            color=color(1),
            label=GAUSSIAN_LABEL,
        )
    ax.plot(scan.values, scan.delta_twice_nll, "o-", color=color(0), label=SCAN_LABEL)
    ax.set_xlim(low, high)
    ax.set_ylim(0.0, max(1.2 * float(np.max(scan.delta_twice_nll)), 4.5))
    ax.set_xlabel(scan.parameter)
    ax.set_ylabel(r"$-2\,\Delta\ln L$")
    ax.legend(loc="upper center")
    minor_ticks(ax)
    return figure
