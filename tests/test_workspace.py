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


def assert_same_structure(ours, ref, path="workspace", rel=1e-6):
    """Equal keys, lists and strings; numbers within ``rel`` relative."""
    if isinstance(ref, dict):
        assert set(ours) == set(ref), f"{path}: keys {sorted(ours)} != {sorted(ref)}"
        for key in ref:
            assert_same_structure(ours[key], ref[key], f"{path}.{key}", rel)
    elif isinstance(ref, list):
        assert len(ours) == len(ref), f"{path}: length {len(ours)} != {len(ref)}"
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            assert_same_structure(a, b, f"{path}[{i}]", rel)
    elif isinstance(ref, (int, float)) and not isinstance(ref, bool):
        assert ours == pytest.approx(ref, rel=rel, abs=0), path
    else:
        assert ours == ref, path


@pytest.fixture
def cabinetry_config(tmp_path):
    raw = yaml.safe_load(reference_path("cabinetry", "config_example.yml").read_text())
    raw["General"]["InputPath"] = str(reference_path("cabinetry", "ntuples")) + "/{SamplePath}"
    return configuration.from_dict(raw, source="config_example.yml")


def test_cabinetry_example_workspace_is_reproduced(cabinetry_config):
    """With the default settings (yield floor on) cabinetry's workspace number for number, to
    1e-9: every bin has a positive total prediction, so the floor does not act (its empty
    Signal bin stays 0), and switching it off changes nothing."""
    ref = json.loads(reference_path("cabinetry", "example_workspace.json").read_text())
    histograms = hard_histograms(cabinetry_config)
    assert cabinetry_config.general.yield_floor == workspace.FLOOR_FRACTION > 0
    ours = workspace.build(cabinetry_config, histograms)
    assert ref["channels"][0]["samples"][0]["data"][0] == 0.0
    assert_same_structure(ours, ref, rel=1e-9)
    general = dataclasses.replace(cabinetry_config.general, yield_floor=0.0)
    unfloored = workspace.build(dataclasses.replace(cabinetry_config, general=general), histograms)
    assert unfloored == ours


def _emptied(hists, data_name, bins):
    """Every prediction template with ``bins`` set to 0 (yields and sum w^2); data kept."""
    out = {}
    for key, hist in hists.items():
        if key[1] == data_name:
            out[key] = hist
            continue
        keep = torch.ones_like(hist.yields)
        keep[bins] = 0.0
        out[key] = Histogram(hist.edges, hist.yields * keep, hist.sumw2 * keep)
    return out


def test_yield_floor_acts_only_on_bins_without_prediction(toy):
    """A cut that empties the last bin of every prediction sample (data left there): only that
    bin changes. The pad ``p`` of the floor (total between f/2 and f, f = 1e-6 of the region's
    total) goes to the background only (not the POI-scaled signal, so it survives mu = 0), to
    nominal and variations alike (histosys shifts unchanged), with ``p^2`` added to its sum of
    w^2 (staterror width sqrt(sumw2) / total = 100% there). pyhf's likelihood is then finite, at
    mu = 0 too; without the floor it is not."""
    cfg = configuration.from_dict(copy.deepcopy(toy.config))
    hists = _emptied(hard_histograms(cfg), cfg.data_sample.name, [-1])
    region = cfg.regions[0].name
    f = 1e-6 * sum(
        float(hists[(region, s.name, "nominal")].yields.abs().sum())
        for s in cfg.samples_in(cfg.regions[0])
    )
    spec = workspace.build(cfg, hists)
    samples = {s["name"]: s for s in spec["channels"][0]["samples"]}
    signal, background = samples["Signal"], samples["Background"]
    assert signal["data"][-1] == 0.0
    pad = background["data"][-1]
    assert f / 2 < pad <= f
    nominal = hists[(region, "Background", "nominal")]
    assert background["data"][:-1] == nominal.yields[:-1].tolist()  # other bins untouched
    staterror = background["modifiers"][0]
    assert staterror["type"] == "staterror"
    assert staterror["data"][-1] == pytest.approx(pad, rel=1e-12)
    assert staterror["data"][:-1] == np.sqrt(nominal.sumw2[:-1].numpy()).tolist()
    for modifier in background["modifiers"]:
        if modifier["type"] == "histosys":
            for side in ("hi_data", "lo_data"):
                assert modifier["data"][side][-1] == pytest.approx(pad, rel=1e-9)
    ws = pyhf.Workspace(spec)
    model = ws.model()
    observed = ws.data(model)
    assert observed[model.config.channel_nbins[region] - 1] > 0
    pars = model.config.suggested_init()
    pars[model.config.poi_index] = 0.0
    assert np.isfinite(model.logpdf(pars, observed)[0])
    general = dataclasses.replace(cfg.general, yield_floor=0.0)
    bare = pyhf.Workspace(workspace.build(dataclasses.replace(cfg, general=general), hists))
    with np.errstate(all="ignore"):
        value = bare.model().logpdf(pars, observed)[0]
    assert not np.isfinite(value)


