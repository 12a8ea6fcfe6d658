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
    toy.config["Regions"][0]["Cuts"][1]["Trainable"] = False
    config = config_module.from_dict(toy.config)
    pipeline = AnalysisPipeline.from_config(config, cache_dir=tmp_path / "cache")
    assert pipeline.trainable_cut_names == (config.cuts[0].name,)
    assert pipeline.cut_parameters.shape == (1,)
    pipeline.set_cut_values({config.cuts[1].name: 100.0})
    assert pipeline.cut_values()[config.cuts[1].name] == 100.0
    values = other_cut_values(config)
    pipeline.set_cut_values(values)
    expected = hard_histograms(config.with_cut_values(pipeline.cut_values()), _events(pipeline))
    assert_close_histograms(pipeline.histograms(0.0, 0.0), expected)


def _events(pipeline):
    """The events a pipeline holds, as read_events returns them (for hard_histograms)."""
    out = {}
    for slot in pipeline._slots:
        region = pipeline.config.regions[slot.region]
        columns = {region.variable: getattr(pipeline, slot.prefix + "observable")}
        for k, cut in enumerate(region.cuts):
            columns[cut.variable] = getattr(pipeline, f"{slot.prefix}x{k}")
        out[slot.key] = Events(region.variable, columns, getattr(pipeline, slot.prefix + "weight"))
    return out


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
    equal those of a model built from scratch from workspace_spec (to 1e-10 relative;
    measured: bit for bit), and model() returns that model with the spec's data."""
    config, events = request.getfixturevalue(f"{which}_setup")
    pipeline = AnalysisPipeline.from_config(config, events)
    validations = _count_validations(monkeypatch)
    templates = set()
    for values, tau, bandwidth in _likelihood_points(config):
        pipeline.set_cut_values(values)
        model = pipeline.likelihood(pipeline.histograms(tau, bandwidth))
        templates.add(id(pipeline._likelihood_structure[1]))
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
