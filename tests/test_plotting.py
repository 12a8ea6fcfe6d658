"""Figures from real results: what is drawn equals the numbers of the result objects.

The fit, ranking, scan, hypotests and limit come from cabinetry's example workspace; the
optimization history from a real (short) ``optimize`` run on a generated sample; the soft and
hard histograms from :mod:`analysis.histograms`. Artists are found by their labels (or gids)
and their data compared with the inputs.
"""

from __future__ import annotations

import json

import matplotlib
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import yaml
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import StepPatch

from analysis import config as config_module
from analysis import fit as fitting
from analysis import inference, plotting
from analysis.histograms import hard_histogram, kde_histogram
from analysis.likelihood import Workspace
from analysis.optimize import optimize
from analysis.plotting import data_mc
from analysis.plotting import fit as fit_module
from analysis.plotting import labels as labels_module
from analysis.plotting import limits as limits_module
from analysis.plotting import optimization as optimization_module
from analysis.prediction import prediction
from tests.conftest import reference_path, write_tree

EDGES = [200.0, 300.0, 400.0, 500.0, 600.0]


@pytest.fixture(scope="module")
def example():
    """cabinetry's example: model, data and its real fit (MIGRAD + HESSE)."""
    ws = Workspace.load(reference_path("cabinetry", "example_workspace.json"))
    model = ws.model()
    data = ws.data(model)
    return model, data, fitting.fit_model(model, data)


def garwood_reference(counts):
    """The central 68.27% Poisson interval from its definition (Garwood 1936): ``low`` solves
    ``P(N >= n | low) = alpha/2`` and ``high`` solves ``P(N <= n | high) = alpha/2``, by root
    finding on scipy's Poisson distribution (``low = 0`` at ``n = 0``)."""
    from scipy.optimize import brentq
    from scipy.stats import poisson

    alpha = 1 - 0.6826894921370859

    def edges(n):
        low = 0.0 if n == 0 else brentq(lambda m: poisson.sf(n - 1, m) - alpha / 2, 1e-9, n)
        high = brentq(lambda m: poisson.cdf(n, m) - alpha / 2, n, n + 20 * np.sqrt(n + 1) + 5)
        return low, high

    low, high = zip(*(edges(n) for n in np.asarray(counts, dtype=float)), strict=True)
    return np.asarray(low), np.asarray(high)


def patches_by_label(ax) -> dict[str, StepPatch]:
    return {p.get_label(): p for p in ax.patches if isinstance(p, StepPatch)}


def line_by_label(ax, label: str):
    (line,) = [line for line in ax.lines if line.get_label() == label]
    return line


def errorbar_by_label(ax, label: str):
    (container,) = [c for c in ax.containers if c.get_label() == label]
    data_line, _, (bars,) = container
    x, y = data_line.get_data()  # errorbar keeps object arrays (for units)
    segments = bars.get_segments()
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float), segments


# ----------------------------------------------------------------------------- distributions
@pytest.mark.parametrize("post_fit", [False, True], ids=["prefit", "postfit"])
def test_distribution_draws_the_prediction(example, post_fit):
    model, data, result = example
    pred = prediction(model, result if post_fit else None)
    figures = plotting.distributions(pred, data, edges=EDGES, observable="jet pT [GeV]")
    assert list(figures) == ["Signal_region"]
    figure = figures["Signal_region"]
    assert isinstance(figure, Figure)
    ax, ratio_ax = figure.axes
    channel = pred["Signal_region"]
    counts = data[:4].numpy()

    patches = patches_by_label(ax)
    background, signal = patches["Background"].get_data(), patches["Signal"].get_data()
    np.testing.assert_allclose(background.values, channel.yields[0], rtol=1e-12)
    np.testing.assert_allclose(signal.baseline, channel.yields[0], rtol=1e-12)
    np.testing.assert_allclose(signal.values, channel.total, rtol=1e-12)  # top of the stack
    np.testing.assert_array_equal(signal.edges, EDGES)
    band = patches[data_mc.BAND_LABEL].get_data()
    np.testing.assert_allclose(band.values, channel.total + channel.total_stdev, rtol=1e-12)
    np.testing.assert_allclose(band.baseline, channel.total - channel.total_stdev, rtol=1e-12)
    assert patches[data_mc.BAND_LABEL].get_hatch()

    x, y, segments = errorbar_by_label(ax, data_mc.DATA_LABEL)
    np.testing.assert_allclose(x, [250.0, 350.0, 450.0, 550.0])
    np.testing.assert_array_equal(y, counts)
    low, high = garwood_reference(counts)  # Poisson intervals, not sqrt(n)
    np.testing.assert_allclose([s[0][1] for s in segments], low, rtol=1e-9)
    np.testing.assert_allclose([s[1][1] for s in segments], high, rtol=1e-9)

    _, ratio, ratio_segments = errorbar_by_label(ratio_ax, data_mc.DATA_LABEL)
    np.testing.assert_allclose(ratio, counts / channel.total, rtol=1e-12)
    np.testing.assert_allclose([s[1][1] for s in ratio_segments], high / channel.total)
    ratio_band = patches_by_label(ratio_ax)[data_mc.BAND_LABEL].get_data()
    np.testing.assert_allclose(ratio_band.values, 1 + channel.total_stdev / channel.total)
    low, high = ratio_ax.get_ylim()
    assert low <= np.min(ratio_band.baseline) and high >= np.max(ratio_band.values)
    assert ratio_ax.get_xlabel() == "jet pT [GeV]"


