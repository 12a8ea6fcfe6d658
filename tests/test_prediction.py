"""Model predictions with uncertainty bands: cabinetry's published numbers, an independent
numpy computation with pyhf's model, analytic one-bin cases, and the yield table."""

from __future__ import annotations

import json
import math

import numpy as np
import pyhf
import pytest
import torch

from analysis import fit as fitting
from analysis.likelihood import Workspace
from analysis.prediction import (
    ModelPrediction,
    asimov_parameters,
    data_per_channel,
    prediction,
    yield_table,
)
from tests.conftest import reference_path


# ----------------------------------------------------------------------------- workspaces
@pytest.fixture(scope="module")
def cabinetry_example():
    """(model, data, post-fit FitResult, REFERENCE_NUMBERS) of cabinetry's example."""
    ref = json.loads(reference_path("cabinetry", "REFERENCE_NUMBERS.json").read_text())
    ws = Workspace.load(reference_path("cabinetry", "example_workspace.json"))
    model = ws.model()
    data = ws.data(model)
    return model, data, fitting.fit_model(model, data), ref


def two_channel_spec() -> dict:
    """Two channels of different sizes, a sample missing from one channel, and every modifier
    kind whose nominal value or constraint matters: normfactor (POI), normsys (one of them
    fixed), histosys, staterror, shapesys (Poisson), lumi."""
    return {
        "channels": [
            {
                "name": "SR",
                "samples": [
                    {
                        "name": "signal",
                        "data": [2.0, 8.0, 5.0],
                        "modifiers": [
                            {"name": "mu", "type": "normfactor", "data": None},
                            {"name": "lumi", "type": "lumi", "data": None},
                            {
                                "name": "sig_theory",
                                "type": "normsys",
                                "data": {"hi": 1.1, "lo": 0.85},
                            },
                        ],
                    },
                    {
                        "name": "background",
                        "data": [50.0, 40.0, 20.0],
                        "modifiers": [
                            {"name": "lumi", "type": "lumi", "data": None},
                            {
                                "name": "shape",
                                "type": "histosys",
                                "data": {
                                    "hi_data": [55.0, 41.0, 18.0],
                                    "lo_data": [46.0, 38.0, 21.0],
                                },
                            },
                            {"name": "norm", "type": "normsys", "data": {"hi": 1.05, "lo": 0.97}},
                            {"name": "frozen", "type": "normsys", "data": {"hi": 1.3, "lo": 0.7}},
                            {"name": "staterror_SR", "type": "staterror", "data": [3.0, 2.5, 2.0]},
                            {"name": "mc_stat", "type": "shapesys", "data": [4.0, 3.0, 2.5]},
                        ],
                    },
                ],
            },
            {
                "name": "CR",
                "samples": [
                    {
                        "name": "background",
                        "data": [200.0, 150.0],
                        "modifiers": [
                            {"name": "lumi", "type": "lumi", "data": None},
                            {"name": "norm", "type": "normsys", "data": {"hi": 1.05, "lo": 0.97}},
                            {
                                "name": "shape",
                                "type": "histosys",
                                "data": {"hi_data": [210.0, 148.0], "lo_data": [192.0, 153.0]},
                            },
                            {"name": "staterror_CR", "type": "staterror", "data": [6.0, 5.0]},
                        ],
                    }
                ],
            },
        ],
        "observations": [
            {"name": "SR", "data": [55.0, 52.0, 27.0]},
            {"name": "CR", "data": [205.0, 147.0]},
        ],
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
                            "bounds": [[0.8, 1.2]],
                            "inits": [1.0],
                        },
                        {"name": "frozen", "fixed": True},
                    ],
                },
            }
        ],
        "version": "1.0.0",
    }


