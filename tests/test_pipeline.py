"""AnalysisPipeline: bounded cut parameters, the hard limit against hard_histograms and the
workspace builder, gradients (gradcheck, central finite differences), temperature scales,
moving buffers between devices and dtypes."""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import pytest
import torch
from scipy import special

from analysis import config as config_module
from analysis import objectives, workspace
from analysis.errors import ConfigError
from analysis.histograms import hard_histograms
from analysis.io import Events, read_events
from analysis.likelihood import Workspace
from analysis.pipeline import AnalysisPipeline

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
RTOL = 1e-9


def devices() -> list[str]:
    wanted = os.environ.get("DIFFANA_DEVICE")
    if wanted:
        return ["cpu", wanted] if wanted != "cpu" else ["cpu"]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def toy_setup(toy, tmp_path):
    config = config_module.from_dict(toy.config, source="toy.yaml")
    events = read_events(config, cache_dir=tmp_path / "cache")
    return config, events


def assert_close_histograms(got, expected, rtol=RTOL):
    assert got.keys() == expected.keys()
    for key, hist in expected.items():
        for field in ("yields", "sumw2"):
            a, b = getattr(got[key], field).detach(), getattr(hist, field)
            scale = b.abs().max().clamp(min=1e-300)
            assert float((a - b).abs().max() / scale) <= rtol, (key, field, a, b)


def compare_leaves(got, expected, rtol, where="spec"):
    """Numbers in two nested JSON structures agree to ``rtol`` relative (per leaf vector)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            compare_leaves(got[key], expected[key], rtol, f"{where}.{key}")
    elif isinstance(expected, list) and expected and isinstance(expected[0], (int, float)):
        a, b = np.asarray(got, dtype=float), np.asarray(expected, dtype=float)
        scale = max(np.abs(b).max(), 1e-300)
        assert np.abs(a - b).max() <= rtol * scale, (where, a, b)
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            name = e.get("name", i) if isinstance(e, dict) else i
            compare_leaves(g, e, rtol, f"{where}[{name}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=rtol, abs=0), where
    else:
        assert got == expected, where


def other_cut_values(config):
    """Cut values a third of the way into each cut's Bounds (different from the configured)."""
    return {c.name: c.bounds[0] + (c.bounds[1] - c.bounds[0]) / 3 for c in config.cuts}


def subset(events, n):
    return {
        key: Events(ev.variable, {k: v[:n] for k, v in ev.columns.items()}, ev.weight[:n].clone())
        for key, ev in events.items()
    }


# ----------------------------------------------------------------------------- parametrisation
def test_thresholds_stay_within_bounds(toy_setup):
    config, events = toy_setup
    pipeline = AnalysisPipeline.from_config(config, events)
    assert pipeline.cut_values() == pytest.approx(config.cut_values(), rel=1e-13)
    low, high = pipeline.cut_low, pipeline.cut_high
    generator = torch.Generator().manual_seed(0)
    for scale in (1.0, 10.0, 1e3, 1e10):
        with torch.no_grad():
            u = torch.randn(pipeline.cut_parameters.shape, generator=generator, dtype=torch.float64)
            pipeline.cut_parameters.copy_(scale * u)
        c = pipeline.thresholds()
        assert bool(((c >= low) & (c <= high)).all()), (scale, c)
    with torch.no_grad():
        pipeline.cut_parameters.fill_(math.inf)
    assert bool((pipeline.thresholds() <= high).all())
    # a value on a bound is nudged inside by 1e-6 of the range
    names = pipeline.cut_names
    pipeline.set_cut_values(
        {names[0]: config.cuts[0].bounds[0], names[1]: config.cuts[1].bounds[1]}
    )
    values = pipeline.cut_values()
    span0 = config.cuts[0].bounds[1] - config.cuts[0].bounds[0]
    span1 = config.cuts[1].bounds[1] - config.cuts[1].bounds[0]
    assert values[names[0]] == pytest.approx(config.cuts[0].bounds[0] + 1e-6 * span0, rel=1e-9)
    assert values[names[1]] == pytest.approx(config.cuts[1].bounds[1] - 1e-6 * span1, rel=1e-9)
    with pytest.raises(ConfigError, match="outside its Bounds"):
        pipeline.set_cut_values({names[0]: config.cuts[0].bounds[1] + 1})
    with pytest.raises(ConfigError, match="unknown cut 'nope'.*valid cut names"):
        pipeline.set_cut_values({"nope": 1.0})


