"""Cut flow: numbers against uproot + numpy on the ROOT files, the last step against the hard
histograms, starting vs optimized cuts, the report tables and the cut-flow chart."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import uproot
import yaml
from matplotlib.figure import Figure

from analysis import config as config_module
from analysis import generate
from analysis.cutflow import (
    IN_RANGE_STEP,
    PRESELECTION_STEP,
    TOTAL_PREDICTION,
    CutFlow,
    cut_comparison,
    cut_flow,
    cut_flow_table,
    format_yield,
)
from analysis.errors import ConfigError
from analysis.histograms import hard_histograms
from analysis.io import read_events
from analysis.plotting.cutflow import cutflow_chart
from analysis.report import Section, Table, build_report, format_value
from tests.test_report import Parsed, decode_png

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
MUON_MASS = 0.1056584
#: the tuned cuts of analysis.generate's docstring (the leading-muon cut keeps its value)
OPTIMIZED = {"mu2_pt": 20.0, "iso": 0.08, "met": 30.0, "btag": 0.2}
RTOL = 1e-12


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo analysis on 4000 generated events, its nominal events and its folder."""
    folder = tmp_path_factory.mktemp("cutflow")
    generate.generate(folder / "generated", events=4000, seed=3)
    raw = yaml.safe_load((MODELS / "dimuon.yaml").read_text())
    raw["General"]["InputPath"] = str(folder / "generated" / "{SamplePath}")
    config = config_module.from_dict(raw, source="dimuon.yaml")
    events = read_events(config, cache_dir=folder / "cache")
    return config, events, folder


@pytest.fixture(scope="module")
def all_flows(demo):
    """The cut flows of every region (signal and control), at the start and optimized cuts."""
    config, events, _ = demo
    return cut_flow(config, events), cut_flow(config, events, cuts=OPTIMIZED)


@pytest.fixture(scope="module")
def flows(all_flows):
    return all_flows[0]["SR"], all_flows[1]["SR"]