def test_signal_samples_are_stacked_on_top_and_keep_their_colours(example):
    """``signal`` moves those samples to the top of the stack (here, for the test, the
    background: in cabinetry's example the model's order already ends with the signal);
    each sample keeps its colour. The CLI takes them from Workspace.signal_samples."""
    model, data, _ = example
    ws = Workspace.load(reference_path("cabinetry", "example_workspace.json"))
    assert ws.signal_samples() == ("Signal",)
    pred = prediction(model)
    channel = pred["Signal_region"]
    default_ax = plotting.distribution(pred, "Signal_region", data).axes[0]
    legend = [t.get_text() for t in default_ax.get_legend().get_texts()]
    assert legend == [data_mc.DATA_LABEL, data_mc.BAND_LABEL, "Signal", "Background"]  # top down
    default = patches_by_label(default_ax)
    flipped = patches_by_label(
        plotting.distribution(pred, "Signal_region", data, signal=("Background",)).axes[0]
    )
    background, signal = flipped["Background"].get_data(), flipped["Signal"].get_data()
    np.testing.assert_allclose(signal.values, channel.yields[1], rtol=1e-12)
    np.testing.assert_allclose(background.baseline, channel.yields[1], rtol=1e-12)
    np.testing.assert_allclose(background.values, channel.total, rtol=1e-12)
    for name in ("Background", "Signal"):
        assert default[name].get_facecolor() == flipped[name].get_facecolor()


def test_distribution_without_data_or_edges(example):
    model, _, _ = example
    pred = prediction(model)
    figure = plotting.distribution(pred, "Signal_region")
    ax, ratio_ax = figure.axes
    assert data_mc.DATA_LABEL not in patches_by_label(ax)
    assert not ax.containers
    np.testing.assert_array_equal(patches_by_label(ax)["Signal"].get_data().edges, np.arange(5))
    assert ratio_ax.get_xlabel() == "bin"
    with pytest.raises(ValueError, match="unknown channel"):
        plotting.distribution(pred, "CR")
    with pytest.raises(ValueError, match="4 bins but 3 bin edges"):
        plotting.distribution(pred, "Signal_region", edges=[0.0, 1.0, 2.0])