def test_non_trainable_cut_is_a_buffer(toy, tmp_path):
    """A fixed cut's value lives in ``cut_fixed_values`` (state_dict); it was applied when the
    pipeline was built, so set_cut_values and load_state_dict accept it at its value only and
    refuse another one, changing nothing."""
    toy.config["Regions"][0]["Cuts"][1]["Trainable"] = False
    config = config_module.from_dict(toy.config)
    events = read_events(config, cache_dir=tmp_path / "cache")
    pipeline = AnalysisPipeline.from_config(config, events)
    lead, met = (cut.name for cut in config.cuts)
    assert pipeline.trainable_cut_names == (lead,)
    assert pipeline.cut_parameters.shape == (1,)
    assert pipeline.state_dict()["cut_fixed_values"].tolist() == [60.0]
    pipeline.set_cut_values({lead: 30.0, met: 60.0})  # a whole cuts.json: the fixed cut as is
    assert pipeline.cut_values() == pytest.approx({lead: 30.0, met: 60.0}, rel=1e-12)
    u = pipeline.cut_parameters.detach().clone()
    with pytest.raises(ConfigError, match=f"cut '{met}' is not trainable.*at 60.0.*100.0"):
        pipeline.set_cut_values({lead: 20.0, met: 100.0})
    assert torch.equal(pipeline.cut_parameters.detach(), u)  # nothing changed
    state = pipeline.state_dict()
    state["cut_fixed_values"] = torch.tensor([100.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="non-trainable cut values"):
        pipeline.load_state_dict(state)
    assert pipeline.cut_fixed_values.tolist() == [60.0]
    with torch.no_grad():
        got = pipeline.histograms(0.0, 0.0)
    assert_close_histograms(got, hard_histograms(config.with_cut_values({lead: 30.0}), events))
    # the events failing met < 60 are not stored
    assert pipeline.event_counts() == {
        key: int((ev.columns["met"] < 60.0).sum()) for key, ev in events.items()
    }


# ----------------------------------------------------------------------------- hard limit
@pytest.mark.parametrize("which", ["toy", "demo"])
def test_hard_limit_equals_hard_histograms(which, request):
    config, events = request.getfixturevalue(f"{which}_setup")
    pipeline = AnalysisPipeline.from_config(config, events)
    with torch.no_grad():
        assert_close_histograms(pipeline.histograms(0.0, 0.0), hard_histograms(config, events))
        pipeline.set_cut_values(other_cut_values(config))
        moved = config.with_cut_values(pipeline.cut_values())
        got = pipeline.histograms(0.0, 0.0)
        assert_close_histograms(got, hard_histograms(moved, events))
    # the data and the variations are included, and the moved cuts changed something
    assert any(k[2] != "nominal" for k in got) and (config.regions[0].name, "Data", "nominal")
    before = hard_histograms(config, events)
    assert any(not torch.equal(got[k].yields, before[k].yields) for k in got)


@pytest.mark.parametrize("which", ["toy", "demo"])
def test_hard_spec_equals_workspace_build(which, request):
    """At tau = 0, bandwidth = 0 the pipeline's spec is the workspace `diffana workspace` builds,
    yield floors included (the 20k-event demo has empty bins: the narrow signal far from its
    peak, which both floor the same way)."""
    config, events = request.getfixturevalue(f"{which}_setup")
    pipeline = AnalysisPipeline.from_config(config, events)
    with torch.no_grad():
        spec = workspace.to_json(pipeline.workspace_spec(0.0, 0.0))
    compare_leaves(spec, workspace.build(config, hard_histograms(config, events)), RTOL)


# ----------------------------------------------------------------------------- fixed cuts
def fixed_cut_config(toy):
    """The toy with fixed (Trainable: false) cuts in three regions, unlike the demo: the SR has
    two trainable cuts and a fixed cut ``eta`` shared with CR_fixed, whose cuts are all fixed;
    CR_lead shares the SR's trainable ``lead`` and has a fixed MET window of its own."""
    raw = toy.config
    raw["Definitions"].append({"Name": "eta1", "Expression": "Muon_eta[:, 0]"})
    eta = {"Name": "eta", "Variable": "eta1", "Direction": "<", "Value": 0.8, "Trainable": False}
    lead = {"Name": "lead", "Variable": "lead_pt", "Direction": ">", "Value": 15.0}
    sr = raw["Regions"][0]
    sr["Cuts"] = [lead | {"Bounds": [5.0, 60.0]}, sr["Cuts"][1], eta]
    raw["Regions"] += [
        {
            "Name": "CR_fixed",
            "Variable": "x",
            "Binning": [-3.0, -1.0, 0.0, 1.0, 3.0],
            "Cuts": [eta, {"Variable": "met", "Direction": ">", "Value": 40.0, "Trainable": False}],
        },
        {
            "Name": "CR_lead",
            "Variable": "x",
            "Binning": [-2.0, -0.5, 0.5, 2.0],
            "Filter": "n_central >= 1",
            "Cuts": [
                lead | {"Bounds": [5.0, 60.0]},
                {"Variable": "met", "Direction": ">", "Value": 20.0, "Trainable": False},
                {"Variable": "met", "Direction": "<", "Value": 90.0, "Trainable": False},
            ],
        },
    ]
    return config_module.from_dict(raw, source="fixed.yaml")


def numpy_histograms(config, events, values, tau, bandwidth, spreads):
    """Per template: fixed cuts as a boolean mask, trainable cuts as
    ``sigmoid(s (x - c) / (tau * spread))`` (boolean at tau = 0), then the KDE histogram
    ``n_b = sum_i v_i m_ib``, ``s_b = sum_i v_i^2 m_ib`` of ``v_i = w_i * prod sigmoid`` with the
    Gaussian kernel mass ``m_ib`` of bin b (``h`` = bandwidth * smallest bin width; an ordinary
    histogram with half-open bins at bandwidth 0)."""
    regions = {region.name: region for region in config.regions}
    out = {}
    for key, ev in events.items():
        region = regions[key[0]]
        edges = np.asarray(region.binning)
        y, w = ev.observable.numpy(), ev.weight.numpy()
        keep, s = np.ones(len(w), dtype=bool), np.ones(len(w))
        for cut in region.cuts:
            sign = 1.0 if cut.direction == ">" else -1.0
            distance = sign * (ev.columns[cut.variable].numpy() - values[cut.name])
            if not cut.trainable:
                keep &= distance > 0
            elif tau == 0:
                s *= distance > 0
            else:
                s *= special.expit(distance / (tau * spreads[cut.name]))
        y, v = y[keep], (w * s)[keep]
        if bandwidth == 0:
            inside = (y >= edges[0]) & (y < edges[-1])
            bins = np.searchsorted(edges, y[inside], side="right") - 1
            n = np.bincount(bins, v[inside], len(edges) - 1)
            n2 = np.bincount(bins, v[inside] ** 2, len(edges) - 1)
        else:
            h = bandwidth * np.diff(edges).min()
            mass = np.diff(special.ndtr((edges[None, :] - y[:, None]) / h), axis=1)
            n, n2 = v @ mass, v**2 @ mass
        out[key] = (n, n2)
    return out


def test_fixed_cuts_are_a_boolean_selection(toy, tmp_path):
    """Fixed cuts are applied as boolean cuts in the relaxed path too: at tau > 0 the KDE
    histograms of every template (variations and data included) equal numpy's with the fixed
    cuts as a mask and the trainable ones as sigmoids, also in a region with fixed cuts only;
    the hard limit equals numpy's boolean selection; a shared trainable cut's temperature scale
    is the weighted IQR / 1.349 of the nominal prediction events that pass the fixed cuts of
    its regions; the gradient in the trainable thresholds equals central finite differences."""
    config = fixed_cut_config(toy)
    events = read_events(config, cache_dir=tmp_path / "cache")
    pipeline = AnalysisPipeline.from_config(config, events)
    assert pipeline.trainable_cut_names == ("lead", "SR:met<")
    names = pipeline.cut_names
    spreads = dict(zip(names, pipeline.cut_spread.tolist(), strict=True))
    # temperature scale of the shared "lead": SR events with eta1 < 0.8 and CR_lead events with
    # 20 < met < 90, nominal prediction samples only; fixed cuts: 0 (boolean)
    x, w = [], []
    for (region, sample, variation), ev in events.items():
        if variation != "nominal" or sample == "Data" or region == "CR_fixed":
            continue
        columns = {name: column.numpy() for name, column in ev.columns.items()}
        keep = (
            columns["eta1"] < 0.8
            if region == "SR"
            else (columns["met"] > 20.0) & (columns["met"] < 90.0)
        )
        x.append(columns["lead_pt"][keep])
        w.append(np.abs(ev.weight.numpy()[keep]))
    q1, q3 = np.quantile(
        np.concatenate(x), [0.25, 0.75], weights=np.concatenate(w), method="inverted_cdf"
    )
    assert spreads["lead"] == pytest.approx((q3 - q1) / 1.3489795003921634, rel=1e-12)
    fixed = [name for name in names if name not in pipeline.trainable_cut_names]
    assert len(fixed) == 4 and all(spreads[name] == 0.0 for name in fixed)

    values = {**config.cut_values(), "lead": 21.0, "SR:met<": 45.0}
    pipeline.set_cut_values(values)
    for tau, bandwidth in ((0.3, 0.5), (0.0, 0.0)):
        with torch.no_grad():
            got = pipeline.histograms(tau, bandwidth)
        expected = numpy_histograms(config, events, values, tau, bandwidth, spreads)
        assert got.keys() == expected.keys()
        assert {key[0] for key in got} == {"SR", "CR_fixed", "CR_lead"}
        assert ("CR_fixed", "Data", "nominal") in got and ("SR", "Background", "Modeling_Up") in got
        for key, (n, n2) in expected.items():
            np.testing.assert_allclose(got[key].yields.numpy(), n, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(got[key].sumw2.numpy(), n2, rtol=1e-10, atol=1e-12)
    # the hard limit is also the hard path's (hard_histograms, boolean cuts at the values)
    assert_close_histograms(got, hard_histograms(config.with_cut_values(values), events))

    def loss():
        hists = pipeline.histograms(0.3, 0.5)
        return sum((h.yields**2 / (h.sumw2 + 1.0)).sum() for h in hists.values())

    (grad,) = torch.autograd.grad(loss(), pipeline.cut_parameters)
    assert bool((grad != 0).all())
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(grad.numel()):
            pipeline.cut_parameters[i] += 1e-5
            up = loss()
            pipeline.cut_parameters[i] -= 2e-5
            down = loss()
            pipeline.cut_parameters[i] += 1e-5
            fd[i] = (up - down) / 2e-5
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=0.0)


# ----------------------------------------------------------------------------- gradients
def test_gradcheck_soft_yield(toy_setup):
    config, events = toy_setup
    pipeline = AnalysisPipeline.from_config(config, subset(events, 150))
    key = ("SR", "Background", "WeightSys_Up")

    def bin_yields(u):
        assert u is pipeline.cut_parameters
        hist = pipeline.histograms(0.3, 0.5)[key]
        return torch.cat([hist.yields, hist.sumw2])

    assert torch.autograd.gradcheck(bin_yields, (pipeline.cut_parameters,), eps=1e-6, atol=1e-7)


def test_gradient_against_finite_differences(toy_setup):
    """d(2 NLL at the suggested init, soft data and soft model)/du against central FD."""
    config, events = toy_setup
    pipeline = AnalysisPipeline.from_config(config, events)

    def relaxed():
        model, data = pipeline(0.2, 0.4)
        return model.twice_nll(model.suggested_init(), data)

    value = relaxed()
    (grad,) = torch.autograd.grad(value, pipeline.cut_parameters)
    assert bool(torch.isfinite(grad).all()) and bool((grad != 0).all())
    step = 1e-5
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(grad.numel()):
            pipeline.cut_parameters[i] += step
            up = relaxed()
            pipeline.cut_parameters[i] -= 2 * step
            down = relaxed()
            pipeline.cut_parameters[i] += step
            fd[i] = (up - down) / (2 * step)
    torch.testing.assert_close(grad, fd, rtol=1e-4, atol=0.0)


# ----------------------------------------------------------------------------- likelihood
def _likelihood_points(config):
    """(cut values, tau, bandwidth): the configured cuts, moved cuts, the hard limit, random."""
    generator = np.random.default_rng(5)
    random = {
        c.name: float(c.bounds[0] + (c.bounds[1] - c.bounds[0]) * generator.uniform(0.1, 0.6))
        for c in config.cuts
    }
    return [
        (config.cut_values(), 0.5, 0.36),
        (other_cut_values(config), 0.2, 0.5),
        (random, 0.05, 0.1),
        (other_cut_values(config), 0.0, 0.0),
    ]


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-300))


