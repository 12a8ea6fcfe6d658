"""Workspaces: cabinetry's example reproduced, cabinetry semantics against numpy, pyhf fits."""

from __future__ import annotations

import json

import numpy as np
import pyhf
import pytest
import yaml

from analysis import config as configuration
from analysis import workspace
from analysis.histograms import hard_histograms
from tests.conftest import reference_path


def assert_same_structure(ours, ref, path="workspace"):
    """Equal keys, lists and strings; numbers within 1e-6 relative."""
    if isinstance(ref, dict):
        assert set(ours) == set(ref), f"{path}: keys {sorted(ours)} != {sorted(ref)}"
        for key in ref:
            assert_same_structure(ours[key], ref[key], f"{path}.{key}")
    elif isinstance(ref, list):
        assert len(ours) == len(ref), f"{path}: length {len(ours)} != {len(ref)}"
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            assert_same_structure(a, b, f"{path}[{i}]")
    elif isinstance(ref, (int, float)) and not isinstance(ref, bool):
        assert ours == pytest.approx(ref, rel=1e-6, abs=0), path
    else:
        assert ours == ref, path


@pytest.fixture
def cabinetry_config(tmp_path):
    raw = yaml.safe_load(reference_path("cabinetry", "config_example.yml").read_text())
    raw["General"]["InputPath"] = str(reference_path("cabinetry", "ntuples")) + "/{SamplePath}"
    return configuration.from_dict(raw, source="config_example.yml")


def test_cabinetry_example_workspace_is_reproduced(cabinetry_config):
    ours = workspace.build(cabinetry_config, hard_histograms(cabinetry_config))
    ref = json.loads(reference_path("cabinetry", "example_workspace.json").read_text())
    assert_same_structure(ours, ref)


def test_cabinetry_example_fits_like_cabinetry(cabinetry_config):
    """pyhf fits our workspace to cabinetry's published best fit."""
    ws = pyhf.Workspace(workspace.build(cabinetry_config, hard_histograms(cabinetry_config)))
    model, data = ws.model(), ws.data(ws.model())
    pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(verbose=0))
    try:
        bestfit = pyhf.infer.mle.fit(data, model)
    finally:
        pyhf.set_backend("numpy", "scipy")
    ref = json.loads(reference_path("cabinetry", "REFERENCE_NUMBERS.json").read_text())
    order = [model.config.par_names.index(n) for n in ref["parameter_order"]]
    np.testing.assert_allclose(bestfit[order], ref["bestfit"], rtol=1e-3, atol=1e-4)


def test_normplusshape_split_against_numpy(toy):
    """normsys = sum(var)/sum(nom); histosys = var/normsys; Symmetrize mirrors (cabinetry)."""
    cfg = configuration.from_dict(toy.config)
    hists = hard_histograms(cfg)
    ws = workspace.build(cfg, hists)
    nominal = hists[("SR", "Background", "nominal")].yields.numpy()
    up = hists[("SR", "Background", "Modeling_Up")].yields.numpy()
    k_up = up.sum() / nominal.sum()
    background = ws["channels"][0]["samples"][1]
    assert background["name"] == "Background"
    mods = {(m["name"], m["type"]): m for m in background["modifiers"]}
    assert [m["type"] for m in background["modifiers"]] == [
        "staterror",
        "normsys",
        "normsys",
        "histosys",
        "normsys",
        "histosys",
    ]
    assert mods[("Modeling", "normsys")]["data"]["hi"] == pytest.approx(k_up, rel=1e-12)
    assert mods[("Modeling", "normsys")]["data"]["lo"] == pytest.approx(2 - k_up, rel=1e-12)
    np.testing.assert_allclose(
        mods[("Modeling", "histosys")]["data"]["hi_data"], up / k_up, rtol=1e-12
    )
    np.testing.assert_allclose(
        mods[("Modeling", "histosys")]["data"]["lo_data"], 2 * nominal - up / k_up, rtol=1e-12
    )
    down = hists[("SR", "Background", "WeightSys_Down")].yields.numpy()
    assert mods[("WeightSys", "normsys")]["data"]["lo"] == pytest.approx(0.95, rel=1e-12)
    np.testing.assert_allclose(
        mods[("WeightSys", "histosys")]["data"]["lo_data"], down / 0.95, rtol=1e-12
    )
    np.testing.assert_allclose(
        mods[("staterror_SR", "staterror")]["data"],
        np.sqrt(hists[("SR", "Background", "nominal")].sumw2.numpy()),
        rtol=1e-12,
    )
    assert mods[("Lumi", "normsys")]["data"] == {"hi": 1.02, "lo": 0.98}


def test_pyhf_fits_asimov_workspace_to_nominal(toy):
    """With data replaced by the nominal prediction, pyhf's fit returns mu = 1."""
    cfg = configuration.from_dict(toy.config)
    ws = workspace.build(cfg, hard_histograms(cfg))
    expected = np.sum([s["data"] for s in ws["channels"][0]["samples"]], axis=0)
    ws["observations"][0]["data"] = expected.tolist()
    model = pyhf.Workspace(ws).model()
    bestfit = pyhf.infer.mle.fit(expected.tolist() + model.config.auxdata, model)
    assert bestfit[model.config.poi_index] == pytest.approx(1.0, abs=1e-3)
    assert model.config.poi_name == "mu"
