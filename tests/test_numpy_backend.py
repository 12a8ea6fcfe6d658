"""The numpy backend's statistics (analysis.numpy_backend.infer) and the CLI's backend choice.

References: the torch engine (analysis.inference, itself tested against pyhf and ROOT's numbers
in test_inference.py and test_reference_workspaces.py) on every pyhf validation workspace and on
random workspaces of every modifier type (tests/test_numpy_backend_model.py's generator); pyhf's
stored CLs of the validation cases; the analytic ``Z = sqrt(q0)``; and, through the CLI, the
same command with ``--backend torch``, in processes that must not import torch.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from analysis import inference
from analysis.likelihood import Workspace
from analysis.numpy_backend import AUTO_MAX_PARAMETERS, Unsupported, infer
from analysis.numpy_backend.model import NumpyModel
from tests.conftest import REFERENCE
from tests.test_numpy_backend_model import SETTINGS, random_workspace

CASES = sorted((REFERENCE / "pyhf_validation" / "reference_cases").glob("*.json"))
#: see tests/test_inference.py: pyhf's stored numbers come from scipy fits, up to 3.3e-4 off
SCIPY_MINIMUM_RTOL = 5e-4
LOCAL_MINIMUM_CASES = {"2bin_2channel_coupledhistosys_mu1"}
#: the two engines make the same fits from the same starts to edm <= 1e-10
ENGINE_RTOL = 1e-8
#: limits: roots to xtol 1e-5 by the same Illinois steps on CLs that agree to ENGINE_RTOL
LIMIT_ATOL = 1e-7


def _models(spec: dict, settings: dict | None = None):
    ws = Workspace.load(spec)
    meas = ws.measurement()
    poi = meas["config"].get("poi") or None
    torch_model = ws.model(modifier_settings=settings)
    numpy_model = NumpyModel(ws.model_spec(), poi_name=poi, modifier_settings=settings)
    data = ws.data(torch_model)
    return numpy_model, torch_model, data.numpy(), data


def _flat(value) -> list[float]:
    if isinstance(value, dict):
        return [v for key in sorted(value) for v in _flat(value[key])]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flat(item)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _assert_engines_agree(
    numpy_model, torch_model, data, data_t, mu: float, test_stat: str, rtol=ENGINE_RTOL
):
    ours = infer.hypotest(numpy_model, data, mu, test_stat)
    ref = inference.hypotest(torch_model, data_t, mu, test_stat).to_dict()
    np.testing.assert_allclose(_flat(ours), _flat(ref), rtol=rtol, atol=1e-12)
    assert ours.keys() == ref.keys()
    if test_stat != "q0":
        try:
            sig = infer.significance(numpy_model, data)
        except Unsupported:  # a fit that the torch engine takes (and warns about)
            return ours
        sig_ref = inference.significance(torch_model, data_t).to_dict()
        np.testing.assert_allclose(_flat(sig), _flat(sig_ref), rtol=rtol, atol=1e-12)
    return ours


@pytest.mark.parametrize("case_path", CASES, ids=[p.stem for p in CASES])
def test_validation_cases_match_torch_engine_and_pyhf(case_path):
    case = json.loads(case_path.read_text())
    settings = case["modifier_settings"]
    numpy_model, torch_model, data, data_t = _models(case["workspace"], settings)
    ours = _assert_engines_agree(
        numpy_model, torch_model, data, data_t, case["mu_test"], case["test_stat"]
    )
    if case["case_id"] not in LOCAL_MINIMUM_CASES:
        stored = [case["expected_CLs"]["obs"], *case["expected_CLs"]["exp"]]
        rtol = max(case["rel_tolerance_used_by_pyhf"], SCIPY_MINIMUM_RTOL)
        np.testing.assert_allclose([ours["cls_obs"], *ours["cls_exp"]], stored, rtol=rtol)
    if case["test_stat"] != "q0":
        limit = infer.upper_limit_with_curve(numpy_model, data, 0.95)
        ref, curve = inference.upper_limit_with_curve(torch_model, data_t, 0.95)
        np.testing.assert_allclose(
            [limit["observed"], *limit["expected"]],
            [ref.observed, *ref.expected],
            atol=LIMIT_ATOL,
        )
        np.testing.assert_allclose(limit["scan"]["poi_values"], curve.poi_value, atol=LIMIT_ATOL)
        # the curve's POI values are from the limits (to LIMIT_ATOL); at mu = 0 the test
        # statistic is twice-NLL rounding (~1e-13) and enters CLs as its square root
        np.testing.assert_allclose(limit["scan"]["cls_obs"], curve.cls_obs, atol=2e-6)
    fit_matches_torch_engine(numpy_model, torch_model, data, data_t)


def fit_matches_torch_engine(numpy_model, torch_model, data, data_t) -> bool:
    """The global fit of both engines, where the numpy backend takes it; whether it did."""
    init, fixed = numpy_model.suggested_init(), numpy_model.suggested_fixed()
    try:
        ours = infer.global_fit(numpy_model, data, init, fixed)
    except Unsupported:
        return False
    ref = inference.global_fit(
        torch_model, data_t, torch_model.suggested_init(), torch_model.suggested_fixed(), ()
    ).to_dict()
    assert ours["labels"] == ref["labels"]
    assert ref["at_bound"] == ours["at_bound"] and ref["converged"]
    np.testing.assert_allclose(ours["bestfit"], ref["bestfit"], rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(ours["uncertainty"], ref["uncertainty"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours["corr_mat"], ref["corr_mat"], atol=1e-6)
    assert ours["twice_nll"] == pytest.approx(ref["twice_nll"], rel=1e-10)
    return True


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("seed", range(6))
def test_random_workspaces_match_torch_engine(seed, settings, caplog):
    """Every modifier type, shared and coupled modifiers, fixed parameters, custom bounds.

    Where the torch engine warns that a fit did not converge (seed 9: its mu = 0 fit ends
    2e-12 below the numpy backend's converged one, in a direction too flat for its edm test),
    the Asimov data of the two differ by ~1e-6 and CLs by ~4e-8: compared to 1e-6 there."""
    numpy_model, torch_model, data, data_t = _models(random_workspace(seed), SETTINGS[settings])
    mu = 0.5 * float(numpy_model.suggested_bounds()[numpy_model.poi_index, 1]) ** 0.5
    try:
        infer.hypotest(numpy_model, data, mu, "qtilde")
    except Unsupported:  # e.g. a start with data in a bin without expected events: torch's case
        return
    with caplog.at_level("WARNING", logger="analysis.inference"):
        inference.hypotest(torch_model, data_t, mu, "qtilde")
    rtol = 1e-6 if "did not converge" in caplog.text else ENGINE_RTOL
    _assert_engines_agree(numpy_model, torch_model, data, data_t, mu, "qtilde", rtol)
    fit_matches_torch_engine(numpy_model, torch_model, data, data_t)


def _counting_workspace(signal: float, background: float, observed: float) -> dict:
    return {
        "channels": [
            {
                "name": "sr",
                "samples": [
                    {
                        "name": "signal",
                        "data": [signal],
                        "modifiers": [{"name": "mu", "type": "normfactor", "data": None}],
                    },
                    {
                        "name": "background",
                        "data": [background],
                        "modifiers": [
                            {"name": "bkg_norm", "type": "normsys", "data": {"hi": 1.1, "lo": 0.9}}
                        ],
                    },
                ],
            }
        ],
        "observations": [{"name": "sr", "data": [observed]}],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }


def test_large_significance_is_finite_and_sqrt_q0():
    """Z far above 8: finite, equal to sqrt(q0) of the two fits, and to the torch engine's."""
    spec = _counting_workspace(signal=400.0, background=20.0, observed=420.0)
    numpy_model, torch_model, data, data_t = _models(spec)
    result = infer.significance(numpy_model, data)
    # q0 from the two fits made here independently of the calculator
    from analysis.numpy_backend.fit import minimize

    bounds = numpy_model.suggested_bounds()
    free = minimize(numpy_model, data, numpy_model.suggested_init()[None], bounds, False)
    start = numpy_model.suggested_init()[None].copy()
    start[0, 0] = 0.0
    fixed = np.array([True, False])
    background_only = minimize(numpy_model, data, start, bounds, fixed)
    z = math.sqrt(float(background_only.fun[0] - free.fun[0]))
    assert result["observed"]["significance"] == pytest.approx(z, rel=1e-9)
    assert result["observed"]["significance"] > 8
    assert 0 < result["observed"]["p_value"] < 1e-15
    assert result["observed"]["p_value"] == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    ref = inference.significance(torch_model, data_t).to_dict()
    np.testing.assert_allclose(_flat(result), _flat(ref), rtol=1e-9)


# ---------------------------------------------------------------------- the CLI
def _run(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "analysis.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize(
    "command",
    [["fit"], ["hypotest", "--poi-value", "1"], ["significance"], ["limit"]],
    ids=lambda c: c[0],
)
def test_cli_small_workspace_runs_without_torch(tmp_path, command):
    """``--backend auto`` on a 5-parameter workspace: no torch in the process, and the output
    of ``--backend torch`` (same keys, numbers to the fits' tolerance)."""
    case = json.loads(
        (REFERENCE / "pyhf_validation/reference_cases/2bin_2channel_mu1.json").read_text()
    )
    path = tmp_path / "ws.json"
    path.write_text(json.dumps(case["workspace"]))
    fast = _run(*command, str(path), "-o", str(tmp_path / "numpy.json"), importtime=True)
    assert fast.returncode == 0, fast.stderr
    imported = [line.split("|")[-1].strip() for line in fast.stderr.splitlines() if "|" in line]
    assert "torch" not in imported and "scipy" not in imported and "pyhf" not in imported
    slow = _run(*command, str(path), "--backend", "torch", "-o", str(tmp_path / "torch.json"))
    assert slow.returncode == 0, slow.stderr
    ours = json.loads((tmp_path / "numpy.json").read_text())
    ref = json.loads((tmp_path / "torch.json").read_text())
    assert ours.keys() == ref.keys()
    np.testing.assert_allclose(_flat(ours), _flat(ref), rtol=1e-7, atol=1e-9)


def test_cli_hands_what_it_does_not_take_to_torch(tmp_path):
    """A fit with the POI on its bound (background-only data, a bin that holds only signal)
    needs the torch engine's one-sided profile error: ``--backend auto`` hands it over and
    writes what ``--backend torch`` writes; so do an out-of-bounds --poi-value (the torch
    engine's one-line error, exit code 2) and a model above the parameter limit."""
    spec = _counting_workspace(signal=5.0, background=10.0, observed=10.0)
    spec["channels"].append(
        {
            "name": "signal_only",
            "samples": [
                {
                    "name": "signal",
                    "data": [3.0],
                    "modifiers": [{"name": "mu", "type": "normfactor", "data": None}],
                }
            ],
        }
    )
    spec["observations"].append({"name": "signal_only", "data": [0.0]})
    path = tmp_path / "ws.json"
    path.write_text(json.dumps(spec))
    auto = _run("fit", str(path), "-v", "-o", str(tmp_path / "auto.json"))
    assert auto.returncode == 0, auto.stderr
    assert "numpy backend: a parameter on a bound; running on torch" in auto.stderr
    slow = _run("fit", str(path), "--backend", "torch", "-o", str(tmp_path / "torch.json"))
    assert json.loads((tmp_path / "auto.json").read_text()) == json.loads(
        (tmp_path / "torch.json").read_text()
    )
    assert slow.returncode == 0
    bad = _run("hypotest", str(path), "--poi-value", "11")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "outside the bounds [0, 10]" in bad.stderr and "Traceback" not in bad.stderr


def test_backend_auto_parameter_limit(tmp_path):
    """Above AUTO_MAX_PARAMETERS, auto runs torch; --backend numpy still runs numpy, with the
    torch engine's numbers."""
    spec = _counting_workspace(signal=5.0, background=50.0, observed=52.0)
    nbins = AUTO_MAX_PARAMETERS + 1
    channel = spec["channels"][0]
    channel["samples"][0]["data"] = [5.0 + i % 3 for i in range(nbins)]
    channel["samples"][1]["data"] = [50.0 + i for i in range(nbins)]
    channel["samples"][1]["modifiers"].append(
        {"name": "mc_stat", "type": "staterror", "data": [3.0] * nbins}
    )
    spec["observations"][0]["data"] = [52.0 + i for i in range(nbins)]
    path = tmp_path / "ws.json"
    path.write_text(json.dumps(spec))
    auto = _run("significance", str(path), "-v", "-o", str(tmp_path / "auto.json"))
    assert auto.returncode == 0, auto.stderr
    assert "numpy backend" not in auto.stderr
    forced = _run(
        "significance", str(path), "--backend", "numpy", "-v", "-o", str(tmp_path / "np.json")
    )
    assert forced.returncode == 0, forced.stderr
    assert f"numpy backend: {nbins + 2} parameters" in forced.stderr
    np.testing.assert_allclose(
        _flat(json.loads((tmp_path / "np.json").read_text())),
        _flat(json.loads((tmp_path / "auto.json").read_text())),
        rtol=1e-8,
    )


def test_torch_free_import_of_the_backend():
    code = (
        "import sys, analysis.numpy_backend.infer, analysis.cli.stats; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_cli_bounds_inits_and_flat_directions(tmp_path):
    """What a new user ran into: inverted bounds are a one-line error (exit 2) on both
    backends; a free start outside its bounds starts on the nearer bound with a warning (pyhf
    refuses it, scipy and MINUIT clip it), the same on both; a likelihood that depends on
    mu * mu2 only (a flat direction) goes to the torch engine, whose output has no uncertainty
    for the degenerate pair."""
    base = _counting_workspace(signal=5.0, background=10.0, observed=14.0)
    inverted = json.loads(json.dumps(base))
    inverted["measurements"][0]["config"]["parameters"] = [{"name": "mu", "bounds": [[5, 1]]}]
    outside = json.loads(json.dumps(base))
    outside["measurements"][0]["config"]["parameters"] = [{"name": "mu", "bounds": [[0, 0.5]]}]
    flat = json.loads(json.dumps(base))
    flat["channels"][0]["samples"][0]["modifiers"].append(
        {"name": "mu2", "type": "normfactor", "data": None}
    )
    for name, spec in (("inverted", inverted), ("outside", outside), ("flat", flat)):
        (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    for backend in ("auto", "torch"):
        bad = _run("fit", str(tmp_path / "inverted.json"), "--backend", backend)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert bad.stderr.strip().endswith(
            "bounds of parameter 'mu' are [5, 1]: the lower bound lies above the upper one"
        )
    outputs = {}
    for name in ("outside", "flat"):
        for backend in ("auto", "torch"):
            out = tmp_path / f"{name}_{backend}.json"
            done = _run("fit", str(tmp_path / f"{name}.json"), "--backend", backend, "-o", str(out))
            assert done.returncode == 0, done.stderr
            if name == "outside":
                assert "initial value 1 of 'mu' lies outside its bounds [0, 0.5]" in done.stderr
            outputs[name, backend] = json.loads(out.read_text())
        assert outputs[name, "auto"] == outputs[name, "torch"]
    # mu is held on its upper bound 0.5 (the data want 0.8): the one-sided profile error
    assert outputs["outside", "auto"]["bestfit"][0] == pytest.approx(0.5)
    assert outputs["outside", "auto"]["at_bound"][0]
    assert outputs["flat", "auto"]["uncertainty"][:2] == [None, None]


# ----------------------------------------------------------------------------- numpy fits
def _analysis_workspace(rng: np.random.Generator) -> dict:
    """Two channels as the pipeline writes them (signal and two backgrounds; normfactors,
    lumi, normsys, histosys, staterror, shapesys), numbers drawn from ``rng``."""
    channels, observations = [], []
    for name, nbins in (("SR", 4), ("CR", 3)):
        signal = rng.uniform(2.0, 8.0, nbins)
        bkg = rng.uniform(20.0, 60.0, nbins)
        other = rng.uniform(5.0, 15.0, nbins)
        channels.append(
            {
                "name": name,
                "samples": [
                    {
                        "name": "signal",
                        "data": signal.tolist(),
                        "modifiers": [
                            {"name": "mu", "type": "normfactor", "data": None},
                            {"name": "lumi", "type": "lumi", "data": None},
                        ],
                    },
                    {
                        "name": "bkg",
                        "data": bkg.tolist(),
                        "modifiers": [
                            {"name": "norm_bkg", "type": "normfactor", "data": None},
                            {
                                "name": "shape",
                                "type": "histosys",
                                "data": {
                                    "hi_data": (bkg * rng.uniform(1.02, 1.1, nbins)).tolist(),
                                    "lo_data": (bkg * rng.uniform(0.9, 0.98, nbins)).tolist(),
                                },
                            },
                            {
                                "name": f"staterror_{name}",
                                "type": "staterror",
                                "data": (0.1 * bkg).tolist(),
                            },
                        ],
                    },
                    {
                        "name": "other",
                        "data": other.tolist(),
                        "modifiers": [
                            {"name": "xsec", "type": "normsys", "data": {"hi": 1.2, "lo": 0.85}},
                            {
                                "name": f"sys_{name}",
                                "type": "shapesys",
                                "data": (0.2 * other).tolist(),
                            },
                        ],
                    },
                ],
            }
        )
        observations.append({"name": name, "data": np.round(bkg + other).tolist()})
    lumi = {
        "name": "lumi",
        "auxdata": [1.0],
        "sigmas": [0.02],
        "bounds": [[0.9, 1.1]],
        "inits": [1.0],
    }
    return {
        "channels": channels,
        "observations": observations,
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": [lumi]}}],
        "version": "1.0.0",
    }


@pytest.mark.parametrize("seed", range(3))
def test_numpy_fits_give_the_torch_fits_values_and_gradients(seed):
    """``Model.with_numpy_fits``: every objective of the optimizer, and its gradient in the
    templates' yields, equals the torch engine's fits' (same algorithm, same starts, both at
    edm <= 1e-10; measured: values 8e-14, gradients 1.2e-13 relative)."""
    from analysis import objectives

    spec = _analysis_workspace(np.random.default_rng(seed))
    leaves = []
    for channel in spec["channels"]:
        for sample in channel["samples"]:
            sample["data"] = torch.tensor(sample["data"], dtype=torch.float64, requires_grad=True)
            leaves.append(sample["data"])
    workspace = Workspace(spec=spec, source="toy")
    torch_fits = workspace.model()  # pyhf's default, smooth interpolations
    numpy_fits = torch_fits.with_numpy_fits()
    assert torch_fits.numpy_fits is None and numpy_fits.numpy_fits is not None
    for objective in objectives.OBJECTIVES.values():
        ref, got = objective(torch_fits, None), objective(numpy_fits, None)
        assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10), objective.name
        grad_ref = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(ref, leaves, retain_graph=True)]
        )
        grad = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(got, leaves, retain_graph=True)]
        )
        scale = float(grad_ref.abs().max())
        assert scale > 0, objective.name
        assert float((grad - grad_ref).abs().max()) <= 1e-9 * scale, objective.name