def _count_validations(monkeypatch) -> list[str]:
    """The sources of the specs validated by Workspace.from_spec from now on (a list that
    grows with each call)."""
    validations: list[str] = []
    from_spec = Workspace.from_spec.__func__

    def counting_from_spec(cls, spec, *, source="workspace"):
        validations.append(source)
        return from_spec(cls, spec, source=source)

    monkeypatch.setattr(Workspace, "from_spec", classmethod(counting_from_spec))
    return validations


@pytest.mark.parametrize("which", ["toy", "demo"])
def test_likelihood_reuses_its_structure_and_equals_a_fresh_build(which, request, monkeypatch):
    """pipeline.likelihood(pipeline.histograms(tau, h)) validates and builds the model once,
    then feeds new numbers into that structure; at several points the objective (the expected
    discovery significance, with its fits) and its gradient with respect to the cut parameters
    equal those of a model built from scratch from workspace_spec (to 1e-10 relative), and
    model() returns that model with the spec's data. The pipeline's model fits with the numpy
    backend (Model.with_numpy_fits), the one from scratch with torch's: measured, values
    equal to 2.2e-15 and gradients to 4.6e-14 (bit for bit with torch fits on both sides)."""
    config, events = request.getfixturevalue(f"{which}_setup")
    pipeline = AnalysisPipeline.from_config(config, events)
    validations = _count_validations(monkeypatch)
    templates = set()
    for values, tau, bandwidth in _likelihood_points(config):
        pipeline.set_cut_values(values)
        model = pipeline.likelihood(pipeline.histograms(tau, bandwidth))
        templates.add(id(pipeline._likelihood_structure[1]))
        assert model.numpy_fits is not None
        value = objectives.discovery_significance(model)
        (grad,) = torch.autograd.grad(value, pipeline.cut_parameters)
        spec = pipeline.workspace_spec(tau, bandwidth)
        ref = Workspace(spec=spec).model(dtype=torch.float64)  # from scratch
        ref_value = objectives.discovery_significance(ref)
        (ref_grad,) = torch.autograd.grad(ref_value, pipeline.cut_parameters)
        assert float(value.detach()) == pytest.approx(float(ref_value.detach()), rel=1e-12, abs=0)
        assert _relative(grad, ref_grad) <= 1e-10, (tau, bandwidth, grad, ref_grad)
        if tau > 0:
            assert bool(torch.isfinite(grad).all()) and bool((grad != 0).any())
        with torch.no_grad():
            model, data = pipeline.model(tau, bandwidth)
            ref_data = Workspace(spec=spec).data(ref)
            assert torch.equal(data, ref_data)
            init = ref.suggested_init()
            assert torch.equal(model.twice_nll(init, data), ref.twice_nll(init, ref_data))
    assert len(validations) == 1 and len(templates) == 1


