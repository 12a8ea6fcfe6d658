"""Figures of an analysis, each a function from result objects to a matplotlib Figure.

Every function builds a :class:`matplotlib.figure.Figure` with the object-oriented API (no
pyplot, no global figure state, nothing to close) in mplhep's ROOT style, applied only while
the figure is built (:mod:`analysis.plotting.style`). Results may be the records of
:mod:`analysis.fit`, :mod:`analysis.inference` and :mod:`analysis.optimize` or the JSON dicts
the ``diffana`` commands write. Write figures with :func:`save_figure`.

Distributions (:mod:`analysis.plotting.data_mc`)
    ``distribution(prediction, channel, data=None, *, edges=None, observable=None,
    log_y=False, text=None, signal=(), unit=None, experiment=None, config=None)``: stacked
    pre-/post-fit samples of one channel (:func:`analysis.prediction.prediction`), data with
    Poisson (Garwood) intervals, hatched total-uncertainty band, data/model ratio panel;
    with ``config`` the axis titles, units, bin width and experiment label come from the
    analysis. ``distributions(prediction, data=None, *, edges=None, observable=None,
    log_y=False, signal=(), blinded=(), config=None)``: ``{channel: Figure}`` for all channels.

Labels (:mod:`analysis.plotting.labels`)
    ``variable_label(config, variable)`` (title, unit) of a Definition (its ``Label`` /
    ``Description`` / ``Unit``), ``events_label(edges, unit)`` ("Events / 3 GeV", "Events /
    bin"), ``poisson_interval(counts)`` (Garwood), ``ExperimentLabel.from_config(config)``
    (mplhep's ``exp_label`` from ``General``: Experiment, Label, Luminosity, Energy).

Fit results (:mod:`analysis.plotting.fit`, after cabinetry's ``visualize``)
    ``pulls(fit_result, model, *, exclude=None, include_staterror=False)``: nuisance-parameter
    pulls ``(theta_hat - theta_0) / Delta theta`` with post-fit error bars on +-1/+-2 bands.
    ``correlation_matrix(fit_result, *, pruning_threshold=0.0, annotate=True)``.
    ``ranking(ranking_result, model=None, *, max_pars=None)``: pre-/post-fit impacts on the
    POI (top axis) and pulls (bottom axis), sorted by post-fit impact.
    ``likelihood_scan(scan_result, *, gaussian=True)``: ``-2 Delta ln L`` with 1 and 4 lines.

Limits (:mod:`analysis.plotting.limits`)
    ``cls_brazil(hypotest_result, limit=None, *, cl=None, poi_name="$\\mu$", log_y=False)``:
    observed and expected CLs against the POI with the green/yellow bands.

Optimization (:mod:`analysis.plotting.optimization`)
    ``optimization_history(result, *, ncols=3, config=None)``: relaxed and hard metric, each
    cut, and the tau/bandwidth schedule against the step. ``soft_vs_hard(soft, hard, *,
    observable="observable", text=None, unit=None, experiment=None)``: KDE histograms
    against hard ones.

Systematic variations (:mod:`analysis.plotting.templates`, after cabinetry's ``templates``)
    ``systematic_templates(nominal, up=None, down=None, *, observable="observable",
    text=None)``: nominal with its statistical band against the up/down variations, ratio
    panel. ``templates(histograms, *, observable=None)``: ``{(region, sample, systematic):
    Figure}`` for the ``diffana histograms`` output.

Output (:mod:`analysis.plotting.save`)
    ``save_figure(figure, path, formats=("png", "pdf"), *, dpi=150)``: atomic writes, returns
    the paths.
"""

from analysis.plotting.data_mc import distribution, distributions
from analysis.plotting.fit import correlation_matrix, likelihood_scan, pull_values, pulls, ranking
from analysis.plotting.limits import cls_brazil
from analysis.plotting.optimization import optimization_history, soft_vs_hard
from analysis.plotting.save import save_figure
from analysis.plotting.templates import systematic_templates, templates

__all__ = [
    "cls_brazil",
    "correlation_matrix",
    "distribution",
    "distributions",
    "likelihood_scan",
    "optimization_history",
    "pull_values",
    "pulls",
    "ranking",
    "save_figure",
    "soft_vs_hard",
    "systematic_templates",
    "templates",
]
