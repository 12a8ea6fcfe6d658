"""MC statistics: effective events, the guard, and a problem whose background MC runs out.

The test problem (``thin_tail``): a falling background whose simulation is a few thousand
events, and a signal with a harder tail in the cut variable. Raising the cut always improves
the true significance here (``s/sqrt(b)`` grows like ``exp(c/60 - c/30)``), so an optimizer is
only held back by the simulation: without the guard it raises the cut until the background
MC of most bins is one or two events (or none), where the expected significance it reports is
an artefact. The reference is independent of diffana: pyhf's profile likelihood on the written
workspace after merging every bin whose background MC has fewer than 10 effective events into
its neighbour.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pyhf
import pytest
import torch
import yaml

from analysis import config as configuration
from analysis import mc_statistics, optimize, workspace
from analysis.histograms import Histogram, hard_histograms
from tests.conftest import write_tree

GUARD = 10.0


# ----------------------------------------------------------------------------- unit level
def test_effective_events_against_numpy():
    rng = np.random.default_rng(3)
    w = rng.uniform(0.2, 3.0, 500) * np.where(rng.uniform(size=500) < 0.1, -1, 1)
    b = rng.integers(0, 5, 500)
    yields = np.bincount(b, w, 5)
    sumw2 = np.bincount(b, w * w, 5)
    yields[4], sumw2[4] = 0.0, 0.0  # an empty bin
    n_eff = mc_statistics.effective_events(torch.tensor(yields), torch.tensor(sumw2))
    expected = np.where(yields > 0, yields**2 / np.where(sumw2 > 0, sumw2, 1), 0.0)
    np.testing.assert_allclose(n_eff.numpy(), expected, rtol=1e-14)
    assert n_eff[4] == 0.0
    # unit weights count events; n_eff does not depend on the scale of the weights
    ones = torch.ones(7, dtype=torch.float64)
    assert float(mc_statistics.effective_events(ones.sum(), (ones**2).sum())) == 7.0
    assert float(mc_statistics.effective_events(0.01 * ones.sum(), 1e-4 * ones.sum())) == (
        pytest.approx(7.0, rel=1e-14)
    )


def test_guard_factor_and_its_gradient():
    n = {
        "SR": torch.tensor([20.0, 5.0, 12.0], dtype=torch.float64, requires_grad=True),
        "CR": torch.tensor([2.5, 40.0], dtype=torch.float64, requires_grad=True),
    }
    g = mc_statistics.guard_factor(n, 10.0)
    assert float(g.detach()) == pytest.approx((0.5**2) * (0.25**2), rel=1e-15)
    assert mc_statistics.guard_factor(n, 0.0) is None
    grad = torch.autograd.grad(g, [n["SR"], n["CR"]])
    g = g.detach()
    # d g / d n_b = g * 2 / n_b below the guard, 0 above it
    np.testing.assert_allclose(grad[0].numpy(), [0.0, float(g) * 2 / 5.0, 0.0], rtol=1e-14)
    np.testing.assert_allclose(grad[1].numpy(), [float(g) * 2 / 2.5, 0.0], rtol=1e-14)
    value = torch.tensor(3.0, dtype=torch.float64)
    assert float(mc_statistics.guarded(value, g, maximize=True)) == pytest.approx(3 * float(g))
    assert float(mc_statistics.guarded(value, g, maximize=False)) == pytest.approx(3 / float(g))
    assert mc_statistics.guarded(value, None, maximize=True) is value


# ----------------------------------------------------------------------------- test problem
@pytest.fixture
def thin_tail(tmp_path):
    """Config dict of the test problem (module docstring), files in ``tmp_path``."""
    return thin_tail_config(tmp_path)


def thin_tail_config(tmp_path):
    """Write the test problem's ROOT files into ``tmp_path``; return its config dict."""
    rng = np.random.default_rng(11)

    def sample(n, pt_scale, mass):
        return {
            "pt": 20.0 + rng.exponential(pt_scale, n),
            "m": mass(n),
            "weight": np.full(n, 1.0),
        }

    background = sample(3000, 15.0, lambda n: rng.uniform(0.0, 12.0, n))
    background["weight"] *= 0.2  # 600 expected events
    signal = sample(1000, 60.0, lambda n: np.clip(rng.normal(6.0, 2.5, n), 0.01, 11.99))
    signal["weight"] *= 0.01  # 10 expected events
    write_tree(tmp_path / "mc.root", "bkg", background)
    write_tree(tmp_path / "mc.root", "sig", signal)
    data = sample(600, 15.0, lambda n: rng.uniform(0.0, 12.0, n))
    write_tree(tmp_path / "data.root", "data", data)
    return {
        "General": {
            "Measurement": "thin_tail",
            "POI": "mu",
            "InputPath": str(tmp_path / "{SamplePath}"),
        },
        "Regions": [
            {
                "Name": "SR",
                "Variable": "m",
                "Binning": [float(x) for x in range(13)],
                "Cuts": [
                    {"Variable": "pt", "Direction": ">", "Value": 25.0, "Bounds": [20.0, 200.0]}
                ],
            }
        ],
        "Samples": [
            {"Name": "Data", "Tree": "data", "SamplePath": "data.root", "Data": True},
            {"Name": "Signal", "Tree": "sig", "SamplePath": "mc.root", "Weight": "weight"},
            {"Name": "Background", "Tree": "bkg", "SamplePath": "mc.root", "Weight": "weight"},
        ],
        "NormFactors": [{"Name": "mu", "Samples": "Signal", "Nominal": 1, "Bounds": [0, 10]}],
        "Optimization": {
            "Objective": "discovery_significance",
            "Steps": 60,
            "LearningRate": 0.3,
            "EvaluateEvery": 3,
            "CheckpointEvery": 1000,
            "Temperature": {"Initial": 0.3, "Final": 0.02},
        },
    }