def cabinetry_numpy(pyhf_model, parameters, uncertainty, corr_mat):
    """cabinetry's ``yield_stdev`` in numpy on pyhf's model: per channel the (sample + total,
    bin) standard deviations and the (sample + total) standard deviations of channel sums."""
    n = len(parameters)
    per_bin = []
    for i in range(n):
        row = []
        for sign in (+1.0, -1.0):
            pars = np.array(parameters, dtype=float)
            pars[i] += sign * uncertainty[i]
            by_sample = np.asarray(pyhf_model.main_model.expected_data(pars, return_by_sample=True))
            by_sample = np.vstack([by_sample, by_sample.sum(axis=0)])
            row.append(by_sample)
        per_bin.append((row[0] - row[1]) / 2)
    sym = np.asarray(per_bin)  # (P, S + 1, nmain)
    channel_sums = np.stack(
        [sym[..., pyhf_model.config.channel_slices[c]].sum(-1) for c in pyhf_model.config.channels],
        axis=-1,
    )
    out = {}
    for values, kind in ((sym, "bins"), (channel_sums, "channels")):
        variance = np.zeros(values.shape[1:])
        for i in range(n):
            for j in range(n):
                variance += values[i] * corr_mat[i, j] * values[j]
        out[kind] = np.sqrt(variance)
    return out


def pyhf_asimov_parameters(pyhf_model) -> np.ndarray:
    """cabinetry's ``asimov_parameters`` on pyhf's model config."""
    config = pyhf_model.config
    types = dict(config.modifiers)
    values = []
    for name in config.par_order:
        ps = config.param_set(name)
        if not ps.constrained:
            values += list(ps.suggested_init)
        elif types[name] in ("histosys", "normsys"):
            values += [0.0] * ps.n_parameters
        else:
            values += [1.0] * ps.n_parameters
    return np.asarray(values)


def pyhf_prefit_uncertainties(pyhf_model) -> np.ndarray:
    config = pyhf_model.config
    widths = []
    for name in config.par_order:
        ps = config.param_set(name)
        if ps.constrained:
            widths += [0.0 if f else w for w, f in zip(ps.width(), ps.suggested_fixed, strict=True)]
        else:
            widths += [0.0] * ps.n_parameters
    return np.asarray(widths)


# ----------------------------------------------------------------------------- cabinetry
def test_reproduces_cabinetry_example(cabinetry_example):
    """cabinetry 0.6.0's ``total_stdev_model_bins`` pre- and post-fit (REFERENCE_NUMBERS)."""
    model, _, result, ref = cabinetry_example
    for pred, key, tolerance in (
        (prediction(model), "prefit_total_stdev_model_bins", {"atol": 1e-6}),
        (prediction(model, result), "postfit_total_stdev_model_bins", {"rtol": 1e-4}),
    ):
        channel = pred["Signal_region"]
        assert channel.samples == ("Background", "Signal")
        expected = ref[key]
        np.testing.assert_allclose(channel.stdev[0], expected["background"], **tolerance)
        np.testing.assert_allclose(channel.stdev[1], expected["signal"], **tolerance)
        np.testing.assert_allclose(channel.total_stdev, expected["sum"], **tolerance)
    assert prediction(model).label == "pre-fit"
    assert prediction(model, result).label == "post-fit"
    from_json = prediction(model, json.loads(json.dumps(result.to_dict())))  # diffana fit JSON
    np.testing.assert_array_equal(
        from_json["Signal_region"].stdev, prediction(model, result)["Signal_region"].stdev
    )