def test_poisson_interval_is_garwoods():
    """Against the interval's definition (root finding on scipy's Poisson cdf), against hist's
    ``intervals.poisson_interval`` (n > 0) and at n = 0, where the upper edge is -ln(alpha/2)
    = 1.841 (the upper error bar of an empty bin); Asimov (non-integer) counts have the same formula
    with real degrees of freedom, between the neighbouring integers' intervals."""
    from hist.intervals import poisson_interval as hist_interval

    from analysis.plotting import labels

    counts = np.array([0.0, 1.0, 2.0, 7.0, 30.0, 250.0])
    low, high = labels.poisson_interval(counts)
    ref_low, ref_high = garwood_reference(counts)
    np.testing.assert_allclose(low, ref_low, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(high, ref_high, rtol=1e-9)
    # hist gives NaN at n = 0 (its scale sumw2 / sumw is 0 / 0): why diffana has its own
    hist_low, hist_high = hist_interval(counts, counts)
    assert np.isnan(hist_high[0])
    np.testing.assert_allclose(high[1:], hist_high[1:], rtol=1e-9)
    np.testing.assert_allclose(low[1:], hist_low[1:], rtol=1e-9)
    assert low[0] == 0.0 and high[0] == pytest.approx(-np.log((1 - labels.ONE_SIGMA) / 2))
    assert high[0] == pytest.approx(1.8410216, rel=1e-7)
    errors = labels.poisson_errors([0.0, 4.0, 2.5])
    np.testing.assert_allclose(errors[:, 0], [0.0, 1.8410216], rtol=1e-7)
    integer_low, _ = labels.poisson_interval([2.0, 3.0])
    assert integer_low[0] < labels.poisson_interval([2.5])[0][0] < integer_low[1]


def test_bin_width_labels():
    assert labels_module.events_label([120, 123, 126, 129], "GeV") == "Events / 3 GeV"
    assert labels_module.events_label([0.0, 2.5, 5.0], "GeV") == "Events / 2.5 GeV"
    assert labels_module.events_label(np.linspace(0.0, 0.5, 11)) == "Events / 0.05"
    assert labels_module.events_label([0.0, 0.1, 0.2, 0.30000000000000004], "cm") == (
        "Events / 0.1 cm"
    )
    assert labels_module.events_label([0, 10, 30, 100], "GeV") == "Events / bin"
    assert labels_module.events_label(None, "GeV") == "Events / bin"
    assert labels_module.split_unit("invariant mass of the two muons [GeV]") == (
        "invariant mass of the two muons",
        "GeV",
    )
    assert labels_module.split_unit("isolation (a fraction)") == ("isolation (a fraction)", None)


@pytest.fixture(scope="module")
def labelled():
    """A two-region analysis unlike the demo (no ROOT file is read): a Definition with a
    Unit, one with the unit only in its Description, one with a Label; variable bins in one
    region; the experiment label in General; and a workspace whose data have an empty bin."""
    raw = {
        "General": {
            "Measurement": "m",
            "POI": "mu",
            "InputPath": "unused/{SamplePath}",
            "Experiment": "CMS",
            "Label": "Open Data",
            "Luminosity": 11.6,
            "Energy": 8,
        },
        "Definitions": [
            {"Name": "m4l", "Expression": "x * 2", "Description": "four-lepton mass [MeV]",
             "Unit": "GeV"},
            {"Name": "ht", "Expression": "x + 1", "Description": "scalar sum of jet pT [GeV]",
             "Label": "$H_T$"},
        ],
        "Regions": [
            {"Name": "A", "Variable": "m4l", "Binning": [100.0, 102.5, 105.0, 107.5]},
            {"Name": "B", "Variable": "ht", "Binning": [0.0, 50.0, 150.0]},
            {"Name": "C", "Variable": "x", "Binning": [0.0, 0.05, 0.1]},
        ],
        "Samples": [
            {"Name": "Data", "Tree": "t", "SamplePath": "d.root", "Data": True},
            {"Name": "S", "Tree": "t", "SamplePath": "s.root"},
            {"Name": "B", "Tree": "t", "SamplePath": "b.root"},
        ],
        "NormFactors": [{"Name": "mu", "Samples": "S", "Nominal": 1, "Bounds": [0, 10]}],
    }  # fmt: skip
    config = config_module.from_dict(raw, source="labelled.yaml")

    def channel(name, background, signal):
        return {
            "name": name,
            "samples": [
                {"name": "B", "data": background, "modifiers": [
                    {"name": f"staterror_{name}", "type": "staterror",
                     "data": [0.1 * b for b in background]}]},
                {"name": "S", "data": signal, "modifiers": [
                    {"name": "mu", "type": "normfactor", "data": None}]},
            ],
        }  # fmt: skip

    spec = {
        "channels": [
            channel("A", [5.0, 3.0, 1.0], [0.5, 2.0, 0.2]),
            channel("B", [8.0, 4.0], [1.0, 0.5]),
            channel("C", [2.0, 2.0], [0.1, 0.1]),
        ],
        "observations": [
            {"name": "A", "data": [6.0, 0.0, 2.0]},
            {"name": "B", "data": [9.0, 3.0]},
            {"name": "C", "data": [40.0, 1.0]},
        ],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }
    return config, Workspace.load(spec)


def test_axis_titles_units_and_experiment_label(labelled):
    """What the axes say comes from the configuration: the Definition's Unit over the one in
    its Description, its Label over its Description, none for a raw branch; the y axis says
    the bin width with the unit, or "Events / bin" for bins of different widths; the experiment
    label (mplhep) names the experiment, the text, luminosity and energy. An empty data bin
    has the error bar 0 .. 1.84; a data / model point above the ratio panel is marked at its
    edge."""
    config, ws = labelled
    model = ws.model()
    pred, data = prediction(model), ws.data(model, include_auxdata=False)
    figures = {
        # the experiment label is drawn once (mplhep draws the figure to place it: slow)
        name: plotting.distribution(
            pred, name, data, config=config, experiment=None if name == "A" else no_label
        )
        for name, no_label in zip(
            "ABC", [None, *[labels_module.ExperimentLabel()] * 2], strict=True
        )
    }
    texts = [t.get_text() for t in figures["A"].axes[0].texts]
    assert "CMS" in texts and "Open Data" in texts
    assert "11.6 fb$^{-1}$ (8 TeV)" in texts
    assert labels_module.ExperimentLabel.from_config(config) == labels_module.ExperimentLabel(
        "CMS", "Open Data", 11.6, 8.0
    )
    titles = {}
    for name, figure in figures.items():
        ax, ratio_ax = figure.axes
        titles[name] = (ax.get_ylabel(), ratio_ax.get_xlabel())
    assert titles == {
        "A": ("Events / 2.5 GeV", "four-lepton mass [GeV]"),
        "B": ("Events / bin", "$H_T$ [GeV]"),
        "C": ("Events / 0.05", "x"),
    }
    ax, ratio_ax = figures["A"].axes
    x, y, segments = errorbar_by_label(ax, data_mc.DATA_LABEL)
    assert y[1] == 0.0
    assert segments[1][0][1] == 0.0 and segments[1][1][1] == pytest.approx(1.8410216, rel=1e-7)
    ax, ratio_ax = figures["C"].axes
    top = ratio_ax.get_ylim()[1]
    (marker,) = [line for line in ratio_ax.lines if line.get_gid() == data_mc.OFF_SCALE_GID]
    assert list(marker.get_xdata()) == [0.025] and marker.get_ydata()[0] < top
    assert 40.0 / 2.1 > top  # the point itself is off the panel
    # the effective-events figure of the report takes the same titles and sample colours
    from analysis.plotting.mc_statistics import effective_events_per_bin, line_gid
    from analysis.plotting.style import sample_colours

    table = {"initial": {"A": {"B": [10.0, 20.0, 30.0], "background": [10.0, 20.0, 30.0]}}}
    (mc_ax,) = effective_events_per_bin(table, minimum=10.0, config=config).axes
    assert mc_ax.get_xlabel() == "four-lepton mass [GeV]"
    (line,) = [p for p in mc_ax.patches if p.get_gid() == line_gid("initial", "A", "B")]
    np.testing.assert_array_equal(line.get_data().edges, [100.0, 102.5, 105.0, 107.5])
    assert matplotlib.colors.same_color(line.get_edgecolor(), sample_colours(["S", "B"])["B"])
    # without the configuration: no unit, no label, as before
    plain = plotting.distribution(prediction(model), "A", edges=[100.0, 102.5, 105.0, 107.5])
    assert plain.axes[0].get_ylabel() == "Events / 2.5"
    assert not plain.axes[0].texts[1:]  # only the corner text


# ----------------------------------------------------------------------------- fit results
def test_pulls(example):
    model, _, result = example
    names = list(model.par_names)
    nominal = model.suggested_init().numpy()  # 0 for the alphas, 1 for the staterror gammas
    width = model.prefit_uncertainties().numpy()
    bestfit, uncertainty = result.bestfit.numpy(), result.uncertainty.numpy()

    figure = plotting.pulls(result, model)
    (ax,) = figure.axes
    shown = [t.get_text() for t in ax.get_yticklabels()]
    # the POI (unconstrained) and the staterror gammas are left out by default
    assert shown == ["Modeling", "WeightBasedModeling", "Luminosity"]
    x, y, segments = errorbar_by_label(ax, "pull")
    index = [names.index(name) for name in shown]
    np.testing.assert_allclose(x, (bestfit[index] - nominal[index]) / width[index], rtol=1e-12)
    half_widths = [(s[1][0] - s[0][0]) / 2 for s in segments]
    np.testing.assert_allclose(half_widths, uncertainty[index] / width[index], rtol=1e-12)
    np.testing.assert_array_equal(y, [2.0, 1.0, 0.0])  # top to bottom in the model's order
    bands = sorted(
        (
            tuple(np.round(c.get_paths()[0].get_extents().intervalx, 12))
            for c in ax.collections
            if isinstance(c, PolyCollection)
        ),
        key=lambda interval: interval[1],
    )
    assert bands == [(-1.0, 1.0), (-2.0, 2.0)]

    with_gammas = plotting.pulls(
        result.to_dict(), model, include_staterror=True, exclude="Modeling"
    )
    (ax,) = with_gammas.axes
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert shown == ["WeightBasedModeling", "Luminosity"] + [
        f"staterror_Signal_region[{i}]" for i in range(4)
    ]
    x, _, _ = errorbar_by_label(ax, "pull")
    gamma = names.index("staterror_Signal_region[2]")
    assert x[4] == pytest.approx((bestfit[gamma] - 1.0) / width[gamma], rel=1e-12)


def test_correlation_matrix(example):
    model, data, result = example
    figure = plotting.correlation_matrix(result)
    assert len(figure.axes) == 2  # matrix and colour bar
    ax = figure.axes[0]
    (image,) = ax.images
    np.testing.assert_allclose(image.get_array(), result.corr_mat.numpy(), rtol=1e-12)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(result.labels)

    # cabinetry's pruning: keep a parameter when any |correlation| with another is >= 0.2
    corr = result.corr_mat.numpy()
    off_diagonal = np.abs(corr - np.diag(np.diag(corr)))
    keep = [name for name, row in zip(result.labels, off_diagonal, strict=True) if row.max() >= 0.2]
    assert keep == ["Modeling", "WeightBasedModeling", "Signal_norm"]
    pruned = plotting.correlation_matrix(result, pruning_threshold=0.2, annotate=False)
    ax = pruned.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == keep
    assert ax.images[0].get_array().shape == (3, 3) and not ax.texts

    # a parameter fixed in the fit has an all-zero row and is left out
    fixed = model.suggested_fixed().clone()
    fixed[list(model.par_names).index("Luminosity")] = True
    fixed_fit = fitting.fit_model(model, data, fixed=fixed, method="newton")
    ax = plotting.correlation_matrix(fixed_fit).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "Luminosity" not in labels and len(labels) == model.npars - 1


def test_ranking(example):
    model, data, result = example
    rank = inference.ranking(model, data, result)
    mean_impact = (np.abs(rank.postfit_up.numpy()) + np.abs(rank.postfit_down.numpy())) / 2
    order = np.argsort(-mean_impact, kind="stable")

    figure = plotting.ranking(rank, model)
    assert len(figure.axes) == 2
    ax_pulls, ax_impact = figure.axes
    shown = [t.get_text() for t in ax_pulls.get_yticklabels()]
    assert shown == [rank.labels[i] for i in order]
    assert shown[:2] == ["Modeling", "WeightBasedModeling"]
    bars = [c for c in ax_impact.containers]
    assert len(bars) == 4  # pre-fit up/down (empty), post-fit up/down (filled)
    for container, values in zip(
        bars, (rank.prefit_up, rank.prefit_down, rank.postfit_up, rank.postfit_down), strict=True
    ):
        widths = [patch.get_width() for patch in container]
        np.testing.assert_allclose(widths, values.numpy()[order], rtol=1e-12)
    assert not bars[0].patches[0].get_fill() and bars[2].patches[0].get_fill()
    # pulls in units of the pre-fit width, for the constrained parameters
    names = list(model.par_names)
    index = [names.index(rank.labels[i]) for i in order]
    nominal = model.suggested_init().numpy()[index]
    width = model.prefit_uncertainties().numpy()[index]
    (container,) = ax_pulls.containers
    x, _ = container.lines[0].get_data()
    np.testing.assert_allclose(x, (rank.bestfit.numpy()[order] - nominal) / width, rtol=1e-12)

    top3 = plotting.ranking(rank.to_dict(), max_pars=3)  # JSON form, raw pulls as cabinetry
    ax_pulls, ax_impact = top3.axes
    assert [t.get_text() for t in ax_pulls.get_yticklabels()] == shown[:3]
    (container,) = ax_pulls.containers
    np.testing.assert_allclose(
        container.lines[0].get_data()[0], rank.bestfit.numpy()[order[:3]], rtol=1e-12
    )


def test_likelihood_scan(example):
    model, data, _ = example
    scan = inference.scan(model, data, "Signal_norm", n_steps=7)
    figure = plotting.likelihood_scan(scan)
    (ax,) = figure.axes
    line = line_by_label(ax, fit_module.SCAN_LABEL)
    np.testing.assert_allclose(line.get_xdata(), scan.values.numpy(), rtol=1e-12)
    np.testing.assert_allclose(line.get_ydata(), scan.delta_twice_nll.numpy(), rtol=1e-12)
    levels = sorted(
        line.get_ydata()[0]
        for line in ax.lines
        if line.get_linestyle() == ":" and line.get_ydata()[0] == line.get_ydata()[1]
    )
    assert levels == [1.0, 4.0]
    gauss = line_by_label(ax, fit_module.GAUSSIAN_LABEL)
    x = np.asarray(gauss.get_xdata())
    expected = ((x - scan.bestfit) / scan.uncertainty) ** 2
    np.testing.assert_allclose(gauss.get_ydata(), expected, rtol=1e-12)
    assert ax.get_ylim()[1] >= 4.0 and ax.get_xlabel() == "Signal_norm"
    same = plotting.likelihood_scan(scan.to_dict()).axes[0]
    np.testing.assert_array_equal(
        line_by_label(same, fit_module.SCAN_LABEL).get_ydata(), line.get_ydata()
    )


# ----------------------------------------------------------------------------- limits
def test_cls_brazil(example):
    model, data, _ = example
    mu = torch.linspace(0.2, 4.0, 9, dtype=torch.float64)
    tests = inference.hypotest(model, data, mu)
    limit = inference.upper_limit(model, data)
    figure = plotting.cls_brazil(tests, limit)
    (ax,) = figure.axes
    exp = tests.cls_exp.numpy()
    bands = {c.get_label(): c for c in ax.collections if isinstance(c, PolyCollection)}
    for label, (low, high) in (
        (limits_module.ONE_SIGMA_LABEL, (1, 3)),
        (limits_module.TWO_SIGMA_LABEL, (0, 4)),
    ):
        vertices = bands[label].get_paths()[0].vertices
        for k, x in enumerate(mu.numpy()):
            at_x = vertices[np.isclose(vertices[:, 0], x), 1]
            assert at_x.min() == pytest.approx(min(exp[k, low], exp[k, high]), rel=1e-12)
            assert at_x.max() == pytest.approx(max(exp[k, low], exp[k, high]), rel=1e-12)
    observed = line_by_label(ax, limits_module.OBSERVED_LABEL)
    np.testing.assert_allclose(observed.get_ydata(), tests.cls_obs.numpy(), rtol=1e-12)
    expected = line_by_label(ax, limits_module.EXPECTED_LABEL)
    np.testing.assert_allclose(expected.get_ydata(), exp[:, 2], rtol=1e-12)
    target = line_by_label(ax, "CL$_s$ = 0.05")
    assert list(target.get_ydata()) == pytest.approx([0.05, 0.05])
    vertical = sorted(
        line.get_xdata()[0] for line in ax.lines if line.get_xdata()[0] == line.get_xdata()[1]
    )
    assert vertical == pytest.approx(sorted([limit.observed, limit.expected[2]]), rel=1e-12)
    # the dict forms (``diffana hypotest``/``limit`` JSON) draw the same
    again = plotting.cls_brazil(tests.to_dict(), limit.to_dict()).axes[0]
    np.testing.assert_array_equal(
        line_by_label(again, limits_module.OBSERVED_LABEL).get_ydata(), observed.get_ydata()
    )
    # blinded: the expected curve, bands and limit only
    blind = plotting.cls_brazil(tests, limit, observed=False).axes[0]
    labels = blind.get_legend_handles_labels()[1]
    assert limits_module.OBSERVED_LABEL not in labels
    assert not any(label.startswith("observed") for label in labels)
    np.testing.assert_allclose(
        line_by_label(blind, limits_module.EXPECTED_LABEL).get_ydata(), exp[:, 2], rtol=1e-12
    )
    lines = [line.get_xdata() for line in blind.lines]
    vertical = [x[0] for x in lines if x[0] == x[1]]
    assert vertical == pytest.approx([limit.expected[2]], rel=1e-12)


# ----------------------------------------------------------------------------- optimization
@pytest.fixture(scope="module")
def optimization_run(tmp_path_factory):
    """A real 4-step ``optimize`` run: two cuts on a generated sample, hard every 2 steps."""
    folder = tmp_path_factory.mktemp("optimize")
    rng = np.random.default_rng(3)
    for tree, n, shift in (("sig", 1500, 2.0), ("bkg", 3000, 0.0), ("data", 3000, 0.0)):
        write_tree(
            folder / "mc.root",
            tree,
            {
                "v": rng.normal(shift, 1.0, n),
                "u": rng.exponential(1.0 + shift, n),
                "obs": rng.uniform(0.0, 1.0, n),
                "w": np.full(n, 0.1 if tree == "sig" else 1.0),
            },
        )
    raw = {
        "General": {"Measurement": "m", "POI": "mu", "InputPath": str(folder / "{SamplePath}")},
        "Regions": [
            {
                "Name": "SR",
                "Variable": "obs",
                "Binning": [0.0, 0.5, 1.0],
                "Cuts": [
                    {"Variable": "v", "Direction": ">", "Value": 0.5, "Bounds": [-2.0, 4.0]},
                    {"Variable": "u", "Direction": ">", "Value": 0.2, "Bounds": [0.0, 5.0]},
                ],
            }
        ],
        "Samples": [
            {"Name": "Data", "Tree": "data", "SamplePath": "mc.root", "Data": True},
            {"Name": "Signal", "Tree": "sig", "SamplePath": "mc.root", "Weight": "w"},
            {"Name": "Background", "Tree": "bkg", "SamplePath": "mc.root", "Weight": "w"},
        ],
        "NormFactors": [{"Name": "mu", "Samples": "Signal", "Nominal": 1, "Bounds": [0, 10]}],
        "Optimization": {
            "Objective": "asimov_significance",
            "Steps": 4,
            "LearningRate": 0.1,
            "Bandwidth": 0.3,
            "Temperature": {"Initial": 0.2, "Final": 0.02, "Schedule": "exponential"},
            "EvaluateEvery": 2,
            "CheckpointEvery": 100,
        },
    }
    config = config_module.from_dict(raw, source="plotting.yaml")
    out = folder / "out"
    result = optimize(config, out_dir=out, progress=False, cache_dir=folder / "cache")
    return result, json.loads((out / "result.json").read_text())


def test_optimization_history(optimization_run):
    result, saved = optimization_run
    history = result.history
    cuts = list(history[0]["cuts"])
    assert cuts == ["SR:v>", "SR:u>"]
    steps = [entry["step"] for entry in history]
    for source in (result, saved):
        figure = plotting.optimization_history(source)
        axes = figure.axes
        assert len(axes) == 1 + len(cuts) + 1  # metric, one per cut, schedule
        metric = axes[0]
        relaxed = line_by_label(metric, optimization_module.RELAXED_LABEL)
        np.testing.assert_array_equal(relaxed.get_xdata(), steps)
        np.testing.assert_allclose(relaxed.get_ydata(), [e["relaxed"] for e in history])
        hard = line_by_label(metric, optimization_module.HARD_LABEL)
        evaluated = [e for e in history if e.get("hard") is not None]
        assert [e["step"] for e in evaluated] == [0, 2]
        np.testing.assert_allclose(hard.get_ydata(), [e["hard"] for e in evaluated])
        final = line_by_label(metric, optimization_module.FINAL_LABEL)  # after the last update
        assert list(final.get_xdata()) == [len(history)]
        assert list(final.get_ydata()) == [result.final.hard]
        best = line_by_label(metric, optimization_module.BEST_LABEL)
        assert list(best.get_ydata()) == [result.best.hard]
        assert result.best.hard == max(e["hard"] for e in evaluated + [result.final.to_dict()])
        for ax, name in zip(axes[1:-1], cuts, strict=True):
            assert ax.get_title() == name
            line = line_by_label(ax, name)
            np.testing.assert_allclose(line.get_ydata(), [e["cuts"][name] for e in history])
        schedule = axes[-1]
        tau = line_by_label(schedule, optimization_module.TAU_LABEL)
        bandwidth = line_by_label(schedule, optimization_module.BANDWIDTH_LABEL)
        np.testing.assert_allclose(tau.get_ydata(), [e["tau"] for e in history])
        np.testing.assert_allclose(bandwidth.get_ydata(), [e["bandwidth"] for e in history])
        assert tau.get_ydata()[0] == pytest.approx(0.2) and tau.get_ydata()[-1] == pytest.approx(
            0.02
        )
    # the grid/random baselines have no relaxed metric and no schedule
    baseline = dict(
        saved, history=[{k: e.get(k) for k in ("step", "cuts", "hard")} for e in history]
    )
    figure = plotting.optimization_history(baseline)
    assert len(figure.axes) == 1 + len(cuts)
    assert optimization_module.RELAXED_LABEL not in [
        line.get_label() for line in figure.axes[0].lines
    ]


def test_soft_vs_hard():
    rng = np.random.default_rng(5)
    edges = torch.linspace(0.0, 10.0, 11, dtype=torch.float64)
    histograms = {}
    for name, scale in (("Signal", 2.0), ("Background", 4.0)):
        values = torch.as_tensor(rng.exponential(scale, 4000))
        weights = torch.full_like(values, 0.5)
        histograms[name] = (
            kde_histogram(values, weights, edges, 0.3 * 1.0),
            hard_histogram(values, weights, edges),
        )
    soft = {name: pair[0] for name, pair in histograms.items()}
    hard = {name: pair[1] for name, pair in histograms.items()}
    figure = plotting.soft_vs_hard(soft, hard, observable="x")
    ax, ratio_ax = figure.axes
    by_gid = {p.get_gid(): p.get_data() for a in (ax, ratio_ax) for p in a.patches}
    for name in ("Signal", "Background"):
        np.testing.assert_allclose(by_gid[f"hard:{name}"].values, hard[name].yields.numpy())
        np.testing.assert_allclose(by_gid[f"soft:{name}"].values, soft[name].yields.numpy())
        np.testing.assert_allclose(
            by_gid[f"ratio:{name}"].values, (soft[name].yields / hard[name].yields).numpy()
        )
    # the hard histograms carry sqrt(sumw2) error bars at the bin centres
    drawn = [c for c in ax.containers if len(c.lines[0].get_xdata())]
    assert len(drawn) == 2
    for container, name in zip(drawn, ("Signal", "Background"), strict=True):
        x, y = (np.asarray(v, dtype=float) for v in container.lines[0].get_data())
        np.testing.assert_allclose(x, np.arange(10) + 0.5)
        np.testing.assert_allclose(y, hard[name].yields.numpy())
        half_widths = [(seg[1][1] - seg[0][1]) / 2 for seg in container.lines[2][0].get_segments()]
        np.testing.assert_allclose(half_widths, hard[name].stdev.numpy(), rtol=1e-12)
    single = plotting.soft_vs_hard(soft["Signal"], hard["Signal"])
    assert {p.get_gid() for p in single.axes[0].patches} == {"hard:", "soft:"}
    with pytest.raises(ValueError, match="different keys"):
        plotting.soft_vs_hard(soft, {"Signal": hard["Signal"]})


# ----------------------------------------------------------------------------- output, style
def test_save_figure_writes_atomically(example, tmp_path):
    model, data, result = example
    figure = plotting.distribution(prediction(model, result), "Signal_region", data, edges=EDGES)
    paths = plotting.save_figure(figure, tmp_path / "plots" / "postfit")
    assert paths == [tmp_path / "plots" / "postfit.png", tmp_path / "plots" / "postfit.pdf"]
    image = matplotlib.image.imread(paths[0])
    assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 500
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas
    assert paths[1].read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["postfit.pdf", "postfit.png"]
    (svg,) = plotting.save_figure(figure, tmp_path / "pulls.svg")
    assert svg == tmp_path / "pulls.svg" and b"<svg" in svg.read_bytes()[:1000]
    # an existing file is replaced; a dot in a stem is not taken for a format
    again = plotting.save_figure(figure, tmp_path / "plots" / "postfit", formats=("png",))
    assert again == [paths[0]]
    (dotted,) = plotting.save_figure(figure, tmp_path / "fit.v2", formats=("png",))
    assert dotted.name == "fit.v2.png"
    with pytest.raises(ValueError, match="unsupported figure format"):
        plotting.save_figure(figure, tmp_path / "x", formats=("docx",))


def test_no_global_state(example):
    """No pyplot figures are opened and the caller's rcParams are left as they were."""
    model, _, result = example
    before = dict(matplotlib.rcParams)
    open_figures = plt.get_fignums()
    plotting.pulls(result, model)
    plotting.correlation_matrix(result)
    assert dict(matplotlib.rcParams) == before
    assert plt.get_fignums() == open_figures


# ----------------------------------------------------------------------------- templates
@pytest.fixture
def cabinetry_histograms(tmp_path):
    """`diffana histograms` of cabinetry's example (real ntuples): (path, payload)."""
    from click.testing import CliRunner

    from analysis.cli import main

    raw = yaml.safe_load(reference_path("cabinetry", "config_example.yml").read_text())
    raw["General"]["InputPath"] = str(reference_path("cabinetry", "ntuples") / "{SamplePath}")
    config_path = tmp_path / "cabinetry.yml"
    config_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "histograms.json"
    result = CliRunner().invoke(
        main,
        ["histograms", str(config_path), "-o", str(out), "--device", "cpu", "--no-cache"],
    )
    assert result.exit_code == 0, result.output
    return config_path, out, json.loads(out.read_text())


def test_systematic_templates(cabinetry_histograms):
    """cabinetry's Modeling (tree-based up, symmetrized down) and WeightBasedModeling (weights
    up and down) of its Background: nominal, variations, mirror and ratios as drawn."""
    _, _, payload = cabinetry_histograms
    figures = plotting.templates(payload, observable="jet_pt")
    region = "Signal_region"
    assert set(figures) == {
        (region, "Background", "Modeling"),
        (region, "Background", "WeightBasedModeling"),
    }
    variations = payload[region]["Background"]
    n = np.asarray(variations["nominal"]["yields"])
    up = np.asarray(variations["Modeling_Up"]["yields"])
    ax, ratio_ax = figures[(region, "Background", "Modeling")].axes
    drawn = {p.get_gid(): p.get_data() for p in ax.patches if p.get_gid()}
    np.testing.assert_allclose(drawn["nominal"].values, n, rtol=1e-12)
    np.testing.assert_allclose(drawn["up"].values, up, rtol=1e-12)
    np.testing.assert_allclose(drawn["down"].values, 2 * n - up, rtol=1e-12)  # symmetrized
    ratios = {p.get_gid(): p.get_data() for p in ratio_ax.patches if p.get_gid()}
    np.testing.assert_allclose(ratios["ratio:up"].values, up / n, rtol=1e-12)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"up: {100 * (up.sum() / n.sum() - 1):+.1f}% yield" in labels
    assert any(label.startswith("down (symmetrized): ") for label in labels)
    assert ratio_ax.get_xlabel() == "jet_pt"
    ax, _ = figures[(region, "Background", "WeightBasedModeling")].axes
    drawn = {p.get_gid(): p.get_data() for p in ax.patches if p.get_gid()}
    down = np.asarray(variations["WeightBasedModeling_Down"]["yields"])
    np.testing.assert_allclose(drawn["down"].values, down, rtol=1e-12)
    np.testing.assert_allclose(down, 0.7 * n, rtol=1e-9)  # Weight "0.7*weight"


def test_plot_templates_cli(cabinetry_histograms, tmp_path):
    from click.testing import CliRunner

    from analysis.cli import main

    config_path, histograms, _ = cabinetry_histograms
    stem = tmp_path / "plots" / "templates"
    result = CliRunner().invoke(
        main, ["plot", "templates", str(histograms), "--config", str(config_path), "--out", stem]
    )
    assert result.exit_code == 0, result.output
    for name in ("Modeling", "WeightBasedModeling"):
        png = tmp_path / "plots" / f"templates_Signal_region_Background_{name}.png"
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[0] > 200 and float(np.std(pixels[..., :3])) > 0.05
        assert png.with_suffix(".pdf").stat().st_size > 0
    # bad input: one line naming the file, exit 2, nothing written
    wrong = tmp_path / "fit.json"
    wrong.write_text(json.dumps({"labels": ["mu"], "bestfit": [1.0]}))
    bad = CliRunner().invoke(main, ["plot", "templates", str(wrong), "--out", tmp_path / "x"])
    assert bad.exit_code == 2 and str(wrong) in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("x*"))


