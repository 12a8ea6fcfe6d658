"""Objectives: the Asimov formula, each objective against the inference function on Asimov data
built independently here (and pyhf for the limit), gradients against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pyhf
import pytest
import torch

from analysis import config as config_module
from analysis import inference, objectives, workspace
from analysis.errors import ConfigError
from analysis.io import read_events
from analysis.likelihood import Workspace
from analysis.pipeline import AnalysisPipeline

TAU, BANDWIDTH = 0.2, 0.4


@pytest.fixture
def pipeline(toy, tmp_path):
    config = config_module.from_dict(toy.config, source="toy.yaml")
    return AnalysisPipeline.from_config(config, read_events(config, cache_dir=tmp_path / "c"))


def small_model(signal=(3.0, 6.0, 2.0), background=(50.0, 40.0, 30.0), systematics=True):
    signal = torch.as_tensor(signal, dtype=torch.float64)
    background = torch.as_tensor(background, dtype=torch.float64)
    modifiers = []
    if systematics:
        shape = torch.tensor([1.06, 1.0, 0.95], dtype=torch.float64)[: background.numel()]
        modifiers = [
            {"name": "bkg_norm", "type": "normsys", "data": {"hi": 1.08, "lo": 0.93}},
            {
                "name": "bkg_shape",
                "type": "histosys",
                "data": {"hi_data": background * shape, "lo_data": background / shape},
            },
            {"name": "staterror_SR", "type": "staterror", "data": 0.04 * background},
        ]
    spec = {
        "channels": [
            {
                "name": "SR",
                "samples": [
                    {
                        "name": "signal",
                        "data": signal,
                        "modifiers": [{"name": "mu", "type": "normfactor", "data": None}],
                    },
                    {"name": "background", "data": background, "modifiers": modifiers},
                ],
            }
        ],
        "observations": [{"name": "SR", "data": background.tolist()}],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }
    ws = Workspace.from_spec(spec)
    model = ws.model()
    return model, ws.data(model), spec


def independent_asimov(model, mu):
    pars = model.suggested_init().clone()
    pars[model.poi_index] = mu
    return model.expected_data(pars)


# ----------------------------------------------------------------------------- asimov_z
def test_asimov_z_formula():
    rng = np.random.default_rng(1)
    s, b = rng.uniform(0.1, 20, (4, 7)), rng.uniform(1, 200, (4, 7))
    expected = np.sqrt(np.sum(2 * ((s + b) * np.log(1 + s / b) - s), axis=-1))
    got = objectives.asimov_z(torch.from_numpy(s), torch.from_numpy(b))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13)
    # s = 10 on b = 100: sqrt(2 (110 ln 1.1 - 10)) = 0.983992, a little below s / sqrt(b)
    z = objectives.asimov_z(torch.tensor([10.0]).double(), torch.tensor([100.0]).double())
    assert float(z) == pytest.approx(0.9839916447569484, rel=1e-12)
    assert float(
        objectives.asimov_z(torch.tensor([1e-4]).double(), torch.tensor([1e4]).double())
    ) == pytest.approx(1e-6, rel=1e-6)


def test_asimov_significance_is_asimov_z_of_the_spec(pipeline):
    with torch.no_grad():
        model, data = pipeline(TAU, BANDWIDTH)
        spec = pipeline.workspace_spec(TAU, BANDWIDTH)
        samples = {s["name"]: s["data"] for s in spec["channels"][0]["samples"]}
        s = samples["Signal"]
        b = sum(v for k, v in samples.items() if k != "Signal")
        expected = objectives.asimov_z(s, b)
        got = objectives.OBJECTIVES["asimov_significance"](model, data)
    assert float(got) == pytest.approx(float(expected), rel=1e-12)


def test_discovery_significance_without_systematics_is_asimov_z():
    model, data, _ = small_model(signal=[7.0], background=[20.0], systematics=False)
    assert model.npars == 1
    z = objectives.OBJECTIVES["discovery_significance"](model, data)
    expected = objectives.asimov_z(torch.tensor([7.0]).double(), torch.tensor([20.0]).double())
    assert float(z) == pytest.approx(float(expected), rel=1e-6)


# ----------------------------------------------------------------------------- vs inference
def test_objectives_equal_inference_on_asimov_data():
    model, data, spec = small_model()
    asimov_s, asimov_b = independent_asimov(model, 1.0), independent_asimov(model, 0.0)
    with torch.no_grad():
        z = objectives.OBJECTIVES["discovery_significance"](model, data)
        q0 = inference.hypotest(model, asimov_s, 0.0, "q0").teststat
        assert float(z) == pytest.approx(math.sqrt(float(q0)), rel=1e-6)
        cls = objectives.OBJECTIVES["cls"](model, data)
        result = inference.hypotest(model, asimov_b, 1.0, "qtilde")
        assert float(cls) == pytest.approx(float(result.cls_obs), rel=1e-10)
        assert float(cls) == pytest.approx(float(result.cls_exp[2]), rel=1e-6)  # the median
        sigma = objectives.OBJECTIVES["poi_uncertainty"](model, data)
        assert float(sigma) == pytest.approx(
            float(inference.poi_uncertainty(model, asimov_s)), rel=1e-10
        )
        limit = objectives.OBJECTIVES["upper_limit"](model, data)
        limits = inference.upper_limits(model, asimov_b)
        assert float(limit) == pytest.approx(float(limits[3]), rel=1e-10)
        assert float(limits[0]) == pytest.approx(float(limits[3]), rel=1e-4)  # observed = median
    # pyhf (numpy backend) on the same Asimov workspace
    pyhf.set_backend("numpy")
    pyhf_model = pyhf.Workspace(workspace.to_json(spec)).model()
    init = pyhf_model.config.suggested_init()
    init[pyhf_model.config.poi_index] = 0.0
    pyhf_asimov = pyhf_model.expected_data(init)
    np.testing.assert_allclose(pyhf_asimov, asimov_b.numpy(), rtol=1e-10)
    _, expected = pyhf.infer.intervals.upper_limits.upper_limit(pyhf_asimov, pyhf_model)
    assert float(limit) == pytest.approx(float(expected[2]), rel=1e-2)


def test_objective_directions_and_registry():
    assert set(objectives.OBJECTIVES) == {
        "discovery_significance",
        "cls",
        "poi_uncertainty",
        "upper_limit",
        "asimov_significance",
    }
    assert {n for n, o in objectives.OBJECTIVES.items() if o.maximize} == {
        "discovery_significance",
        "asimov_significance",
    }
    for name, objective in objectives.OBJECTIVES.items():
        assert objective.name == name and objective.formula
        assert objectives.get_objective(name) is objective
    with pytest.raises(ConfigError) as info:
        objectives.get_objective("significance")
    for name in objectives.OBJECTIVES:
        assert name in str(info.value)
    model, data, _ = small_model()
    objective = objectives.get_objective("discovery_significance")
    assert float(objective.loss(model, data)) == -float(objective(model, data))


# ----------------------------------------------------------------------------- gradients
def finite_differences(pipeline, function, step=1e-5):
    grad = torch.zeros_like(pipeline.cut_parameters)
    with torch.no_grad():
        for i in range(grad.numel()):
            pipeline.cut_parameters[i] += step
            up = function(*pipeline(TAU, BANDWIDTH))
            pipeline.cut_parameters[i] -= 2 * step
            down = function(*pipeline(TAU, BANDWIDTH))
            pipeline.cut_parameters[i] += step
            grad[i] = (up - down) / (2 * step)
    return grad


@pytest.mark.parametrize(
    "name", ["discovery_significance", "asimov_significance", "poi_uncertainty"]
)
def test_gradient_against_finite_differences(pipeline, name):
    objective = objectives.OBJECTIVES[name]
    value = objective(*pipeline(TAU, BANDWIDTH))
    (grad,) = torch.autograd.grad(value, pipeline.cut_parameters)
    assert bool(torch.isfinite(grad).all()) and bool((grad != 0).any())
    fd = finite_differences(pipeline, objective)
    torch.testing.assert_close(grad, fd, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))


@pytest.mark.parametrize("name", ["cls", "upper_limit"])
def test_gradient_is_finite(pipeline, name):
    """The toy's signal is strong (expected CLs ~ 1e-50), too far in the tail for a finite
    difference check of cls; these two are checked for finite, non-zero gradients here and
    against finite differences on small models in tests/test_gradients.py."""
    value = objectives.OBJECTIVES[name](*pipeline(TAU, BANDWIDTH))
    (grad,) = torch.autograd.grad(value, pipeline.cut_parameters)
    assert bool(torch.isfinite(grad).all()) and bool((grad != 0).any())