@pytest.mark.parametrize("post_fit", [False, True], ids=["prefit", "postfit"])
def test_equals_independent_pyhf_computation(post_fit):
    spec = two_channel_spec()
    ws = Workspace.from_spec(spec)
    model = ws.model()
    data = ws.data(model)
    ref_model = pyhf.Workspace(spec).model()
    assert tuple(ref_model.config.par_names) == model.par_names

    if post_fit:
        result = fitting.fit_model(model, data)
        parameters = result.bestfit.numpy()
        uncertainty = result.uncertainty.numpy()
        corr_mat = result.corr_mat.numpy()
        assert np.count_nonzero(corr_mat - np.diag(np.diag(corr_mat))) > 0
        pred = prediction(model, result)
    else:
        parameters = pyhf_asimov_parameters(ref_model)
        uncertainty = pyhf_prefit_uncertainties(ref_model)
        corr_mat = np.eye(len(parameters))
        np.testing.assert_array_equal(asimov_parameters(model).numpy(), parameters)
        np.testing.assert_allclose(model.prefit_uncertainties().numpy(), uncertainty, rtol=1e-12)
        # the fixed normsys and the POI have no pre-fit uncertainty; shapesys: 1/sqrt(tau)
        names = list(model.par_names)
        assert uncertainty[names.index("frozen")] == 0 and uncertainty[names.index("mu")] == 0
        pred = prediction(model)

    expected = cabinetry_numpy(ref_model, parameters, uncertainty, corr_mat)
    central = np.asarray(ref_model.main_model.expected_data(parameters, return_by_sample=True))
    assert pred.channels == tuple(ref_model.config.channels) == ("CR", "SR")
    assert pred.samples == tuple(ref_model.config.samples) == ("background", "signal")
    for c_index, name in enumerate(pred.channels):
        channel = pred[name]
        bins = ref_model.config.channel_slices[name]
        np.testing.assert_allclose(channel.yields, central[:, bins], rtol=1e-12)
        np.testing.assert_allclose(channel.total, central[:, bins].sum(0), rtol=1e-12)
        np.testing.assert_allclose(channel.stdev, expected["bins"][:-1, bins], rtol=1e-9)
        np.testing.assert_allclose(channel.total_stdev, expected["bins"][-1, bins], rtol=1e-9)
        np.testing.assert_allclose(
            channel.sample_stdev, expected["channels"][:-1, c_index], rtol=1e-9
        )
        assert channel.total_yield == pytest.approx(central[:, bins].sum(), rel=1e-12)
        assert channel.total_yield_stdev == pytest.approx(
            expected["channels"][-1, c_index], rel=1e-9
        )
    # the signal is absent from the control region: zero yield and zero uncertainty there
    assert np.all(pred["CR"].yields[1] == 0) and np.all(pred["CR"].stdev[1] == 0)
    # correlations matter: the band of the sum is not the sum in quadrature of the samples'
    sr = pred["SR"]
    assert not np.allclose(sr.total_stdev, np.sqrt((sr.stdev**2).sum(0)), rtol=1e-3)


# ----------------------------------------------------------------------------- analytic
def one_bin_spec(nominal: float, hi: float, lo: float, observed: float) -> dict:
    return {
        "channels": [
            {
                "name": "SR",
                "samples": [
                    {
                        "name": "signal",
                        "data": [nominal],
                        "modifiers": [
                            {"name": "mu", "type": "normfactor", "data": None},
                            {"name": "syst", "type": "normsys", "data": {"hi": hi, "lo": lo}},
                        ],
                    }
                ],
            }
        ],
        "observations": [{"name": "SR", "data": [observed]}],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }


@pytest.mark.parametrize(("hi", "lo"), [(1.1, 0.9), (1.2, 0.9)])
def test_one_bin_normsys_prefit(hi, lo):
    """At alpha = +-1 the normsys factor is exactly hi and lo, so stdev = nominal (hi - lo) / 2
    (= nominal (hi - 1) when symmetric); the POI (unconstrained) adds nothing pre-fit."""
    model = Workspace.from_spec(one_bin_spec(50.0, hi, lo, 60.0)).model()
    pred = prediction(model)
    channel = pred["SR"]
    assert channel.yields.tolist() == [[50.0]]
    assert channel.total_stdev[0] == pytest.approx(50.0 * (hi - lo) / 2, rel=1e-12)
    assert channel.total_yield_stdev == pytest.approx(50.0 * (hi - lo) / 2, rel=1e-12)
    if hi - 1 == pytest.approx(1 - lo):
        assert channel.total_stdev[0] == pytest.approx(50.0 * (hi - 1), rel=1e-12)


