"""The structured exact Hessian (analysis.likelihood.derivatives) against autograd's.

Autograd of ``Model.twice_nll`` (P backward passes, the independent reference) and the
structured formula must agree to rounding on every modifier type and interpolation code, at
kinks, with factors that are exactly 0 (a normfactor at its bound), with empty bins, for batches,
for yield-batched models and across batch chunks.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from analysis import fit
from analysis.likelihood import Workspace, derivatives
from analysis.likelihood.model import Model, TwiceNLL

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
PUBLISHED = REFERENCE / "published" / "ANA-SUSY-2018-16_with_signal.json"


def _spec() -> dict:
    """Two channels, four samples, every modifier type; 'shared' is a normsys and a histosys
    of one sample, staterror spans two samples, shapefactor acts on the control region, the
    signal has two normfactors (two factors of one block can be 0 together)."""

    def sample(name, data, modifiers):
        return {"name": name, "data": data, "modifiers": modifiers}

    sr = [
        sample(
            "signal",
            [3.0, 6.0, 2.0],
            [
                {"name": "mu", "type": "normfactor", "data": None},
                {"name": "k_sig", "type": "normfactor", "data": None},
                {"name": "lumi", "type": "lumi", "data": None},
                {"name": "sig_norm", "type": "normsys", "data": {"hi": 1.1, "lo": 0.85}},
            ],
        ),
        sample(
            "ttbar",
            [20.0, 14.0, 0.0],
            [
                {"name": "k_tt", "type": "normfactor", "data": None},
                {"name": "lumi", "type": "lumi", "data": None},
                {"name": "shared", "type": "normsys", "data": {"hi": 1.2, "lo": 0.9}},
                {
                    "name": "shared",
                    "type": "histosys",
                    "data": {"hi_data": [22.0, 13.0, 0.5], "lo_data": [19.0, 15.5, 0.0]},
                },
                {"name": "stat_SR", "type": "staterror", "data": [1.5, 1.2, 0.1]},
            ],
        ),
        sample(
            "dy",
            [8.0, 5.0, 1.0],
            [
                {"name": "jes", "type": "normsys", "data": {"hi": 1.05, "lo": 0.7}},
                {
                    "name": "jer",
                    "type": "histosys",
                    "data": {"hi_data": [9.0, 5.5, 1.3], "lo_data": [7.5, 4.0, 0.8]},
                },
                {"name": "stat_SR", "type": "staterror", "data": [1.0, 0.9, 0.5]},
                {"name": "dy_shape", "type": "shapesys", "data": [0.8, 0.6, 0.4]},
            ],
        ),
    ]
    cr = [
        sample(
            "ttbar",
            [50.0, 30.0],
            [
                {"name": "k_tt", "type": "normfactor", "data": None},
                {"name": "shared", "type": "normsys", "data": {"hi": 1.15, "lo": 0.8}},
                {"name": "cr_shape", "type": "shapefactor", "data": None},
                {"name": "jes", "type": "normsys", "data": {"hi": 0.9, "lo": 1.12}},
            ],
        ),
        sample("other", [5.0, 3.0], [{"name": "lumi", "type": "lumi", "data": None}]),
    ]
    return {
        "channels": [{"name": "SR", "samples": sr}, {"name": "CR", "samples": cr}],
        "observations": [{"name": "SR", "data": [33, 22, 0]}, {"name": "CR", "data": [48, 35]}],
        "measurements": [
            {
                "name": "meas",
                "config": {
                    "poi": "mu",
                    "parameters": [
                        {
                            "name": "lumi",
                            "auxdata": [1.0],
                            "sigmas": [0.02],
                            "inits": [1.0],
                            "bounds": [[0.5, 1.5]],
                        }
                    ],
                },
            }
        ],
        "version": "1.0.0",
    }


def _autograd(model: Model, pars: torch.Tensor, data: torch.Tensor):
    return fit.value_grad_hessian(lambda p: model.twice_nll(p, data), pars)


def _assert_same(model: Model, pars: torch.Tensor, data: torch.Tensor) -> None:
    value, grad, hessian = derivatives.twice_nll_derivatives(model, pars, data)
    ref_value, ref_grad, ref_hessian = _autograd(model, pars, data)
    assert value.shape == ref_value.shape and hessian.shape == ref_hessian.shape
    torch.testing.assert_close(value, ref_value, rtol=1e-14, atol=0)
    scale = ref_grad.abs().amax().clamp_min(1.0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12 * float(scale))
    scale = ref_hessian.abs().amax()
    torch.testing.assert_close(hessian, ref_hessian, rtol=0, atol=1e-12 * float(scale))


def _points(model: Model, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    init = model.suggested_init()
    low, high = model.suggested_bounds().T
    pars = init + 0.4 * torch.randn(n, model.npars, generator=generator, dtype=torch.float64)
    return torch.minimum(torch.maximum(pars, low + 1e-3), high)


@pytest.mark.parametrize(
    "settings",
    [
        None,  # pyhf's model default: normsys code4, histosys code4p
        {"normsys": {"interpcode": "code1"}, "histosys": {"interpcode": "code0"}},
    ],
    ids=["code4-code4p", "code1-code0"],
)
def test_structured_hessian_equals_autograd_on_every_modifier_type(settings):
    workspace = Workspace.from_spec(_spec())
    model = workspace.model(modifier_settings=settings)
    data = workspace.data(model)
    pars = _points(model, 5, seed=1)
    names = list(model.par_names)
    # kinks and interpolation boundaries: alpha exactly 0, +1, -1, beyond +-1
    pars[1, names.index("shared")] = 0.0
    pars[1, names.index("jes")] = 1.0
    pars[2, names.index("jer")] = -1.0
    pars[2, names.index("shared")] = 2.5
    pars[3, names.index("jes")] = -3.0
    # factors exactly 0: mu at its bound, two zero factors of one block, a zero block factor
    # with a zero per-bin factor on the same cell
    pars[3, names.index("mu")] = 0.0
    pars[4, names.index("mu")] = 0.0
    pars[4, names.index("k_sig")] = 0.0
    pars[4, names.index("k_tt")] = 0.0
    pars[4, names.index("cr_shape[0]")] = 0.0
    _assert_same(model, pars, data)


def test_structured_hessian_with_up_to_three_zero_factors_in_a_block():
    """The block-factor curvature by the number of zero factors of a block: none, one, two
    and three (lumi, mu and k_sig of the signal), where only the f'' and pair terms that
    leave no zero factor outside survive."""
    workspace = Workspace.from_spec(_spec())
    model = workspace.model()
    data = workspace.data(model)
    pars = _points(model, 4, seed=6)
    names = list(model.par_names)
    for row, zeros in enumerate([["lumi"], ["lumi", "mu"], ["lumi", "mu", "k_sig"], ["k_tt"]]):
        for name in zeros:
            pars[row, names.index(name)] = 0.0
    _assert_same(model, pars, data)


def test_structured_hessian_broadcasts_batches_of_data_and_chunks(monkeypatch):
    workspace = Workspace.from_spec(_spec())
    model = workspace.model()
    data = workspace.data(model)
    pars = _points(model, 4, seed=2).reshape(2, 2, 1, -1)  # (2, 2, 1, P)
    datasets = torch.stack([data, model.expected_data(model.suggested_init())])  # (2, N + A)
    value, grad, hessian = derivatives.twice_nll_derivatives(model, pars, datasets)
    assert hessian.shape == (2, 2, 2, model.npars, model.npars)
    _assert_same(model, pars.expand(2, 2, 2, -1), datasets)
    whole = derivatives.twice_nll_derivatives(model, pars, datasets)
    monkeypatch.setattr(derivatives, "CHUNK_ELEMENTS", 1)  # one column per chunk
    chunked = derivatives.twice_nll_derivatives(model, pars, datasets)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-12)


def test_structured_hessian_of_a_yield_batched_model(monkeypatch):
    workspace = Workspace.from_spec(_spec())
    model = workspace.model()
    data = workspace.data(model)
    generator = torch.Generator().manual_seed(3)
    signals = 5.0 * torch.rand(3, 3, generator=generator, dtype=torch.float64)
    batched = model.with_sample_yields("signal", signals)
    pars = _points(model, 3, seed=4)
    _assert_same(batched, pars, data)
    monkeypatch.setattr(derivatives, "CHUNK_ELEMENTS", 1)
    _assert_same(batched, pars, data)


def test_structured_hessian_without_modifiers_of_some_kinds():
    """Only a normfactor (no block factors beyond it, no per-bin factors, no constraints)."""
    spec = {
        "channels": [
            {
                "name": "c",
                "samples": [
                    {
                        "name": "s",
                        "data": [2.0, 4.0],
                        "modifiers": [{"name": "mu", "type": "normfactor", "data": None}],
                    },
                    {"name": "b", "data": [10.0, 0.0], "modifiers": []},
                ],
            }
        ],
        "observations": [{"name": "c", "data": [13, 0]}],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }
    workspace = Workspace.from_spec(spec)
    model = workspace.model()
    pars = torch.tensor([[0.0], [1.3]], dtype=torch.float64)
    _assert_same(model, pars, workspace.data(model))


@pytest.mark.skipif(not PUBLISHED.exists(), reason="reference likelihood not available")
def test_structured_hessian_on_a_published_likelihood():
    workspace = Workspace.load(PUBLISHED)
    model = workspace.model()
    data = workspace.data(model)
    pars = _points(model, 1, seed=5)
    pars[0, model.poi_index] = 0.0  # every signal block has a zero factor
    _assert_same(model, pars, data)
    objective = TwiceNLL(model, data)
    assert objective.value_grad_hessian is not None  # the fits use it
