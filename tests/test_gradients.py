"""Gradients through fits: inference results as functions of input yields.

Each quantity is a function of the signal and background yields of a small model built from
tensors; its autograd gradient (envelope theorem for profiled values, implicit function theorem
for fitted parameters and limit roots) is checked with torch.autograd.gradcheck and against
central finite differences (relative 1e-4).
"""

from __future__ import annotations

import pytest
import torch

from analysis import inference
from analysis.likelihood import Workspace

OBSERVED = [57.0, 66.0, 41.0]


def model_of(yields: torch.Tensor):
    """A 3-bin model: signal (mu), background with normsys, histosys and staterror."""
    signal, background = yields[:3], yields[3:]
    shape = torch.tensor([1.06, 1.0, 0.95], dtype=yields.dtype)
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
                    {
                        "name": "background",
                        "data": background,
                        "modifiers": [
                            {
                                "name": "bkg_norm",
                                "type": "normsys",
                                "data": {"hi": 1.08, "lo": 0.93},
                            },
                            {
                                "name": "bkg_shape",
                                "type": "histosys",
                                "data": {
                                    "hi_data": background * shape,
                                    "lo_data": background / shape,
                                },
                            },
                            {
                                "name": "staterror_SR",
                                "type": "staterror",
                                "data": 0.04 * background,
                            },
                        ],
                    },
                ],
            }
        ],
        "observations": [{"name": "SR", "data": OBSERVED}],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }
    ws = Workspace.from_spec(spec)
    model = ws.model()
    return model, ws.data(model)


def profiled_twice_nll(y):
    model, data = model_of(y)
    return inference.free_fit(model, data)[1]


def q0(y):
    model, data = model_of(y)
    return inference.hypotest(model, data, 0.0, "q0").teststat


def qtilde(y):
    model, data = model_of(y)
    return inference.hypotest(model, data, 2.0, "qtilde").teststat


def cls(y):
    model, data = model_of(y)
    result = inference.hypotest(model, data, 2.0, "qtilde")
    return torch.cat([result.cls_obs.reshape(1), result.cls_exp])


def fitted_poi(y):
    model, data = model_of(y)
    return inference.free_fit(model, data)[0][model.poi_index]


def sigma_mu(y):
    model, data = model_of(y)
    return inference.poi_uncertainty(model, data)


def expected_limit(y):
    model, data = model_of(y)
    # a bracket around the limit at the nominal yields keeps the bisection short
    return inference.upper_limits(model, data, xtol=1e-11)[3]


YIELDS = torch.tensor([4.0, 11.0, 5.0, 50.0, 52.0, 35.0], dtype=torch.float64)
FUNCTIONS = [profiled_twice_nll, q0, qtilde, cls, fitted_poi, sigma_mu, expected_limit]


@pytest.mark.parametrize("function", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_gradient_against_central_differences(function):
    y = YIELDS.clone().requires_grad_(True)
    value = function(y).reshape(-1)
    assert torch.isfinite(value).all() and (value.abs() > 1e-6).all()
    analytic = torch.stack(
        [torch.autograd.grad(v, y, retain_graph=True)[0] for v in value]
    )  # (outputs, inputs)
    numeric = torch.empty_like(analytic)
    with torch.no_grad():
        for i in range(YIELDS.shape[0]):
            step = 1e-5 * float(YIELDS[i])
            up, down = YIELDS.clone(), YIELDS.clone()
            up[i] += step
            down[i] -= step
            numeric[:, i] = (function(up).reshape(-1) - function(down).reshape(-1)) / (2 * step)
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("function", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_gradcheck(function):
    y = YIELDS.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(function, (y,), eps=1e-5, atol=1e-7, rtol=1e-4)