def test_a_sample_cut_away_keeps_its_variations_unsplit(toy):
    """A sample that the cuts emptied entirely while its variations kept events (the demo's
    ttbar at a hard muon-pt cut, with its momentum-scale-down tree) cannot be split into norm
    and shape (sum of the nominal is 0): its NormPlusShape keeps normsys hi = lo = 1 and the
    unnormalised variations as histosys templates, so the variation's events still count. The
    other samples keep every bin positive: no floor acts, and pyhf's likelihood is finite."""
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
    cut_away = next(s for s in channel["samples"] if s["name"] == sample)
    assert cut_away["data"] == [0.0] * len(nominal.yields)
    modifiers = {(m["name"], m["type"]): m["data"] for m in cut_away["modifiers"]}
    assert modifiers[(syst.modifier_name, "normsys")] == {"hi": 1.0, "lo": 1.0}
    histosys = modifiers[(syst.modifier_name, "histosys")]
    assert histosys["hi_data"] == hists[(region, sample, f"{syst.name}_Up")].yields.tolist()
    assert histosys["lo_data"] == hists[(region, sample, f"{syst.name}_Down")].yields.tolist()
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


def test_a_bin_with_signal_but_no_background_gets_the_floor(toy):
    """Only the background emptied in the last bin (the signal kept there): the bin is not
    background-free. The floor pads the background (the prediction at mu = 0) to between f/2
    and f with a 100% uncertainty, leaves the signal and every other bin as they were, and the
    likelihood at mu = 0 is finite (pyhf); without the floor it is not."""
    cfg = configuration.from_dict(copy.deepcopy(toy.config))
    hists = dict(hard_histograms(cfg))
    region = cfg.regions[0].name
    for key, hist in list(hists.items()):
        if key[:2] == (region, "Background"):
            keep = torch.ones_like(hist.yields)
            keep[-1] = 0.0
            hists[key] = Histogram(hist.edges, hist.yields * keep, hist.sumw2 * keep)
    signal = hists[(region, "Signal", "nominal")]
    assert signal.yields[-1] > 0
    f = 1e-6 * sum(
        float(hists[(region, s.name, "nominal")].yields.abs().sum())
        for s in cfg.samples_in(cfg.regions[0])
    )
    spec = workspace.build(cfg, hists)
    samples = {s["name"]: s for s in spec["channels"][0]["samples"]}
    assert samples["Signal"]["data"] == signal.yields.tolist()
    background = samples["Background"]
    assert f / 2 < background["data"][-1] <= f
    assert background["data"][:-1] == hists[(region, "Background", "nominal")].yields[:-1].tolist()
    assert background["modifiers"][0]["data"][-1] == pytest.approx(background["data"][-1])
    ws = pyhf.Workspace(spec)
    model = ws.model()
    pars = model.config.suggested_init()
    pars[model.config.poi_index] = 0.0
    asimov = model.expected_data(model.config.suggested_init())
    assert np.isfinite(model.logpdf(pars, asimov)[0])
    general = dataclasses.replace(cfg.general, yield_floor=0.0)
    bare = pyhf.Workspace(workspace.build(dataclasses.replace(cfg, general=general), hists))
    with np.errstate(all="ignore"):
        assert not np.isfinite(bare.model().logpdf(pars, asimov)[0])