def numpy_columns(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The demo's Filter and cut variables, computed with uproot (numpy arrays) and numpy."""
    branches = ["Muon_pt", "Muon_eta", "Muon_phi", "Muon_charge", "Muon_iso", "Jet_btag"]
    with uproot.open(path) as file:
        tree = file["events"]
        names = branches + ["MET_pt"] + (["weight"] if "weight" in tree.keys() else [])
        arrays = tree.arrays(names, library="np")

    def leading_two(name: str) -> np.ndarray:  # the skim guarantees two muons per event
        return np.stack([muons[:2] for muons in arrays[name]]).astype(np.float64)

    pt, eta, phi = leading_two("Muon_pt"), leading_two("Muon_eta"), leading_two("Muon_phi")
    charge, iso = leading_two("Muon_charge"), leading_two("Muon_iso")
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    energy = np.sqrt(px**2 + py**2 + pz**2 + MUON_MASS**2)
    mass2 = energy.sum(1) ** 2 - px.sum(1) ** 2 - py.sum(1) ** 2 - pz.sum(1) ** 2
    n = len(pt)
    return {
        "filter": charge[:, 0] * charge[:, 1] < 0,
        "weight": arrays["weight"].astype(np.float64) if "weight" in arrays else np.ones(n),
        "mu1_pt": pt[:, 0],
        "mu2_pt": pt[:, 1],
        "iso_max": np.maximum(iso[:, 0], iso[:, 1]),
        "MET_pt": arrays["MET_pt"].astype(np.float64),
        "btag_max": np.array([jets.max() if len(jets) else 0.0 for jets in arrays["Jet_btag"]]),
        "mass": np.sqrt(mass2),
    }


def numpy_cut_flow(
    config, region, sample_name: str, folder: pathlib.Path, values: dict[str, float]
):
    """Per step: (events, sum w, sum w^2, events within 1 MeV of a range edge, their sum |w|)."""
    sample = next(s for s in config.samples if s.name == sample_name)
    columns = numpy_columns(folder / "generated" / sample.sample_paths[0])
    weight = columns["weight"]
    mask = columns["filter"].copy()
    masks = [mask]
    for cut in region.cuts:
        x, value = columns[cut.variable], values.get(cut.name, cut.value)
        mask = mask & (np.greater(x, value) if cut.direction == ">" else np.less(x, value))
        masks.append(mask)
    low, high = region.binning[0], region.binning[-1]
    mass = columns["mass"]
    masks.append(mask & (mass >= low) & (mass < high))
    near_edge = mask & ((np.abs(mass - low) < 1e-3) | (np.abs(mass - high) < 1e-3))
    sums = [(int(m.sum()), weight[m].sum(), (weight[m] ** 2).sum()) for m in masks]
    return sums, int(near_edge.sum()), float(np.abs(weight[near_edge]).sum())


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("optimized", [False, True], ids=["start", "optimized"])
@pytest.mark.parametrize("region", ["SR", "CR_DY", "CR_TTbar"])
def test_cut_flow_matches_numpy(demo, all_flows, optimized, region):
    """Every step of every sample in every region equals the same selection done by hand on the
    ROOT files (the optimized values of the shared muon cuts act in the control regions too)."""
    config, _, folder = demo
    flow = all_flows[1 if optimized else 0][region]
    values = OPTIMIZED if optimized else {}
    (config_region,) = (r for r in config.regions if r.name == region)
    for sample in flow.samples:
        expected, n_edge, w_edge = numpy_cut_flow(config, config_region, sample, folder, values)
        assert len(expected) == len(flow.steps)
        for step, (n, sumw, sumw2) in enumerate(expected):
            where = (region, sample, flow.steps[step])
            # the mass is computed differently (float32 in vector): allow for events on an edge
            slack = (n_edge, w_edge, 1e-9) if flow.steps[step] == IN_RANGE_STEP else (0, 0.0, 0)
            assert abs(flow.events[sample][step] - n) <= slack[0], where
            assert flow.yields[sample][step] == pytest.approx(
                sumw, rel=RTOL, abs=slack[1] + 1e-12
            ), where
            assert flow.uncertainties[sample][step] ** 2 == pytest.approx(
                sumw2, rel=RTOL, abs=slack[1] ** 2 + 1e-12
            ), where
    # the optimized cuts remove events: at least one sample loses some in every region
    if optimized:
        start = all_flows[0][region]
        assert any(flow.events[s][-1] < start.events[s][-1] for s in flow.samples)


@pytest.mark.parametrize("optimized", [False, True], ids=["start", "optimized"])
def test_last_step_is_the_hard_histogram(demo, flows, optimized):
    """The "in histogram range" yield is the sum of the bins of hard_histograms."""
    config, events, _ = demo
    flow = flows[1] if optimized else flows[0]
    if optimized:
        config = config.with_cut_values(OPTIMIZED)
    histograms = hard_histograms(config, events)
    for sample in flow.samples:
        histogram = histograms[("SR", sample, "nominal")]
        assert flow.yields[sample][-1] == pytest.approx(float(histogram.yields.sum()), rel=RTOL)
        assert flow.uncertainties[sample][-1] ** 2 == pytest.approx(
            float(histogram.sumw2.sum()), rel=RTOL
        )
    data = flow.data
    assert flow.events[data][-1] == pytest.approx(
        float(histograms[("SR", data, "nominal")].yields.sum())
    )


def test_structure(demo, flows):
    config, _, _ = demo
    start, optimized = flows
    region = config.regions[0]
    assert start.region == "SR"
    assert start.steps == (PRESELECTION_STEP, *(c.name for c in region.cuts), IN_RANGE_STEP)
    assert start.selections[0] == "Filter: opposite_charge"
    assert start.selections[1:-1] == (
        "mu1_pt > 30",
        "mu2_pt > 15",
        "iso_max < 0.15",
        "MET_pt < 60",
        "btag_max < 0.5",
    )
    assert optimized.selections[3] == "iso_max < 0.08"
    assert start.selections[-1] == "120 <= mass < 180"
    assert start.samples == ("Signal", "DrellYan", "TTbar", "Multijet", "Data")
    assert start.data == "Data" and start.predictions == start.samples[:-1]
    # data: weight 1 per event; counts never grow along the cut flow
    assert start.yields["Data"] == tuple(float(n) for n in start.events["Data"])
    for sample in start.samples:
        counts = start.events[sample]
        assert all(b <= a for a, b in zip(counts, counts[1:], strict=False)), sample
        assert all(isinstance(n, int) for n in counts)
    # negative weights (ttbar): sum w^2 exceeds (sum w)^2 / n
    assert any(
        start.uncertainties[s][0] ** 2 > start.yields[s][0] ** 2 / start.events[s][0]
        for s in start.predictions
    )
    total, total_unc = start.total_prediction()
    assert total[2] == pytest.approx(sum(start.yields[s][2] for s in start.predictions))
    assert total_unc[2] == pytest.approx(
        math.sqrt(sum(start.uncertainties[s][2] ** 2 for s in start.predictions))
    )
    as_dict = json.loads(json.dumps(start.to_dict()))
    assert as_dict["steps"] == list(start.steps)
    assert as_dict["yields"]["Signal"] == list(start.yields["Signal"])
    assert as_dict["events"]["Data"] == list(start.events["Data"])
    assert set(as_dict) == {
        "region",
        "steps",
        "selections",
        "samples",
        "data",
        "events",
        "yields",
        "uncertainties",
    }


def test_reads_when_no_events_given(demo, flows, tmp_path):
    """Reading (nominal only), a cuts.json path and include_data=False give the same numbers."""
    config, _, _ = demo
    path = tmp_path / "cuts.json"
    path.write_text(json.dumps(OPTIMIZED))
    flow = cut_flow(config, cuts=path, include_data=False)["SR"]
    assert flow.samples == flows[1].predictions and flow.data is None
    for sample in flow.samples:
        assert flow.yields[sample] == flows[1].yields[sample]
        assert flow.events[sample] == flows[1].events[sample]


def test_errors(demo):
    config, events, _ = demo
    with pytest.raises(ConfigError, match="unknown cut 'isolation'"):
        cut_flow(config, events, cuts={"isolation": 0.1})
    with pytest.raises(ConfigError, match="outside its Bounds"):
        cut_flow(config, events, cuts={"iso": 5.0})
    partial = {k: v for k, v in events.items() if k[1] != "TTbar"}
    with pytest.raises(KeyError, match="TTbar"):
        cut_flow(config, partial)


def test_cut_comparison(demo):
    """One row per cut of each region; a cut shared by the regions (the muon cuts) shows its
    one optimized value in each."""
    config, _, _ = demo
    rows = cut_comparison(config, OPTIMIZED)
    assert [(row["region"], row["name"]) for row in rows] == [
        (region.name, cut.name) for region in config.regions for cut in region.cuts
    ]
    assert [row["name"] for row in rows if row["region"] == "SR"] == [
        "mu1_pt",
        "mu2_pt",
        "iso",
        "met",
        "btag",
    ]
    shared = [row for row in rows if row["name"] == "iso"]
    assert [row["region"] for row in shared] == ["SR", "CR_DY", "CR_TTbar"]
    assert all(row["optimized"] == 0.08 and row["start"] == 0.15 for row in shared)
    fixed = [row for row in rows if not row["trainable"]]
    assert fixed and all(
        row["region"] != "SR" and row["optimized"] == row["start"] for row in fixed
    )
    by_name = {row["name"]: row for row in rows if row["region"] == "SR"}
    assert by_name["mu1_pt"]["start"] == by_name["mu1_pt"]["optimized"] == 30.0
    assert by_name["iso"] == {
        "name": "iso",
        "region": "SR",
        "variable": "iso_max",
        "direction": "<",
        "start": 0.15,
        "optimized": 0.08,
        "bounds": [0.01, 1.0],
        "trainable": True,
    }
    with pytest.raises(ConfigError):
        cut_comparison(config, {"met": 1000.0})


# ----------------------------------------------------------------------------- tables
def test_cut_flow_table(flows):
    start, optimized = flows
    rows = cut_flow_table(start)
    assert [row["step"] for row in rows] == list(start.steps)
    assert list(rows[0]) == ["step", "selection", *start.predictions, TOTAL_PREDICTION, "Data"]
    total, total_unc = start.total_prediction()
    for i, row in enumerate(rows):
        assert row["selection"] == start.selections[i]
        for sample in start.predictions:
            assert row[sample] == format_yield(
                start.yields[sample][i], start.uncertainties[sample][i]
            )
        assert row[TOTAL_PREDICTION] == format_yield(total[i], total_unc[i])
        assert row["Data"] == start.events["Data"][i]

    both = cut_flow_table(start, optimized, weighted=False)
    assert list(both[0])[:3] == ["step", "selection", "selection (optimized)"]
    for i, row in enumerate(both):
        for sample in start.samples:
            assert row[sample] == start.events[sample][i]
            assert row[f"{sample} (optimized)"] == optimized.events[sample][i]
        assert row[f"{TOTAL_PREDICTION} (optimized)"] == sum(
            optimized.events[s][i] for s in start.predictions
        )

    other = CutFlow(**{**start.__dict__, "region": "CR"})
    with pytest.raises(ValueError, match="region 'SR'"):
        cut_flow_table(start, other)


@pytest.mark.parametrize(
    ("value", "uncertainty", "text"),
    [
        (1234.567, 12.34, "1235 ± 12"),
        (11.9012, 0.4321, "11.90 ± 0.43"),
        (0.012345, 0.0012, "0.0123 ± 0.0012"),
        (-3.21, 0.96, "-3.21 ± 0.96"),
        (5.0, 0.0, "5.0 ± 0.0"),
        (0.0, 0.0, "0 ± 0"),
    ],
)
def test_format_yield(value, uncertainty, text):
    assert format_yield(value, uncertainty) == text


# ----------------------------------------------------------------------------- chart
def lines_by_label(figure: Figure) -> dict:
    (ax,) = figure.axes
    return {line.get_label(): line for line in ax.get_lines()}


@pytest.mark.parametrize("weighted", [True, False])
def test_chart_plots_the_cut_flow(flows, weighted):
    start, optimized = flows
    figure = cutflow_chart(start, optimized, weighted=weighted)
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(start.steps)
    lines = lines_by_label(figure)
    assert set(lines) == set(start.samples) | {f"{s} (optimized)" for s in start.samples}
    field = "yields" if weighted else "events"
    for sample in start.samples:
        for label, flow in ((sample, start), (f"{sample} (optimized)", optimized)):
            line = lines[label]
            np.testing.assert_array_equal(line.get_xdata(), np.arange(len(start.steps)))
            np.testing.assert_allclose(line.get_ydata(), getattr(flow, field)[sample], rtol=0)
        if sample != start.data:
            assert lines[sample].get_linestyle() == "-"
            assert lines[f"{sample} (optimized)"].get_linestyle() == "--"
            assert lines[sample].get_color() == lines[f"{sample} (optimized)"].get_color()
    figure.canvas.draw()  # renders (log axis with the data) without warnings


def test_chart_start_only_and_mismatch(flows):
    start, optimized = flows
    lines = lines_by_label(cutflow_chart(start))
    assert set(lines) == set(start.samples)
    np.testing.assert_allclose(lines["Signal"].get_ydata(), start.yields["Signal"], rtol=0)
    other = CutFlow(**{**optimized.__dict__, "steps": optimized.steps[:-1]})
    with pytest.raises(ValueError, match="cannot compare"):
        cutflow_chart(start, other)


def test_chart_into_given_axes(flows):
    start, _ = flows
    figure = Figure()
    left, right = figure.subplots(1, 2)
    assert cutflow_chart(start, ax=right) is figure
    assert not left.get_lines()
    labels = {line.get_label() for line in right.get_lines()}
    assert labels == set(start.samples)


def test_in_a_report(demo, flows):
    """The chart, the cut-flow table and the cut comparison go into the HTML report as given."""
    config, _, _ = demo
    start, optimized = flows
    rows = cut_flow_table(start, optimized)
    comparison = cut_comparison(config, OPTIMIZED)
    text = build_report(
        title="cut flow",
        sections=[
            Section(
                "Cut flow",
                figures=[cutflow_chart(start, optimized)],
                tables=[Table("SR", rows), Table("Cuts", comparison)],
            )
        ],
    )
    parsed = Parsed(text)
    assert decode_png(parsed.images[0]["src"])[..., :3].std() > 0.02
    flow_table, cut_table = parsed.tables
    assert flow_table[0] == list(rows[0])
    assert flow_table[1:] == [[format_value(row[c]) for c in rows[0]] for row in rows]
    assert [r[0] for r in cut_table[1:]] == [row["name"] for row in comparison]
    assert cut_table[3][cut_table[0].index("optimized")] == "0.08"