def test_numpy_fits_only_where_they_apply():
    """``with_numpy_fits`` returns the model itself off the CPU float64 path, beyond
    FIT_MAX_PARAMETERS, with kinked parameters and for a spec the numpy backend does not
    take; new numbers
    (``with_spec_values``) drop the numpy model of the old ones."""
    from analysis.numpy_backend import FIT_MAX_PARAMETERS

    workspace = Workspace.load(_analysis_workspace(np.random.default_rng(0)))
    model = workspace.model()
    assert model.npars <= FIT_MAX_PARAMETERS
    assert model.with_numpy_fits().numpy_fits.par_names == model.par_names
    float32 = workspace.model(dtype=torch.float32)
    assert float32.with_numpy_fits() is float32
    kinked = workspace.model(modifier_settings=SETTINGS["code1_code0"])
    assert bool(kinked.kinked_parameters().any()) and kinked.with_numpy_fits() is kinked
    spec = _analysis_workspace(np.random.default_rng(0))
    spec["channels"][0]["samples"][2]["modifiers"][0]["data"]["lo"] = 0.0  # not on numpy
    uncovered = Workspace.load(spec).model()
    assert uncovered.with_numpy_fits() is uncovered
    numpy_fits = model.with_numpy_fits()
    assert numpy_fits.with_spec_values(workspace.model_spec()).numpy_fits is None
    big = _counting_workspace(5.0, 50.0, 55.0)
    big["channels"][0]["samples"][1]["modifiers"] += [
        {"name": f"n{i}", "type": "normsys", "data": {"hi": 1.01, "lo": 0.99}}
        for i in range(FIT_MAX_PARAMETERS)
    ]
    large = Workspace.load(big).model()
    assert large.npars > FIT_MAX_PARAMETERS and large.with_numpy_fits() is large