def test_likelihood_rebuilds_when_the_structure_changes(toy_setup, monkeypatch):
    """A spec of another structure (here: one normfactor more) is validated and built from
    scratch, and its structure kept; returning to the first structure rebuilds again."""
    config, events = toy_setup
    pipeline = AnalysisPipeline.from_config(config, events)
    build_spec = workspace.build_spec
    extra = {"modifier": False}

    def edited_build_spec(config, histograms):
        spec = build_spec(config, histograms)
        if extra["modifier"]:
            modifier = {"name": "extra", "type": "normfactor", "data": None}
            spec["channels"][0]["samples"][0]["modifiers"].append(modifier)
        return spec

    monkeypatch.setattr(workspace, "build_spec", edited_build_spec)
    validations = _count_validations(monkeypatch)
    with torch.no_grad():
        histograms = pipeline.histograms(0.2, 0.4)
        full = pipeline.likelihood(histograms)
        assert pipeline.likelihood(histograms).npars == full.npars and len(validations) == 1
        extra["modifier"] = True
        more = pipeline.likelihood(histograms)
        assert len(validations) == 2 and more.npars == full.npars + 1
        ref = Workspace(spec=workspace.build_spec(config, histograms)).model()
        init = ref.suggested_init()
        assert torch.equal(more.expected_data(init), ref.expected_data(init))
        assert pipeline.likelihood(histograms).npars == more.npars and len(validations) == 2
        extra["modifier"] = False
        assert pipeline.likelihood(histograms).npars == full.npars and len(validations) == 3


