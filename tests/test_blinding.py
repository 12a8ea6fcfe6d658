"""Blinding (analysis/blinding.py): the signal regions' observations of a workspace become the
Asimov expectation with the parameters fitted to the control regions alone (pyhf as the
reference), the data sample leaves the signal regions of histograms and cut flows, and the
data/MC figures draw no data in blinded channels."""

from __future__ import annotations

import copy

import numpy as np
import pyhf
import pytest

from analysis.blinding import blind_cut_flows, blind_histograms, blind_workspace


def _channel(name, signal, background, *, stat):
    modifiers = [
        {"name": "k_bkg", "type": "normfactor", "data": None},
        {"name": "bkg_norm", "type": "normsys", "data": {"hi": 1.08, "lo": 0.93}},
        {"name": f"staterror_{name}", "type": "staterror", "data": stat},
    ]
    samples = [{"name": "background", "data": background, "modifiers": modifiers}]
    if signal is not None:
        mu = [{"name": "mu", "type": "normfactor", "data": None}]
        samples.insert(0, {"name": "signal", "data": signal, "modifiers": mu})
    return {"name": name, "samples": samples}


@pytest.fixture
def spec():
    """Two signal regions and a signal-free control region whose data want k_bkg ~ 1.3."""
    return {
        "channels": [
            _channel("SR_low", [3.0, 6.0, 2.0], [30.0, 22.0, 11.0], stat=[2.0, 1.5, 1.0]),
            _channel("CR", None, [210.0, 160.0], stat=[6.0, 5.0]),
            _channel("SR_high", [4.0], [9.0], stat=[0.8]),
        ],
        "observations": [
            {"name": "SR_low", "data": [61.0, 57.0, 30.0]},
            {"name": "CR", "data": [280.0, 205.0]},
            {"name": "SR_high", "data": [25.0]},
        ],
        "measurements": [
            {
                "name": "meas",
                "config": {
                    "poi": "mu",
                    "parameters": [{"name": "k_bkg", "bounds": [[0.1, 5.0]], "inits": [1.0]}],
                },
            }
        ],
        "version": "1.0.0",
    }


def test_signal_regions_get_the_control_region_fitted_asimov(spec):
    original = copy.deepcopy(spec)
    blinded = blind_workspace(spec, ["SR_low", "SR_high", "absent"])
    assert spec == original  # not modified
    observed = {o["name"]: o["data"] for o in blinded["observations"]}
    assert observed["CR"] == [280.0, 205.0]
    # reference: pyhf fits the workspace without the signal regions, then the full model's
    # expectation at those parameters and mu = 1 (its init)
    workspace = pyhf.Workspace(spec)
    control = workspace.prune(channels=["SR_low", "SR_high"])
    cr_model = control.model(poi_name=None)
    best = pyhf.infer.mle.fit(control.data(cr_model), cr_model)
    model = workspace.model()
    pars = np.asarray(model.config.suggested_init(), dtype=float)
    for name in cr_model.config.par_order:
        pars[model.config.par_slice(name)] = best[cr_model.config.par_slice(name)]
    assert pars[model.config.par_slice("k_bkg")][0] == pytest.approx(1.3, abs=0.05)
    expected = model.expected_actualdata(pars)
    for channel in ("SR_low", "SR_high"):
        reference = expected[model.config.channel_slices[channel]]
        np.testing.assert_allclose(observed[channel], reference, rtol=1e-4)
    # every fit of the blinded workspace finds the nominal POI: the Asimov property
    model_data = pyhf.Workspace(blinded).data(model)
    assert pyhf.infer.mle.fit(model_data, model)[model.config.poi_index] == pytest.approx(
        1.0, abs=2e-3
    )


def test_without_control_regions_the_asimov_is_prefit(spec):
    alone = {**spec, "channels": spec["channels"][:1], "observations": spec["observations"][:1]}
    blinded = blind_workspace(alone, ["SR_low"])
    (observation,) = blinded["observations"]
    np.testing.assert_allclose(observation["data"], [33.0, 28.0, 13.0], rtol=1e-12)  # s + b
    assert blind_workspace(spec, ["nothing"]) == spec