def test_numpy_fits_hand_what_they_cannot_fit_to_torch():
    """A start where the likelihood is not finite (observed events in a bin that expects none
    at mu = 0) is not the numpy backend's to fit: the torch fits take it and raise their own
    error, the same with and without numpy fits; a finite fit of the same model agrees."""
    from analysis.fit import FitError

    spec = _counting_workspace(5.0, 10.0, 12.0)
    spec["channels"][0]["samples"][0]["data"] = [5.0, 4.0]
    spec["channels"][0]["samples"][1]["data"] = [10.0, 0.0]
    spec["observations"][0]["data"] = [12.0, 3.0]
    workspace = Workspace.load(spec)
    torch_fits = workspace.model()
    numpy_fits = torch_fits.with_numpy_fits()
    assert numpy_fits.numpy_fits is not None
    data = workspace.data(torch_fits)
    messages = []
    for model in (torch_fits, numpy_fits):
        with pytest.raises(FitError) as error:
            inference.fixed_poi_fit(model, data, 0.0)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert "twice_nll is inf at the start point" in messages[0]
    x_ref, nll_ref = inference.fixed_poi_fit(torch_fits, data, 1.0)
    x, nll = inference.fixed_poi_fit(numpy_fits, data, 1.0)
    assert float(nll) == pytest.approx(float(nll_ref), rel=1e-12)
    np.testing.assert_allclose(x.numpy(), x_ref.numpy(), rtol=1e-7, atol=1e-9)