# ----------------------------------------------------------------------------- scales, devices
def test_temperature_scales_are_column_spreads(toy_setup):
    config, events = toy_setup
    pipeline = AnalysisPipeline.from_config(config, events)
    region = config.regions[0]
    nominal = [events[(region.name, s.name, "nominal")] for s in config.samples_in(region)]
    for k, cut in enumerate(region.cuts):
        x = np.concatenate([ev.columns[cut.variable].numpy() for ev in nominal])
        w = np.abs(np.concatenate([ev.weight.numpy() for ev in nominal]))
        q1, q3 = np.quantile(x, [0.25, 0.75], weights=w, method="inverted_cdf")
        expected = (q3 - q1) / 1.3489795003921634
        assert float(pipeline.cut_spread[k]) == pytest.approx(expected, rel=1e-12)
    taus = pipeline.temperatures(0.1)
    torch.testing.assert_close(taus, 0.1 * pipeline.cut_spread)


@pytest.mark.parametrize("device", devices())
def test_to_moves_buffers(toy_setup, device):
    config, events = toy_setup
    pipeline = AnalysisPipeline.from_config(config, events)
    reference = pipeline.histograms(0.2, 0.4)
    moved = pipeline.to(device=device, dtype=torch.float32)
    assert moved is pipeline
    for name, tensor in list(pipeline.named_buffers()) + list(pipeline.named_parameters()):
        assert tensor.device.type == torch.device(device).type, name
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
    got = pipeline.histograms(0.2, 0.4)
    for key, hist in reference.items():
        torch.testing.assert_close(
            got[key].yields.double().cpu(), hist.yields.detach(), rtol=1e-4, atol=1e-4
        )
    model, data = pipeline(0.2, 0.4)
    assert model.dtype == torch.float64 and data.device.type == torch.device(device).type
    value = model.twice_nll(model.suggested_init(), data)
    (grad,) = torch.autograd.grad(value, pipeline.cut_parameters)
    assert bool(torch.isfinite(grad).all())
    # state_dict holds the small state only (events are non-persistent buffers)
    assert not any(k.startswith("t0_") for k in pipeline.state_dict())