def background_names(spec):
    """Samples without the POI's normfactor (the background), from the workspace alone."""
    poi = spec["measurements"][0]["config"]["poi"]
    return {
        sample["name"]
        for channel in spec["channels"]
        for sample in channel["samples"]
        if not any(m["type"] == "normfactor" and m["name"] == poi for m in sample["modifiers"])
    }


def background_n_eff(channel, background):
    """n_eff per bin of the ``background`` samples of a pyhf channel: yields and staterror data
    (sqrt(sum w^2) per sample, as cabinetry writes them)."""
    yields = np.zeros(len(channel["samples"][0]["data"]))
    sumw2 = np.zeros_like(yields)
    for sample in channel["samples"]:
        if sample["name"] in background:
            yields += sample["data"]
            stat = next(m for m in sample["modifiers"] if m["type"] == "staterror")
            sumw2 += np.square(stat["data"])
    return np.where((yields > 0) & (sumw2 > 0), yields**2 / np.where(sumw2 > 0, sumw2, 1), 0.0)


def merge_thin_bins(spec, minimum=GUARD):
    """The workspace with every bin whose background n_eff is below ``minimum`` merged into a
    neighbour (the thinner one), repeated until none is left: yields, observations and
    histosys templates add; staterror and shapesys uncertainties add in quadrature; normsys,
    normfactor and lumi are per sample and stay."""
    spec = copy.deepcopy(spec)
    background = background_names(spec)
    for channel, observation in zip(spec["channels"], spec["observations"], strict=True):
        while len(observation["data"]) > 1:
            n_eff = background_n_eff(channel, background)
            if n_eff.min() >= minimum:
                break
            b = int(np.argmin(n_eff))
            neighbours = [j for j in (b - 1, b + 1) if 0 <= j < len(n_eff)]
            j = min(neighbours, key=lambda k: n_eff[k])
            lo, hi = min(b, j), max(b, j)

            def merged(values, quadrature=False, lo=lo, hi=hi):
                values = list(values)
                if quadrature:
                    joined = float(np.hypot(values[lo], values[hi]))
                else:
                    joined = values[lo] + values[hi]
                return values[:lo] + [joined] + values[hi + 1 :]

            observation["data"] = merged(observation["data"])
            for sample in channel["samples"]:
                sample["data"] = merged(sample["data"])
                for modifier in sample["modifiers"]:
                    kind = modifier["type"]
                    assert kind != "shapefactor", "a shapefactor cannot be merged"
                    if kind in ("staterror", "shapesys"):
                        modifier["data"] = merged(modifier["data"], quadrature=True)
                    elif kind == "histosys":
                        for side in ("hi_data", "lo_data"):
                            modifier["data"][side] = merged(modifier["data"][side])
    return spec


def pyhf_discovery_z(spec):
    """Expected discovery significance sqrt(q0) on the mu = 1 Asimov data (nuisance
    parameters at their suggested init), pyhf (numpy, scipy), both fits profiled."""
    model = pyhf.Workspace(spec).model()
    init = model.config.suggested_init()
    init[model.config.poi_index] = 1.0
    asimov = model.expected_data(init)
    _, free = pyhf.infer.mle.fit(asimov, model, return_fitted_val=True)
    _, null = pyhf.infer.mle.fixed_poi_fit(0.0, asimov, model, return_fitted_val=True)
    return float(np.sqrt(max(float(null) - float(free), 0.0)))


