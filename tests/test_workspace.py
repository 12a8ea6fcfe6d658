"""Workspaces: cabinetry's example reproduced, cabinetry semantics against numpy, pyhf fits."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pyhf
import pytest
import torch
import yaml

from analysis import config as configuration
from analysis import workspace
from analysis.histograms import Histogram, hard_histograms
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
    """Without the yield floor (cabinetry has none) number for number; with the default floor
    only the one empty bin (Signal, bin 0) differs: raised to between f/2 and f, f = 1e-6 times
    the region's total nominal prediction (workspace module docstring)."""
    ref = json.loads(reference_path("cabinetry", "example_workspace.json").read_text())
    histograms = hard_histograms(cabinetry_config)
    general = dataclasses.replace(cabinetry_config.general, yield_floor=0.0)
    unfloored = dataclasses.replace(cabinetry_config, general=general)
    assert_same_structure(workspace.build(unfloored, histograms), ref)

    ours = workspace.build(cabinetry_config, histograms)
    signal = ours["channels"][0]["samples"][0]
    ref_samples = ref["channels"][0]["samples"]
    ref_signal = ref_samples[0]
    assert signal["name"] == ref_signal["name"] == "Signal" and ref_signal["data"][0] == 0.0
    f = 1e-6 * sum(sum(sample["data"]) for sample in ref_samples)
    assert f / 2 < signal["data"][0] <= f
    staterror = [sample["modifiers"][0] for sample in ref_samples]
    assert all(modifier["type"] == "staterror" for modifier in staterror)
    f_s = 1e-6 * sum(x**2 for modifier in staterror for x in modifier["data"])
    assert f_s / 2 < signal["modifiers"][0]["data"][0] ** 2 <= f_s
    signal["data"][0] = 0.0
    signal["modifiers"][0]["data"][0] = 0.0
    assert_same_structure(ours, ref)


def test_yield_floor_gives_a_finite_likelihood(toy):
    """A cut that empties the last bins of every prediction sample (data left there) gives a
    finite pyhf likelihood with the floor; without it pyhf's is not finite."""
    raw = copy.deepcopy(toy.config)
    cfg = configuration.from_dict(raw)
    hists = hard_histograms(cfg)
    data_name = cfg.data_sample.name
    emptied = {
        key: hist
        if key[1] == data_name
        else Histogram(
            hist.edges,
            torch.cat([hist.yields[:-1], hist.yields[-1:] * 0]),
            torch.cat([hist.sumw2[:-1], hist.sumw2[-1:] * 0]),
        )
        for key, hist in hists.items()
    }
    for floor, finite in ((0.0, False), (1e-6, True)):
        general = dataclasses.replace(cfg.general, yield_floor=floor)
        spec = workspace.build(dataclasses.replace(cfg, general=general), emptied)
        ws = pyhf.Workspace(spec)
        model = ws.model()
        observed = ws.data(model)
        assert observed[model.config.channel_nbins[model.config.channels[0]] - 1] > 0
        with np.errstate(all="ignore"):
            value = model.logpdf(model.config.suggested_init(), observed)[0]
        assert bool(np.isfinite(value)) == finite, (floor, value)


def test_an_emptied_sample_keeps_a_finite_likelihood(toy):
    """A sample that the cuts emptied entirely while a variation of it kept events (the demo's
    ttbar at a hard muon-pt cut, with its momentum-scale-down tree) gets the region's floor:
    its NormPlusShape factors, templates and pyhf's likelihood stay finite."""
    cfg = configuration.from_dict(copy.deepcopy(toy.config))
    hists = hard_histograms(cfg)
    region, sample = cfg.regions[0].name, "Signal"
    syst = next(s for s in cfg.systematics if s.name == "WeightSys")  # both sides given
    emptied = dict(hists)
    nominal = hists[(region, sample, "nominal")]
    emptied[(region, sample, "nominal")] = Histogram(
        nominal.edges, nominal.yields * 0, nominal.sumw2 * 0
    )
    spec = workspace.build(cfg, emptied)
    channel = next(c for c in spec["channels"] if c["name"] == region)
    floored = next(s for s in channel["samples"] if s["name"] == sample)
    f = 1e-6 * sum(
        float(hists[(region, s.name, "nominal")].yields.sum())
        for s in cfg.samples_in(cfg.regions[0])
        if s.name != sample
    )
    assert all(f / 2 < x <= f for x in floored["data"])
    normsys = next(
        m
        for m in floored["modifiers"]
        if m["type"] == "normsys" and m["name"] == syst.modifier_name
    )
    up_total = float(hists[(region, sample, f"{syst.name}_Up")].yields.sum())
    assert normsys["data"]["hi"] == pytest.approx(up_total / sum(floored["data"]), rel=1e-12)
    ws = pyhf.Workspace(spec)
    model = ws.model()
    assert np.isfinite(model.logpdf(model.config.suggested_init(), ws.data(model))[0])


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


def test_smooth_floor():
    x = torch.linspace(-5.0, 5.0, 101, dtype=torch.float64, requires_grad=True)
    y = workspace.smooth_floor(x, 1.0)
    assert torch.equal(y[x >= 1.0], x[x >= 1.0])
    assert bool((y > 0.5).all()) and bool((y[x < 1.0] <= 1.0).all())
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert bool((grad > 0).all()) and bool((grad <= 1).all())
    assert torch.autograd.gradcheck(
        lambda t: workspace.smooth_floor(t, 0.7),
        (torch.tensor([-3.0, 0.1, 0.69, 0.71, 2.0]).double().requires_grad_(),),
    )
