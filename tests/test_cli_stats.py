"""The statistics commands (fit, hypotest, significance, limit, scan, ranking) through the CLI.

Every number is checked against an independent reference: pyhf 0.7.6 (numpy backend with a
tight Minuit, computed here on the same input) or cabinetry's published numbers
(``../shared/reference/cabinetry/REFERENCE_NUMBERS.json``). Every bad input gives one line
``Error: ...`` on stderr naming the file and what is wrong, exit code 2, nothing on stdout and
no output file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import pathlib
import subprocess
import sys

import jsonpatch
import numpy as np
import pyhf
import pyhf.readxml
import pytest
import yaml
from click.testing import CliRunner

from analysis import inference
from analysis.cli import main
from analysis.likelihood import Workspace
from tests.conftest import reference_path

FIT_KEYS = {
    "labels",
    "bestfit",
    "uncertainty",
    "corr_mat",
    "twice_nll",
    "minos",
    "converged",
    "at_bound",
}
RANKING_KEYS = {
    "name",
    "bestfit",
    "uncertainty",
    "prefit_up",
    "prefit_down",
    "postfit_up",
    "postfit_down",
}


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: object) -> dict:
    result = run(*args)
    assert result.exit_code == 0, (result.exit_code, result.stderr, result.exception)
    return json.loads(result.stdout)


def _write(path: pathlib.Path, obj: object) -> pathlib.Path:
    path.write_text(json.dumps(obj))
    return path


def _by_label(output: dict, key: str = "bestfit") -> dict[str, float]:
    return dict(zip(output["labels"], output[key], strict=True))


# ----------------------------------------------------------------------------- references
@pytest.fixture(scope="module")
def cabinetry() -> tuple[pathlib.Path, dict]:
    """(example workspace path, REFERENCE_NUMBERS)."""
    ref = json.loads(reference_path("cabinetry", "REFERENCE_NUMBERS.json").read_text())
    return reference_path("cabinetry", "example_workspace.json"), ref


@pytest.fixture(scope="module")
def cabinetry_fit(cabinetry) -> dict:
    """``diffana fit --method minuit`` (MIGRAD + HESSE, cabinetry's own fit) of cabinetry's
    example workspace with MINOS on the POI (default device)."""
    workspace, _ = cabinetry
    return ok("fit", workspace, "--minos", "Signal_norm", "--method", "minuit")


@contextlib.contextmanager
def tight_minuit():
    pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-6))
    try:
        yield
    finally:
        pyhf.set_backend("numpy", "scipy")


def pyhf_fit(
    workspace: pyhf.Workspace, fix: dict[str, float] | None = None, **model_kwargs: object
) -> tuple[dict[str, float], float]:
    """pyhf's best fit (name -> value) and twice NLL, with parameters fixed as in ``fix``."""
    model = workspace.model(**model_kwargs)
    init = list(model.config.suggested_init())
    fixed = list(model.config.suggested_fixed())
    for name, value in (fix or {}).items():
        i = model.config.par_names.index(name)
        init[i], fixed[i] = value, True
    with tight_minuit():
        pars, twice_nll = pyhf.infer.mle.fit(
            workspace.data(model),
            model,
            init_pars=init,
            fixed_params=fixed,
            return_fitted_val=True,
        )
    return dict(zip(model.config.par_names, map(float, pars), strict=True)), float(twice_nll)


#: ``diffana fit`` runs MIGRAD with cabinetry's settings (analysis.fit.fit), which stop at an
#: estimated distance to the minimum EDM < 2e-5 of twice the NLL: within sqrt(EDM / 2) = 3.2e-3
#: standard deviations of the exact minimum, and within EDM / 2 = 1e-5 in twice_nll. pyhf's
#: tight Minuit (tolerance 1e-6) lands on the exact minimum.
MIGRAD_SIGMAS = 5e-3
MIGRAD_TWICE_NLL = 2e-5


def assert_same_fit(ours: dict, theirs: tuple[dict[str, float], float]) -> None:
    """Our CLI fit equals pyhf's to MIGRAD's precision (in units of each parameter's error)."""
    bestfit, twice_nll = theirs
    assert set(ours["labels"]) == set(bestfit)
    errors = _by_label(ours, "uncertainty")
    for name, value in _by_label(ours).items():
        tolerance = MIGRAD_SIGMAS * errors[name] + 1e-9
        assert value == pytest.approx(bestfit[name], abs=tolerance), name
    assert ours["twice_nll"] == pytest.approx(twice_nll, abs=MIGRAD_TWICE_NLL)


# ----------------------------------------------------------------------------- fit
def test_fit_reproduces_cabinetry(cabinetry, cabinetry_fit):
    _, ref = cabinetry
    out = cabinetry_fit
    assert set(out) == FIT_KEYS
    assert out["converged"] is True
    order = [out["labels"].index(name) for name in ref["parameter_order"]]
    np.testing.assert_allclose(np.array(out["bestfit"])[order], ref["bestfit"], rtol=1e-4)
    np.testing.assert_allclose(
        np.array(out["uncertainty"])[order], ref["uncertainty"], atol=ref["uncertainty_atol"]
    )
    assert out["twice_nll"] == pytest.approx(ref["best_twice_nll"], rel=1e-6)
    poi = out["labels"].index("Signal_norm")
    np.testing.assert_allclose(
        np.array(out["corr_mat"][poi])[order], ref["corr_Signal_norm_row"], **ref["corr_tol"]
    )
    _, lower, upper = (float(x) for x in ref["minos_Signal_norm"].split())
    assert set(out["minos"]) == {"Signal_norm"}
    # the reference is rounded to 4 decimals
    np.testing.assert_allclose(out["minos"]["Signal_norm"], [lower, upper], atol=2e-4)


def test_fit_with_fixed_parameter_matches_pyhf(cabinetry, tmp_path):
    workspace, _ = cabinetry
    target = tmp_path / "out" / "fit.json"
    result = run("fit", workspace, "--fix", "Luminosity=0.5", "--device", "cpu", "-o", target)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    out = json.loads(target.read_text())
    assert set(out) == FIT_KEYS
    lumi = out["labels"].index("Luminosity")
    assert out["bestfit"][lumi] == 0.5 and out["uncertainty"][lumi] == 0.0
    reference = pyhf_fit(pyhf.Workspace(json.loads(workspace.read_text())), {"Luminosity": 0.5})
    assert out["twice_nll"] == pytest.approx(reference[1], rel=1e-6)
    assert_same_fit(out, reference)


def test_fit_asimov_returns_the_prefit_point(cabinetry):
    workspace, _ = cabinetry
    out = ok("fit", workspace, "--asimov", "--device", "cpu")
    assert out["bestfit"][out["labels"].index("Signal_norm")] == pytest.approx(1.0, abs=1e-4)
    for name, value in _by_label(out).items():
        assert value == pytest.approx(
            1.0 if name.startswith(("staterror", "Signal")) else 0.0, abs=1e-4
        )


def _scaled_signal(spec: dict, factor: float) -> list[dict]:
    """A JSON Patch that scales the Signal sample's yields by ``factor``."""
    samples = spec["channels"][0]["samples"]
    index = [s["name"] for s in samples].index("Signal")
    yields = [factor * y for y in samples[index]["data"]]
    return [{"op": "replace", "path": f"/channels/0/samples/{index}/data", "value": yields}]


def test_fit_with_json_patch_and_patchset_matches_pyhf(cabinetry, tmp_path):
    workspace, ref = cabinetry
    spec = json.loads(workspace.read_text())
    patch = _write(tmp_path / "patch.json", _scaled_signal(spec, 1.5))
    out = ok("fit", workspace, "--patch", patch, "--device", "cpu")
    patched = pyhf.Workspace(jsonpatch.apply_patch(spec, _scaled_signal(spec, 1.5)))
    assert_same_fit(out, pyhf_fit(patched))

    patchset = {
        "metadata": {
            "description": "signal strength hypotheses",
            "digests": {"sha256": pyhf.utils.digest(spec, "sha256")},
            "labels": ["scale"],
            "references": {"hepdata": "ins0000000"},
        },
        "patches": [
            {"metadata": {"name": name, "values": [f]}, "patch": _scaled_signal(spec, f)}
            for name, f in (("half", 0.5), ("double", 2.0))
        ],
        "version": "1.0.0",
    }
    path = _write(tmp_path / "patchset.json", patchset)
    out = ok("fit", workspace, "--patch", f"{path}:double", "--device", "cpu")
    reference = pyhf.PatchSet(patchset).apply(pyhf.Workspace(spec), "double")
    assert_same_fit(out, pyhf_fit(reference))
    # the patch took effect: twice the signal, about half the signal strength
    unpatched = ref["bestfit"][ref["parameter_order"].index("Signal_norm")]
    assert _by_label(out)["Signal_norm"] == pytest.approx(unpatched / 2, rel=0.05)


def test_fit_of_histfactory_xml_matches_pyhf():
    xml = reference_path(
        "pyhf_validation", "xml", "multichannel_histfactory", "config", "example.xml"
    )
    out = ok("fit", xml, "--device", "cpu")
    assert set(out) == FIT_KEYS and out["converged"]
    try:
        reference = pyhf.Workspace(pyhf.readxml.parse(xml, xml.parent.parent))
    finally:
        pyhf.readxml.clear_filecache()
    assert_same_fit(out, pyhf_fit(reference))


def test_fit_of_analysis_yaml_equals_fit_of_its_workspace(cabinetry_fit, tmp_path):
    """cabinetry's config fits like cabinetry's workspace, with the default settings and with
    ``YieldFloor: 0`` alike: every bin has a positive total prediction (its one empty signal
    bin stays 0), so the floor does not act and both fits are the same number for number."""
    config = yaml.safe_load(reference_path("cabinetry", "config_example.yml").read_text())
    config["General"]["InputPath"] = str(reference_path("cabinetry", "ntuples") / "{SamplePath}")
    fits = {}
    for floor in (0.0, None):
        if floor is not None:
            config["General"]["YieldFloor"] = floor
        else:
            config["General"].pop("YieldFloor")
        path = tmp_path / "cabinetry.yml"
        path.write_text(yaml.safe_dump(config))
        fits[floor] = ok(
            "fit", path, "--cache-dir", tmp_path / "cache", "--device", "cpu", "--method", "minuit"
        )
    out = fits[None]
    assert out["labels"] == cabinetry_fit["labels"]
    for key in ("bestfit", "uncertainty"):
        np.testing.assert_allclose(out[key], cabinetry_fit[key], rtol=1e-6, atol=1e-9)
    assert out["twice_nll"] == pytest.approx(cabinetry_fit["twice_nll"], rel=1e-6)
    for key in ("bestfit", "uncertainty", "twice_nll"):
        assert fits[0.0][key] == out[key]


def test_fit_without_poi_matches_pyhf(tmp_path):
    spec = json.loads(reference_path("pyhf_validation", "2-bin_1-channel.json").read_text())
    spec["measurements"][0]["config"]["poi"] = ""
    spec["observations"][0]["data"] = [60.0, 72.0]
    out = ok("fit", _write(tmp_path / "nopoi.json", spec), "--device", "cpu")
    assert_same_fit(out, pyhf_fit(pyhf.Workspace(spec), poi_name=None))


# ----------------------------------------------------------------------------- inference
def test_toy_hypotest_equals_the_library():
    """--calctype toybased is inference.toy_hypotest with the same toys and seed."""
    path = reference_path("pyhf_validation", "2-bin_1-channel.json")
    out = ok(
        "hypotest", path, "--poi-value", 1, "--calctype", "toybased", "--n-toys", 400,
        "--seed", 5, "--device", "cpu",
    )  # fmt: skip
    assert out["calctype"] == "toybased" and out["n_toys"] == 400 and out["seed"] == 5
    ws = Workspace.load(json.loads(path.read_text()))
    model = ws.model()
    ref = inference.toy_hypotest(model, ws.data(model), 1.0, "qtilde", n_toys=400, seed=5)
    assert out["cls_obs"] == pytest.approx(float(ref.cls_obs), rel=1e-12)
    np.testing.assert_allclose(out["cls_exp"], ref.cls_exp.numpy(), rtol=1e-12)
    assert out["teststat"] == pytest.approx(float(ref.teststat), rel=1e-12)


def test_hypotest_matches_pyhf():
    path = reference_path("pyhf_validation", "2-bin_1-channel.json")
    out = ok("hypotest", path, "--poi-value", 1, "--test-stat", "qtilde", "--device", "cpu")
    assert set(out) == {"poi_value", "test_stat", "teststat", "cls_obs", "cls_exp"}
    assert out["poi_value"] == 1.0 and out["test_stat"] == "qtilde"
    assert out["cls_obs"] == pytest.approx(0.35998409, rel=1e-6)  # pyhf's documented value
    workspace = pyhf.Workspace(json.loads(path.read_text()))
    model = workspace.model()
    data = workspace.data(model)
    with tight_minuit():
        cls_obs, cls_exp = pyhf.infer.hypotest(
            1.0, data, model, test_stat="qtilde", return_expected_set=True
        )
        qtilde = pyhf.infer.test_statistics.qmu_tilde(
            1.0,
            data,
            model,
            model.config.suggested_init(),
            model.config.suggested_bounds(),
            model.config.suggested_fixed(),
        )
    assert out["cls_obs"] == pytest.approx(float(cls_obs), rel=1e-5)
    assert len(out["cls_exp"]) == 5
    np.testing.assert_allclose(out["cls_exp"], [float(x) for x in cls_exp], rtol=1e-5)
    assert out["teststat"] == pytest.approx(float(qtilde), rel=1e-5)


def test_significance_reproduces_cabinetry(cabinetry):
    workspace, ref = cabinetry
    out = ok("significance", workspace, "--device", "cpu")
    assert set(out) == {"observed", "expected"}
    for which in ("observed", "expected"):
        assert set(out[which]) == {"p_value", "significance"}
        expected = ref["significance"]
        assert out[which]["p_value"] == pytest.approx(expected[f"{which}_p"], rel=1e-3)
        assert out[which]["significance"] == pytest.approx(expected[f"{which}_Z"], rel=1e-3)


def test_limit_reproduces_cabinetry(cabinetry, tmp_path):
    workspace, ref = cabinetry
    target = tmp_path / "limit.json"
    result = run("limit", workspace, "--cl", 0.95, "--device", "cpu", "--output", target)
    assert result.exit_code == 0, result.stderr
    out = json.loads(target.read_text())
    assert set(out) == {"cl", "observed", "expected", "scan"}
    assert out["cl"] == 0.95 and len(out["expected"]) == 5
    limits = ref["limit_CLs_95"]
    assert out["observed"] == pytest.approx(limits["observed"], rel=limits["rtol"])
    np.testing.assert_allclose(out["expected"], limits["expected"], rtol=limits["rtol"])
    # CLs on a POI grid from 0 to 1.5 x the largest limit (Brazil plot), checked against pyhf
    scan = out["scan"]
    top = 1.5 * max(out["observed"], *out["expected"])
    np.testing.assert_allclose(scan["poi_values"], np.linspace(0, top, 31), rtol=1e-12)
    assert np.shape(scan["cls_exp"]) == (31, 5)
    spec = json.loads(pathlib.Path(workspace).read_text())
    pyhf_workspace = pyhf.Workspace(spec)
    model = pyhf_workspace.model()
    data = pyhf_workspace.data(model)
    for i in (20,):  # pyhf's tight hypotest takes ~15 s here (more points: test_inference.py)
        with tight_minuit():
            cls_obs, cls_exp = pyhf.infer.hypotest(
                scan["poi_values"][i], data, model, test_stat="qtilde", return_expected_set=True
            )
        assert scan["cls_obs"][i] == pytest.approx(float(cls_obs), rel=1e-4)
        np.testing.assert_allclose(scan["cls_exp"][i], [float(x) for x in cls_exp], rtol=1e-4)


def test_scan_reproduces_cabinetry(cabinetry):
    workspace, ref = cabinetry
    scan = ref["scan_Signal_norm"]
    low, high = scan["par_range"]
    out = ok("scan", workspace, "--parameter", "Signal_norm", "--range", low, high, "--steps", 3)
    assert set(out) == {"parameter", "bestfit", "uncertainty", "values", "delta_twice_nll"}
    assert out["parameter"] == "Signal_norm"
    fit = ok("fit", workspace, "--device", "cpu")
    # MIGRAD (tolerance 0.01, as cabinetry) against the scan's Newton minimum
    assert out["bestfit"] == pytest.approx(_by_label(fit)["Signal_norm"], abs=5e-4)
    # the scan's width is from the exact Hessian (0.9492, = finite differences); Minuit's HESSE,
    # computed in its internal coordinates of the bounded parameters, gives 0.9388 (cabinetry)
    assert out["uncertainty"] == pytest.approx(
        _by_label(fit, "uncertainty")["Signal_norm"], rel=2e-2
    )
    np.testing.assert_allclose(out["values"], np.linspace(low, high, 3), rtol=1e-12)
    np.testing.assert_allclose(out["delta_twice_nll"], scan["delta_nlls"], atol=5e-4)


def test_ranking_reproduces_cabinetry_and_pyhf(cabinetry):
    workspace, ref = cabinetry
    out = ok("ranking", workspace, "--device", "cpu")
    assert set(out) == {"poi", "ranking"} and out["poi"] == "Signal_norm"
    entries = {entry["name"]: entry for entry in out["ranking"]}
    names = [n for n in ref["parameter_order"] if n != "Signal_norm"]
    assert [entry["name"] for entry in out["ranking"]] == names
    assert all(set(entry) == RANKING_KEYS for entry in out["ranking"])
    # cabinetry's impacts carry Minuit-tolerance noise of up to 7e-3 (see test_inference.py)
    for key in ("prefit_up", "prefit_down"):
        ours = [entries[n][key] for n in names]
        np.testing.assert_allclose(ours, ref[f"ranking_{key}"], atol=8e-3)
    # post-fit impacts: pyhf refits with the nuisance parameter at best fit +- its uncertainty
    spec = pyhf.Workspace(json.loads(workspace.read_text()))
    best, _ = pyhf_fit(spec)
    lumi = entries["Luminosity"]
    for key, sign in (("postfit_up", 1), ("postfit_down", -1)):
        shifted = lumi["bestfit"] + sign * lumi["uncertainty"]
        refit, _ = pyhf_fit(spec, {"Luminosity": shifted})
        assert lumi[key] == pytest.approx(refit["Signal_norm"] - best["Signal_norm"], abs=1e-4)


# ----------------------------------------------------------------------------- bad input
def _two_bin() -> dict:
    return json.loads(reference_path("pyhf_validation", "2-bin_1-channel.json").read_text())


def _drop_sample_data(spec):
    del spec["channels"][0]["samples"][1]["data"]


def _unknown_modifier(spec):
    spec["channels"][0]["samples"][1]["modifiers"][0]["type"] = "shapesyst"


def _no_poi(spec):
    spec["measurements"][0]["config"]["poi"] = ""


def _product(spec):
    """mu and k only enter as mu * k: the Hessian at the best fit is singular."""
    spec["channels"][0]["samples"][0]["modifiers"].append(
        {"name": "k", "type": "normfactor", "data": None}
    )


def _sum(spec):
    """Two free background normalizations per bin that only enter as their sum."""
    spec["channels"][0]["samples"][1]["modifiers"] = [
        {"name": "b1", "type": "shapefactor", "data": None}
    ]
    spec["channels"][0]["samples"].append(
        {
            "name": "background2",
            "data": [50.0, 60.0],
            "modifiers": [{"name": "b2", "type": "shapefactor", "data": None}],
        }
    )


def _zero_normsys(spec):
    spec["channels"][0]["samples"][1]["modifiers"].append(
        {"name": "xsec", "type": "normsys", "data": {"hi": 1.1, "lo": 0.0}}
    )


def _negative_yield(spec):
    spec["channels"][0]["samples"][1]["data"] = [50.0, -60.0]


def _negative_count(spec):
    spec["observations"][0]["data"] = [-3.0, 60.0]


def _patch_file(tmp_path, ops):
    return _write(tmp_path / "patch.json", ops)


def _patchset_file(tmp_path, spec):
    patchset = {
        "metadata": {
            "description": "signal hypotheses",
            "digests": {"sha256": pyhf.utils.digest(spec, "sha256")},
            "labels": ["mass"],
            "references": {"hepdata": "ins0000000"},
        },
        "patches": [
            {
                "metadata": {"name": "m300", "values": [300]},
                "patch": [
                    {"op": "replace", "path": "/channels/0/samples/0/data", "value": [9.0, 3.0]}
                ],
            }
        ],
        "version": "1.0.0",
    }
    return f"{_write(tmp_path / 'signals.json', patchset)}:m500"


# name -> (change to the 2-bin workspace, CLI arguments after INPUT (a callable gets tmp_path
# and the spec), the message fragment)
BAD_INPUTS = {
    "schema error": (
        _drop_sample_data,
        ["fit"],
        "ws.json: channels[0].samples[1]: 'data' is a required property",
    ),
    "unknown modifier type": (
        _unknown_modifier,
        ["fit"],
        "ws.json: channels[0].samples[1].modifiers[0]: unknown modifier type 'shapesyst'; "
        "valid types: histosys",
    ),
    "patch does not apply": (
        None,
        lambda t, s: ["fit", "--patch", _patch_file(t, [{"op": "remove", "path": "/channels/3"}])],
        "patch.json: operation 0 (remove /channels/3) does not apply to",
    ),
    "patchset name not found": (
        None,
        lambda t, s: ["hypotest", "--poi-value", "1", "--patch", _patchset_file(t, s)],
        "signals.json: no patch named 'm500'; valid names: m300",
    ),
    "POI missing": (
        _no_poi,
        ["hypotest", "--poi-value", "1"],
        "ws.json: measurement 'Measurement' has no POI (its config.poi is empty); "
        "diffana hypotest needs a parameter of interest",
    ),
    "POI missing, limit": (_no_poi, ["limit"], "diffana limit needs a parameter of interest"),
    "non-finite start, --fix": (
        None,
        ["fit", "--fix", "mu=-100"],
        "ws.json: twice_nll is nan at the start point: channel 'singlechannel' bin 0 expects "
        "-450 events (background 50, signal -500); caused by mu=-100 (from --fix)",
    ),
    "non-finite start, --fix of a parameter set": (
        None,
        ["fit", "--fix", "uncorr_bkguncrt=-1"],
        "expects -45 events (background -50, signal 5); caused by uncorr_bkguncrt=-1 (from --fix)",
    ),
    "non-finite start, --range": (
        None,
        ["scan", "--parameter", "mu", "--range", "-100", "1", "--steps", "3"],
        "twice_nll is nan at the start point: channel 'singlechannel' bin 0 expects -450 events "
        "(background 50, signal -500); caused by mu=-100 (from --range)",
    ),
    "non-finite start, negative nominal yield": (
        _negative_yield,
        ["limit"],
        "bin 1 expects -50 events (background -60, signal 10); caused by the nominal yield -60 "
        "of sample 'background'",
    ),
    "non-finite start, normsys lo = 0": (
        _zero_normsys,
        ["significance"],
        "caused by normsys 'xsec' of sample 'background' in channel 'singlechannel' (hi 1.1, "
        "lo 0; factors must be > 0)",
    ),
    "negative count": (
        _negative_count,
        ["fit"],
        "ws.json: observed data of channel 'singlechannel' bin 0 is -3; counts must be finite",
    ),
    "unknown --fix parameter": (
        None,
        ["fit", "--fix", "muu=1"],
        "--fix 'muu=1': unknown parameter 'muu' (did you mean 'mu'?); parameters: mu, "
        "uncorr_bkguncrt[0], uncorr_bkguncrt[1]",
    ),
    "unknown --minos parameter": (
        None,
        ["fit", "--minos", "uncorr_bkguncrt[2]"],
        "--minos: unknown parameter 'uncorr_bkguncrt[2]'",
    ),
    "fixed --minos parameter": (
        None,
        ["fit", "--minos", "mu", "--fix", "mu=1"],
        "--minos mu: the parameter is fixed",
    ),
    "unknown --parameter": (
        None,
        ["scan", "--parameter", "nu"],
        "--parameter: unknown parameter 'nu'; parameters: mu, uncorr_bkguncrt[0]",
    ),
    "--fix without value": (None, ["fit", "--fix", "mu"], "--fix 'mu': expected NAME=VALUE"),
    "--fix not a number": (None, ["fit", "--fix", "mu=one"], "--fix 'mu=one': expected NAME="),
    "--fix not finite": (None, ["fit", "--fix", "mu=inf"], "must be a finite number"),
    "--poi-value outside bounds": (
        None,
        ["hypotest", "--poi-value", "-1"],
        "--poi-value -1 is outside the bounds [0, 10] of the POI 'mu'",
    ),
    "q0 at a non-zero POI value": (
        None,
        ["hypotest", "--poi-value", "1", "--test-stat", "q0"],
        "--test-stat q0 tests the background-only hypothesis: --poi-value must be 0",
    ),
    "unknown measurement": (
        None,
        ["ranking", "--measurement", "meas"],
        "no measurement named 'meas'; valid: Measurement",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, case):
    change, args, message = BAD_INPUTS[case]
    spec = _two_bin()
    original = copy.deepcopy(spec)
    if change is not None:
        change(spec)
    path = _write(tmp_path / "ws.json", spec)
    args = args(tmp_path, original) if callable(args) else args
    target = tmp_path / "out" / "result.json"
    result = run(args[0], path, *args[1:], "--device", "cpu", "--output", target)
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0], lines[0]
    assert not target.parent.exists()


def test_missing_input_file(tmp_path):
    result = run("limit", tmp_path / "nothere.json")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: {tmp_path / 'nothere.json'}: no such file"


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    path = _write(tmp_path / "ws.json", _two_bin())
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.cli", "fit", str(path), "--device", "cpu"]
        + ["--fix", "mu=-100"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Error: {path}: twice_nll is nan at the start point")


def test_real_process_exits_fast_with_every_output(tmp_path):
    """A program run ends with os._exit after flushing: its exit code and its whole stdout
    (the JSON, byte for byte) are the in-process run's; the output file is complete; click's
    usage errors keep exit code 2."""
    path = _write(tmp_path / "ws.json", _two_bin())
    args = ["fit", str(path), "--device", "cpu", "--minos", "mu"]
    in_process = run(*args)
    assert in_process.exit_code == 0, in_process.stderr
    target = tmp_path / "out" / "fit.json"
    program = [sys.executable, "-m", "analysis.cli"]
    proc = subprocess.run(program + args, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == in_process.stdout and json.loads(proc.stdout)["minos"]
    proc = subprocess.run(
        program + [*args, "-o", str(target)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert target.read_text() == in_process.stdout
    proc = subprocess.run(program + ["fit", "--bogus"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "No such option '--bogus'" in proc.stderr


@pytest.mark.parametrize(
    ("change", "degenerate"),
    [(_product, ["k", "mu"]), (_sum, ["mu", "b1[0]", "b1[1]", "b2[0]", "b2[1]"])],
)
def test_degenerate_directions_are_warnings_not_refusals(tmp_path, change, degenerate):
    """mu * k, or two normalizations that only enter as their sum: fit names the degenerate
    parameters in a warning and reports their uncertainties as null (with a reason); the
    hypotest, significance, limit and scan need only profiled likelihood values and run."""
    spec = _two_bin()
    change(spec)
    path = _write(tmp_path / "ws.json", spec)
    result = run("fit", path)
    assert result.exit_code == 0, result.stderr
    assert "degenerate parameters " + ", ".join(degenerate) in result.stderr
    out = json.loads(result.stdout)
    unc = _by_label(out, "uncertainty")
    assert all(unc[name] is None for name in degenerate)
    assert all(unc[n] is not None for n in out["labels"] if n not in degenerate)
    assert "not finite" in out["uncertainty_reason"]
    for args in (
        ["hypotest", "--poi-value", "1"],
        ["significance"],
        ["scan", "--parameter", "mu", "--steps", "3", "--range", "0", "2"],
    ):
        assert run(*args[:1], path, *args[1:]).exit_code == 0, args
    # the default scan range is +-2 parabolic sigma, which a degenerate mu does not have
    result = run("scan", path, "--parameter", "mu", "--steps", "3")
    assert result.exit_code == 2
    assert "'mu' has no parabolic uncertainty" in result.stderr.strip().splitlines()[-1]


def test_fit_finds_the_global_minimum_of_a_kinked_model():
    """multichan_coupledhistosys (code0/code1): MIGRAD from the init, ours and pyhf's, stops at
    twice NLL 28.033; the multi-start Newton minimum it starts from is 26.564."""
    xml = reference_path(
        "pyhf_validation", "xml", "multichan_coupledhistosys_histfactory", "config", "example.xml"
    )
    result = CliRunner().invoke(main, ["fit", str(xml), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)
    assert fit["converged"]
    assert fit["twice_nll"] == pytest.approx(26.564, abs=2e-3)