@pytest.mark.parametrize(
    ("command", "payload", "needle"),
    [
        (["pulls", "--workspace", "WS"], {"labels": ["mu"], "bestfit": [1.0]}, "no 'uncertainty'"),
        (
            ["correlation"],
            {"labels": ["a", "b"], "bestfit": [1, 2], "uncertainty": [1, 1], "corr_mat": [[1]],
             "twice_nll": 1.0},
            "not a valid fit file",
        ),
        (["ranking"], {"ranking": [{"name": "x"}]}, "not a valid ranking file: no 'bestfit'"),
        (["cls"], {"cl": 0.95, "observed": 1, "expected": [1], "scan": {}}, "not a valid limit"),
        (["cutflow"], {"start": {"SR": {"region": "SR"}}}, "not a valid cut flow file"),
        (["optimization"], {"objective": "x", "history": []}, "not a valid optimization result"),
    ],
    ids=["pulls", "correlation", "ranking", "cls", "cutflow", "optimization"],
)  # fmt: skip
def test_plot_commands_reject_malformed_result_files(tmp_path, command, payload, needle):
    """One line naming the file and what is wrong, exit code 2, no traceback, nothing written."""
    from click.testing import CliRunner

    from analysis.cli import main

    path = tmp_path / "result.json"
    path.write_text(json.dumps(payload))
    ws = str(reference_path("cabinetry", "example_workspace.json"))
    args = [ws if a == "WS" else a for a in command]
    out = str(tmp_path / "x")
    result = CliRunner().invoke(main, ["plot", args[0], str(path), *args[1:], "--out", out])
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and needle in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not list(tmp_path.glob("x*"))