def run_optimize(raw, out, minimum):
    raw = copy.deepcopy(raw)
    raw["Optimization"]["MinEffectiveEvents"] = minimum
    config = configuration.from_dict(raw, source="thin_tail.yaml")
    result = optimize.optimize(config, out_dir=out, progress=False)
    best = config_at(raw, result.best.cuts)
    spec = workspace.build(best, hard_histograms(best))
    return result, spec


def config_at(raw, cuts):
    raw = copy.deepcopy(raw)
    raw["Regions"][0]["Cuts"][0]["Value"] = cuts["SR:pt>"]
    return configuration.from_dict(raw, source="thin_tail.yaml")


def test_guard_keeps_the_reported_significance_honest(thin_tail, tmp_path):
    """With the guard (10 effective background events per bin) the optimized point keeps every
    bin populated, and its reported Z agrees within 20% with pyhf's Z of the written workspace
    with thin bins merged (here: none to merge); the optimizer still improved on the start."""
    result, spec = run_optimize(thin_tail, tmp_path / "guarded", GUARD)
    reported = result.best.hard
    assert result.best.below_guard == ()
    n_eff = background_n_eff(spec["channels"][0], {"Background"})
    assert n_eff.min() >= GUARD * (1 - 1e-12)  # sum w^2 rebuilt from sqrt(sum w^2): rounding
    reference = pyhf_discovery_z(merge_thin_bins(spec))
    assert reported == pytest.approx(reference, rel=0.2)
    assert reported > 1.2 * result.initial.hard
    written = json.loads((tmp_path / "guarded" / "result.json").read_text())
    table = written["mc_statistics"]["effective_events"]["best"]["SR"]
    np.testing.assert_allclose(table["background"], n_eff, rtol=1e-9)
    assert written["mc_statistics"]["min_effective_events"] == GUARD


def test_without_the_guard_the_artefact_is_detected(thin_tail, tmp_path):
    """Guard off: the optimizer raises the cut until bins hold (almost) no background MC, and
    the Z it reports exceeds the merged-bins pyhf Z by more than 20% (the artefact this guard
    prevents); the same point is flagged below the guard when the guard is on."""
    result, spec = run_optimize(thin_tail, tmp_path / "unguarded", 0.0)
    n_eff = background_n_eff(spec["channels"][0], {"Background"})
    assert n_eff.min() < GUARD
    reported = result.best.hard
    reference = pyhf_discovery_z(merge_thin_bins(spec))
    assert reported > 1.2 * reference
    guarded, _ = run_optimize(thin_tail, tmp_path / "guarded", GUARD)
    assert result.best.hard > guarded.best.hard
    config = config_at(thin_tail, result.best.cuts)
    below = mc_statistics.below_guard(
        config, mc_statistics.background_effective_events(config, hard_histograms(config)), GUARD
    )
    assert [b["bin"] for b in below] == [b for b in range(len(n_eff)) if n_eff[b] < GUARD]


def test_summary_names_every_thin_bin(thin_tail):
    """below_guard lists exactly the bins with background n_eff < minimum, with their edges."""
    raw = copy.deepcopy(thin_tail)
    raw["Regions"][0]["Cuts"][0]["Value"] = 110.0
    config = configuration.from_dict(raw)
    hists = hard_histograms(config)
    record = mc_statistics.summary(config, hists, GUARD)
    bkg: Histogram = hists[("SR", "Background", "nominal")]
    expected = mc_statistics.effective_events(bkg.yields, bkg.sumw2).tolist()
    assert record["effective_events"]["SR"]["background"] == expected
    assert record["effective_events"]["SR"]["Background"] == expected
    assert "Signal" not in record["effective_events"]["SR"]
    thin = [b for b, n in enumerate(expected) if n < GUARD]
    assert thin and [b["bin"] for b in record["below_guard"]] == thin
    assert all(b["high"] - b["low"] == 1.0 and b["low"] == b["bin"] for b in record["below_guard"])
    text = mc_statistics.describe(record["below_guard"], limit=2)
    assert text.startswith(f"SR bin {thin[0]} [{thin[0]:g}, {thin[0] + 1:g}): n_eff = ")


def test_config_default_guard():
    raw = yaml.safe_load(
        """
General: {Measurement: m, POI: mu, InputPath: x}
Regions: [{Name: SR, Variable: m, Binning: [0, 1, 2]}]
Samples:
  - {Name: Data, Tree: t, SamplePath: d.root, Data: true}
  - {Name: S, Tree: t, SamplePath: s.root}
NormFactors: [{Name: mu, Samples: S}]
"""
    )
    assert configuration.from_dict(raw).optimization.min_effective_events == 10.0
    raw["Optimization"] = {"MinEffectiveEvents": -1}
    with pytest.raises(Exception, match="MinEffectiveEvents"):
        configuration.from_dict(raw)