def test_one_bin_postfit_correlated_analytic():
    """y = mu * nominal * f(alpha) with normsys code1, f = hi^alpha (alpha >= 0), lo^-alpha;
    Var = d_mu^2 + d_alpha^2 + 2 rho d_mu d_alpha with the real fit's sigmas and rho."""
    nominal, hi, lo = 40.0, 1.15, 0.9
    ws = Workspace.from_spec(one_bin_spec(nominal, hi, lo, 52.0))
    model = ws.model(modifier_settings={"normsys": {"interpcode": "code1"}})
    result = fitting.fit_model(model, ws.data(model))
    names = list(model.par_names)
    i_mu, i_alpha = names.index("mu"), names.index("syst")
    mu, alpha = (float(result.bestfit[i]) for i in (i_mu, i_alpha))
    s_mu, s_alpha = (float(result.uncertainty[i]) for i in (i_mu, i_alpha))
    rho = float(result.corr_mat[i_mu, i_alpha])
    assert abs(rho) > 0.1  # a genuinely correlated case

    def factor(a: float) -> float:
        return hi**a if a >= 0 else lo ** (-a)

    d_mu = s_mu * nominal * factor(alpha)
    d_alpha = mu * nominal * (factor(alpha + s_alpha) - factor(alpha - s_alpha)) / 2
    stdev = math.sqrt(d_mu**2 + d_alpha**2 + 2 * rho * d_mu * d_alpha)
    channel = prediction(model, result)["SR"]
    assert channel.total[0] == pytest.approx(mu * nominal * factor(alpha), rel=1e-12)
    assert channel.total_stdev[0] == pytest.approx(stdev, rel=1e-10)


# ----------------------------------------------------------------------------- tables, data
def test_yield_table_and_data(cabinetry_example):
    model, data, result, _ = cabinetry_example
    pred = prediction(model, result)
    rows = yield_table(pred, data)
    assert [row["sample"] for row in rows] == ["Background", "Signal", "total", "data"]
    assert all(row["channel"] == "Signal_region" for row in rows)
    by_sample = {row["sample"]: row for row in rows}
    channel = pred["Signal_region"]
    assert by_sample["Background"]["yield"] + by_sample["Signal"]["yield"] == pytest.approx(
        by_sample["total"]["yield"], rel=1e-12
    )
    assert by_sample["total"]["yield"] == pytest.approx(channel.total.sum(), rel=1e-12)
    assert by_sample["total"]["uncertainty"] == channel.total_yield_stdev
    # the background and signal are anti-correlated post-fit: the total is better known
    assert by_sample["total"]["uncertainty"] < by_sample["Signal"]["uncertainty"]
    assert by_sample["data"] == {
        "channel": "Signal_region",
        "sample": "data",
        "yield": float(data[:4].sum()),
        "uncertainty": None,
    }
    per_bin = yield_table(pred, {"Signal_region": data[:4]}, per_bin=True)
    assert per_bin[2]["yield"] == pytest.approx(channel.total.tolist(), rel=1e-12)
    assert per_bin[2]["uncertainty"] == pytest.approx(channel.total_stdev.tolist(), rel=1e-12)
    assert per_bin[3]["yield"] == data[:4].tolist()
    assert yield_table(pred)[-1]["sample"] == "total"
    json.dumps(pred.to_dict())  # plain JSON


def test_data_and_fit_result_checks(cabinetry_example):
    model, data, result, _ = cabinetry_example
    pred = prediction(model)
    assert isinstance(pred, ModelPrediction)
    np.testing.assert_array_equal(data_per_channel(pred, data[:4])["Signal_region"], data[:4])
    with pytest.raises(ValueError, match="has 3 bins"):
        data_per_channel(pred, {"Signal_region": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="no data for channel"):
        data_per_channel(pred, {"CR": [1.0]})
    renamed = fitting.FitResult(
        labels=tuple(reversed(result.labels)),
        bestfit=result.bestfit,
        uncertainty=result.uncertainty,
        corr_mat=result.corr_mat,
        twice_nll=result.twice_nll,
    )
    with pytest.raises(ValueError, match="not the model's"):
        prediction(model, renamed)
    # gradients are not tracked and inputs are not modified
    before = result.bestfit.clone()
    post = prediction(model, result)
    assert torch.equal(result.bestfit, before)
    assert isinstance(post.parameters, np.ndarray)