def test_data_leave_the_signal_regions_of_histograms_and_cut_flows():
    histogram = {"nominal": {"edges": [0, 1], "yields": [5.0], "sumw2": [5.0]}}
    payload = {r: {"Data": histogram, "Signal": histogram} for r in ("SR", "CR")}
    assert blind_histograms(payload, ["SR"], {"Data"}) == {
        "SR": {"Signal": histogram},
        "CR": {"Data": histogram, "Signal": histogram},
    }
    flow = {
        "region": "SR",
        "steps": ["preselection"],
        "selections": [""],
        "samples": ["Signal", "Data"],
        "data": "Data",
        "events": {"Signal": [10], "Data": [7]},
        "yields": {"Signal": [2.5], "Data": [7.0]},
        "uncertainties": {"Signal": [0.8], "Data": [2.6]},
    }
    cutflow = {
        "start": {"SR": flow, "CR": {**flow, "region": "CR"}},
        "optimized": {"SR": flow},
        "cuts": [{"name": "x", "start": 1.0, "optimized": 2.0}],
        "mc_statistics": {"start": {"below_guard": []}},
    }
    blinded = blind_cut_flows(cutflow, ["SR"])
    for cut_set in ("start", "optimized"):
        sr = blinded[cut_set]["SR"]
        assert sr["data"] is None and sr["samples"] == ["Signal"]
        assert sr["events"] == {"Signal": [10]} and sr["yields"] == {"Signal": [2.5]}
    assert blinded["start"]["CR"]["yields"]["Data"] == [7.0]
    assert blinded["cuts"] == cutflow["cuts"] and cutflow["start"]["SR"]["data"] == "Data"


def test_blinded_channels_are_drawn_without_data(spec):
    from analysis.likelihood import Workspace
    from analysis.plotting import distributions
    from analysis.prediction import prediction

    workspace = Workspace.from_spec(spec)
    model = workspace.model()
    figures = distributions(
        prediction(model), workspace.data(model, include_auxdata=False), blinded=["SR_low"]
    )
    for channel, figure in figures.items():
        labels = figure.axes[0].get_legend_handles_labels()[1]
        assert ("Data" in labels) == (channel != "SR_low"), channel
        texts = " ".join(t.get_text() for t in figure.axes[0].texts)
        assert ("data blinded" in texts) == (channel == "SR_low")


def test_plot_distributions_blind_hides_the_config_signal_regions(spec, tmp_path, monkeypatch):
    """``diffana plot distributions --config C --blind`` passes the Type: Signal regions of C
    as ``blinded``: the figures it saves are those of the library call with those channels."""
    import json

    import yaml
    from click.testing import CliRunner

    from analysis import plotting
    from analysis.cli import main

    config = {
        "General": {
            "Measurement": "meas",
            "POI": "mu",
            "InputPath": "h.root:{RegionPath}/{SamplePath}",
        },
        "Regions": [
            {"Name": "SR_low", "RegionPath": "SR_low"},
            {"Name": "CR", "RegionPath": "CR", "Type": "Control"},
            {"Name": "SR_high", "RegionPath": "SR_high", "Type": "Signal"},
        ],
        "Samples": [
            {"Name": "Data", "SamplePath": "data", "Data": True},
            {"Name": "signal", "SamplePath": "signal"},
            {"Name": "background", "SamplePath": "background"},
        ],
        "NormFactors": [{"Name": "mu", "Samples": "signal", "Nominal": 1, "Bounds": [0, 10]}],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "ws.json").write_text(json.dumps(spec))
    seen = {}
    original = plotting.distributions

    def record(*args, **kwargs):
        figures = original(*args, **kwargs)
        for channel, figure in figures.items():
            seen[channel] = "Data" in figure.axes[0].get_legend_handles_labels()[1]
        return figures

    monkeypatch.setattr(plotting, "distributions", record)  # observe, not replace
    args = ["plot", "distributions", str(tmp_path / "ws.json"), "--out", str(tmp_path / "d")]
    result = CliRunner().invoke(main, [*args, "--config", str(tmp_path / "c.yaml"), "--blind"])
    assert result.exit_code == 0, result.output
    assert seen == {"SR_low": False, "CR": True, "SR_high": False}
    assert all((tmp_path / f"d_{c}.png").is_file() for c in seen)
    refused = CliRunner().invoke(main, [*args, "--blind"])
    assert refused.exit_code == 2 and "--blind needs --config" in refused.output