# ----------------------------------------------------------------------------- selected counts
def test_selected_counts_are_the_expected_hard_selection(toy_setup):
    """``selected_counts``: at tau = 0 the hard histograms' yields and sum of w^2 exactly; at
    tau > 0 ``sum w s`` and ``sum w^2 s`` per ordinary bin with s the product of sigmoids, by
    numpy on the raw columns; the gradient in the thresholds by central finite differences."""
    config, events = toy_setup
    pipeline = AnalysisPipeline.from_config(config, events)
    keys = [k for k in events if k[2] == "nominal" and k[1] != "Data"]
    hard = hard_histograms(config, events)
    with torch.no_grad():
        counts = pipeline.selected_counts(0.0, keys)
    for key in keys:
        torch.testing.assert_close(counts[key].yields, hard[key].yields, rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(counts[key].sumw2, hard[key].sumw2, rtol=1e-13, atol=1e-12)

    tau = 0.3
    region = config.regions[0]
    edges = np.asarray(region.binning)
    taus = (tau * pipeline.cut_spread).tolist()
    counts = pipeline.selected_counts(tau, keys)
    for key in keys:
        ev = events[key]
        x = ev.columns[region.variable].numpy()
        w = ev.weight.numpy()
        s = np.ones_like(w)
        for k, cut in enumerate(region.cuts):
            sign = 1.0 if cut.direction == ">" else -1.0
            z = sign * (ev.columns[cut.variable].numpy() - cut.value) / taus[k]
            s = s / (1.0 + np.exp(-z))
        inside = (x >= edges[0]) & (x < edges[-1])
        bins = np.searchsorted(edges, x[inside], side="right") - 1
        expected_n = np.bincount(bins, (w * s)[inside], len(edges) - 1)
        expected_v = np.bincount(bins, (w * w * s)[inside], len(edges) - 1)
        np.testing.assert_allclose(counts[key].yields.detach().numpy(), expected_n, rtol=1e-12)
        np.testing.assert_allclose(counts[key].sumw2.detach().numpy(), expected_v, rtol=1e-12)

    def n_eff_total(u):
        with torch.no_grad():
            pipeline.cut_parameters.copy_(u)
        c = pipeline.selected_counts(tau, keys)
        return sum(float((h.yields**2 / h.sumw2).sum().detach()) for h in c.values()), c

    u0 = pipeline.cut_parameters.detach().clone()
    _, c = n_eff_total(u0)
    total = sum((h.yields**2 / h.sumw2).sum() for h in c.values())
    (grad,) = torch.autograd.grad(total, pipeline.cut_parameters)
    for i in range(len(u0)):
        step = torch.zeros_like(u0)
        step[i] = 1e-5
        numeric = (n_eff_total(u0 + step)[0] - n_eff_total(u0 - step)[0]) / 2e-5
        assert float(grad[i]) == pytest.approx(numeric, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("knobs", [(0.3, 0.5), (0.0, 0.0)], ids=["soft", "hard"])
def test_histograms_and_selected_counts_share_one_selection(toy_setup, knobs):
    """``histograms_and_selected_counts`` (the optimizer's step: the guard's counts from the
    histograms' selection weights) equals ``histograms`` and ``selected_counts`` computed
    separately: the same numbers bit for bit, and the gradient of a loss of both in the
    thresholds to 1e-12."""
    config, events = toy_setup
    tau, bandwidth = knobs
    pipeline = AnalysisPipeline.from_config(config, events)
    pipeline.set_cut_values(other_cut_values(config))
    keys = [k for k in events if k[2] == "nominal" and k[1] != "Data"]

    def loss_of(hists, counts):
        fit_like = sum((h.yields**2 / (h.sumw2 + 1.0)).sum() for h in hists.values())
        n_eff = sum((c.yields**2 / c.sumw2.clamp(min=1e-300)).sum() for c in counts.values())
        return fit_like + n_eff

    together = pipeline.histograms_and_selected_counts(tau, bandwidth, keys)
    separate = (pipeline.histograms(tau, bandwidth), pipeline.selected_counts(tau, keys))
    assert together[1].keys() == set(keys)
    for got, ref in zip(together, separate, strict=True):
        assert got.keys() == ref.keys()
        for key in ref:
            assert torch.equal(got[key].yields, ref[key].yields), key
            assert torch.equal(got[key].sumw2, ref[key].sumw2), key
    assert pipeline.histograms_and_selected_counts(tau, bandwidth, [])[1] == {}
    if tau > 0:
        grads = [
            torch.autograd.grad(loss_of(*result), pipeline.cut_parameters)[0]
            for result in (together, separate)
        ]
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
        assert bool((grads[0] != 0).any())


@pytest.mark.parametrize("which", ["toy", "demo"])
def test_variation_sumw2_off_changes_nothing_the_likelihood_uses(which, request):
    """``variation_sumw2=False`` (the optimizer's step) leaves out the sums of w^2 of the
    systematic variations only (None), keeps every yield and the nominal sums of w^2 (to
    1e-13), and gives the same discovery significance (1e-12) and gradient in the thresholds
    (1e-10) as the call with all of them."""
    config, events = request.getfixturevalue(f"{which}_setup")
    pipeline = AnalysisPipeline.from_config(config, events)
    pipeline.set_cut_values(other_cut_values(config))
    keys = [k for k in events if k[2] == "nominal" and k[1] != "Data"]
    results = {}
    for full in (True, False):
        hists, counts = pipeline.histograms_and_selected_counts(
            0.3, 0.5, keys, variation_sumw2=full
        )
        value = objectives.discovery_significance(pipeline.likelihood(hists))
        (grad,) = torch.autograd.grad(value, pipeline.cut_parameters)
        results[full] = (hists, counts, value.detach(), grad)
    (full, counts, value, grad), (part, part_counts, part_value, part_grad) = results.values()
    assert full.keys() == part.keys()
    for key, ref in full.items():
        np.testing.assert_allclose(part[key].yields.detach(), ref.yields.detach(), rtol=1e-13)
        if key[2] == "nominal":
            np.testing.assert_allclose(part[key].sumw2.detach(), ref.sumw2.detach(), rtol=1e-13)
        else:
            assert part[key].sumw2 is None
    assert any(key[2] != "nominal" for key in full)
    for key, ref in counts.items():
        assert torch.equal(part_counts[key].yields, ref.yields)
    assert float(part_value) == pytest.approx(float(value), rel=1e-12)
    assert bool((grad != 0).any())
    np.testing.assert_allclose(part_grad, grad, rtol=1e-10, atol=1e-12 * float(grad.abs().max()))