def test_symmetrized_template_is_cabinetrys_mirror_also_where_negative(toy):
    """The toy's Modeling (Background: Up from another tree, Down Symmetrize), with the Up
    template set to 5 times the nominal in the last bin, so that its normalised value there
    exceeds twice the nominal:
    the mirrored template ``2 n - v/k`` is negative in that bin and written as such, as
    cabinetry's ``_symmetrized_templates_and_norm`` (``2 * reference - variation``, no floor)
    does; the normsys is ``(k, 2 - k)``. The total prediction stays positive at the nominal
    parameters (pyhf's likelihood is finite). With the nominal emptied in that bin, the yield
    floor's pad is added to the mirrored template like to the nominal, and nothing else
    changes (the documented semantics: the floor concerns the nominal background)."""
    cfg = configuration.from_dict(copy.deepcopy(toy.config))
    original = hard_histograms(cfg)
    hists = dict(original)
    region = cfg.regions[0].name
    up_key = (region, "Background", "Modeling_Up")
    up = hists[up_key]
    nominal = hists[(region, "Background", "nominal")]
    scale = torch.ones_like(up.yields)
    scale[-1] = 5.0 * nominal.yields[-1] / up.yields[-1]
    hists[up_key] = Histogram(up.edges, up.yields * scale, up.sumw2 * scale**2)

    def modeling(spec):
        channel = spec["channels"][0]
        background = next(s for s in channel["samples"] if s["name"] == "Background")
        found = {m["type"]: m["data"] for m in background["modifiers"] if m["name"] == "Modeling"}
        return background["data"], found["normsys"], found["histosys"]

    n = hists[(region, "Background", "nominal")].yields.numpy()
    v = hists[up_key].yields.numpy()
    k = v.sum() / n.sum()  # cabinetry: normalize_to_yield
    mirrored = 2 * n - v / k
    assert mirrored[-1] < 0 < n[-1]
    spec = workspace.build(cfg, hists)
    data, normsys, histosys = modeling(spec)
    np.testing.assert_allclose(histosys["hi_data"], v / k, rtol=1e-12)
    np.testing.assert_allclose(histosys["lo_data"], mirrored, rtol=1e-12, atol=1e-12)
    assert histosys["lo_data"][-1] < 0
    assert normsys["hi"] == pytest.approx(k, rel=1e-12)
    assert normsys["lo"] == pytest.approx(2 - k, rel=1e-12)
    assert data == n.tolist()  # populated: no floor
    ws = pyhf.Workspace(spec)
    model = ws.model()
    assert np.isfinite(model.logpdf(model.config.suggested_init(), ws.data(model))[0])

    # the nominal background emptied in the last bin: the floor pads nominal and mirror alike
    keep = torch.ones_like(nominal.yields)
    keep[-1] = 0.0
    hists[(region, "Background", "nominal")] = Histogram(
        nominal.edges, nominal.yields * keep, nominal.sumw2 * keep
    )
    n0 = n * keep.numpy()
    k0 = v.sum() / n0.sum()
    data, normsys, histosys = modeling(workspace.build(cfg, hists))
    pad = data[-1]
    assert pad > 0 and data[:-1] == n0[:-1].tolist()
    np.testing.assert_allclose(histosys["lo_data"][-1], -v[-1] / k0 + pad, rtol=1e-12)
    np.testing.assert_allclose(histosys["lo_data"][:-1], (2 * n0 - v / k0)[:-1], rtol=1e-12)
    assert normsys["lo"] == pytest.approx(2 - k0, rel=1e-12)

    # a systematic's Weight replaces the sample's (cabinetry's templates.builder._weight: the
    # override is used instead of the sample's Weight, not multiplied with it): WeightSys Up
    # "weight_up" (= 1.1 weight in the files) gives 1.1 times the nominal, not weight^2 * 1.1
    for sample in ("Background", "Signal"):
        nominal_yields = original[(region, sample, "nominal")].yields
        up_yields = original[(region, sample, "WeightSys_Up")].yields
        down_yields = original[(region, sample, "WeightSys_Down")].yields
        torch.testing.assert_close(up_yields, 1.1 * nominal_yields, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(down_yields, 0.95 * nominal_yields, rtol=1e-12, atol=1e-12)


def test_a_variation_cut_away_keeps_the_systematic_unsplit(toy):
    """A variation whose events the cuts removed entirely while the nominal kept some (the
    demo's ttbar in the Drell-Yan control region at hard shared muon cuts) has no norm factor
    ``k = sum(v) / sum(n) > 0``: the systematic keeps normsys hi = lo = 1 and the raw variations
    as histosys templates, so the workspace holds no NaN and pyhf's prediction at alpha = +1 is
    the (empty) variation, at alpha = -1 the other side."""
    raw = copy.deepcopy(toy.config)
    next(s for s in raw["Systematics"] if s["Name"] == "WeightSys")["Samples"] = "Signal"
    cfg = configuration.from_dict(raw)
    hists = hard_histograms(cfg)
    region, sample = cfg.regions[0].name, "Signal"
    syst = next(s for s in cfg.systematics if s.name == "WeightSys")  # on the signal only
    up_key = (region, sample, f"{syst.name}_Up")
    emptied = dict(hists)
    up = hists[up_key]
    emptied[up_key] = Histogram(up.edges, up.yields * 0, up.sumw2 * 0)
    spec = workspace.build(cfg, emptied)
    json.dumps(spec, allow_nan=False)  # no NaN anywhere
    channel = next(c for c in spec["channels"] if c["name"] == region)
    entry = next(s for s in channel["samples"] if s["name"] == sample)
    modifiers = {(m["name"], m["type"]): m["data"] for m in entry["modifiers"]}
    assert modifiers[(syst.modifier_name, "normsys")] == {"hi": 1.0, "lo": 1.0}
    down = hists[(region, sample, f"{syst.name}_Down")].yields.numpy()
    histosys = modifiers[(syst.modifier_name, "histosys")]
    np.testing.assert_array_equal(histosys["hi_data"], 0.0)
    np.testing.assert_allclose(histosys["lo_data"], down, rtol=1e-12)
    model = pyhf.Workspace(spec).model()
    pars = model.config.suggested_init()
    others = model.expected_actualdata(pars)[: len(down)] - np.asarray(entry["data"])
    for alpha, expected in ((1.0, 0.0 * down), (-1.0, down)):
        shifted = list(pars)
        shifted[model.config.par_slice(syst.modifier_name).start] = alpha
        signal = model.expected_actualdata(shifted)[: len(down)] - others
        np.testing.assert_allclose(signal, expected, rtol=1e-9, atol=1e-9)


def test_compiled_schema_is_cached_privately(tmp_path, monkeypatch):
    """The compiled pyhf schema is kept in the cache folder and loaded from there; a cached
    file that others may write is not run (the validator is compiled afresh); either way the
    verdicts are jsonschema's."""
    from analysis.likelihood import workspace as module

    monkeypatch.setenv("DIFFANA_CACHE_DIR", str(tmp_path))
    good = json.loads(reference_path("pyhf_validation", "2-bin_1-channel.json").read_text())
    bad = copy.deepcopy(good)
    del bad["channels"][0]["samples"][0]["modifiers"][0]["type"]
    verdicts = []
    for attempt in range(4):
        module._compiled_schema.cache_clear()
        if attempt >= 2:  # damaged (made again), then writable by anyone (not trusted)
            (cached,) = (tmp_path / "schemas").glob("workspace_*.marshal")
            cached.write_bytes(b"not code")
            cached.chmod(0o644 if attempt == 2 else 0o666)
        validator = module._compiled_schema("workspace.json")
        verdicts.append(
            (
                module._compiled_schema_accepts("workspace.json", good),
                module._compiled_schema_accepts("workspace.json", bad),
            )
        )
        assert callable(validator)
    module._compiled_schema.cache_clear()
    assert verdicts == [(True, False)] * 4
    assert len(list((tmp_path / "schemas").glob("workspace_*.marshal"))) == 1
    jsonschema_verdict = [
        next(module.pyhf_schema("workspace.json").iter_errors(spec), None) is None
        for spec in (good, bad)
    ]
    assert jsonschema_verdict == [True, False]
