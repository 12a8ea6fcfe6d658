"""HistFactory likelihood in torch against pyhf 0.7.6 (numpy backend), case by case.

Reference workspaces come from ../shared/reference (pyhf's validation cases, its 2-bin example,
the cabinetry example and pyhf's HistFactory XML inputs); every number is compared with pyhf
evaluated in this process. Gradients are checked with torch.autograd.gradcheck in float64.
"""

from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import pyhf
import pytest
import torch

from analysis.errors import ConfigError, DataError, InputFileError
from analysis.likelihood import Model, Workspace
from analysis.likelihood.modifiers.base import with_ones
from tests.conftest import REFERENCE, reference_path

RTOL = 1e-10
N_POINTS = 40


# ---------------------------------------------------------------------- reference cases
def _case_names() -> list[str]:
    folder = REFERENCE / "pyhf_validation" / "reference_cases"
    names = sorted(p.stem for p in folder.glob("*.json"))
    return names or ["(reference data absent)"]


def _xml_cases() -> list[str]:
    names = sorted(p.name for p in (REFERENCE / "pyhf_validation" / "xml").glob("*") if p.is_dir())
    return names or ["(reference data absent)"]


def _load_case(name: str) -> tuple[dict, dict | None]:
    """(workspace spec, modifier_settings) of a named reference workspace."""
    if name == "2-bin_1-channel":
        return json.loads(
            reference_path("pyhf_validation", "2-bin_1-channel.json").read_text()
        ), None
    if name == "cabinetry_example":
        path = reference_path("cabinetry", "example_workspace.json")
        return json.loads(path.read_text()), None
    case = json.loads(
        reference_path("pyhf_validation", "reference_cases", f"{name}.json").read_text()
    )
    return case["workspace"], case["modifier_settings"]


def _pyhf(spec: dict, settings: dict | None) -> tuple[pyhf.pdf.Model, np.ndarray]:
    workspace = pyhf.Workspace(spec)
    model = workspace.model(**({} if settings is None else {"modifier_settings": settings}))
    return model, np.asarray(workspace.data(model), dtype=float)


def _points(bounds: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Uniform points within the bounds, restricted to [-3, 3] (nuisance parameters far out
    at +-5 make many yields negative, where both likelihoods are NaN)."""
    rng = np.random.default_rng(seed)
    low, high = np.maximum(bounds[:, 0], -3.0), np.minimum(bounds[:, 1], 3.0)
    return rng.uniform(low, high, size=(n, len(bounds)))


def max_relative_logpdf_difference(
    model: Model, ref: pyhf.pdf.Model, data: np.ndarray, points: np.ndarray
) -> tuple[float, int]:
    """Largest |ours - pyhf| / |pyhf| over the points where pyhf is finite, and their count.

    Points where pyhf gives NaN must give NaN here too.
    """
    ours = model.logpdf(torch.as_tensor(points), torch.as_tensor(data)).numpy()
    theirs = np.array([ref.logpdf(p, data)[0] for p in points])
    finite = np.isfinite(theirs)
    np.testing.assert_array_equal(np.isfinite(ours), finite)
    rel = np.abs(ours[finite] - theirs[finite]) / np.abs(theirs[finite])
    return float(rel.max()), int(finite.sum())


def assert_same_config(model: Model, ref: pyhf.pdf.Model) -> None:
    cfg = ref.config
    assert model.par_names == tuple(cfg.par_names)
    assert model.par_order == tuple(cfg.par_order)
    assert model.channels == tuple(cfg.channels)
    assert dict(model.channel_nbins) == cfg.channel_nbins
    assert model.samples == tuple(cfg.samples)
    assert {k: (v.start, v.stop) for k, v in model.par_slices.items()} == {
        k: (cfg.par_slice(k).start, cfg.par_slice(k).stop) for k in cfg.par_order
    }
    assert (model.npars, model.nmain, model.naux) == (cfg.npars, cfg.nmaindata, cfg.nauxdata)
    assert (model.poi_name, model.poi_index) == (cfg.poi_name, cfg.poi_index)
    np.testing.assert_array_equal(model.suggested_init().numpy(), cfg.suggested_init())
    np.testing.assert_array_equal(
        model.suggested_bounds().numpy(), np.asarray(cfg.suggested_bounds(), dtype=float)
    )
    assert model.suggested_fixed().tolist() == cfg.suggested_fixed()
    np.testing.assert_allclose(model.auxdata.numpy(), cfg.auxdata, rtol=1e-14)


@pytest.mark.parametrize("name", [*_case_names(), "2-bin_1-channel", "cabinetry_example"])
def test_reference_workspace_matches_pyhf(name):
    if name.startswith("("):
        reference_path("pyhf_validation", "reference_cases")
    spec, settings = _load_case(name)
    ref, ref_data = _pyhf(spec, settings)
    workspace = Workspace.from_spec(spec)
    model = workspace.model(modifier_settings=settings)
    assert_same_config(model, ref)
    data = workspace.data(model)
    np.testing.assert_array_equal(data.numpy(), ref_data)

    points = _points(np.asarray(ref.config.suggested_bounds(), dtype=float), N_POINTS, seed=1)
    rel, finite = max_relative_logpdf_difference(model, ref, ref_data, points)
    assert finite >= 20
    assert rel < RTOL
    # non-integer (Asimov-like) data from another parameter point: continuous Poisson terms
    asimov = np.asarray(ref.expected_data(points[0]), dtype=float)
    rel, _ = max_relative_logpdf_difference(model, ref, asimov, points[1:])
    assert rel < RTOL

    expected = model.expected_data(torch.as_tensor(points)).numpy()
    theirs = np.array([ref.expected_data(p) for p in points])
    np.testing.assert_allclose(expected, theirs, rtol=RTOL, atol=1e-12)
    main = model.expected_actualdata(torch.as_tensor(points[0])).numpy()
    np.testing.assert_allclose(main, ref.expected_actualdata(points[0]), rtol=RTOL)
    aux = model.expected_auxdata(torch.as_tensor(points[0])).numpy()
    if model.naux:  # pyhf's expected_auxdata fails without constraint terms
        np.testing.assert_allclose(aux, ref.expected_auxdata(points[0]), rtol=RTOL)
    else:
        assert aux.shape == (0,)
    by_sample = model.expected_by_sample(torch.as_tensor(points[0])).numpy()
    np.testing.assert_allclose(
        by_sample, ref.main_model.expected_data(points[0], return_by_sample=True), rtol=RTOL
    )


@pytest.mark.parametrize("name", _xml_cases())
def test_xml_loads_like_pyhf_readxml(name):
    xml = reference_path("pyhf_validation", "xml", name, "config", "example.xml")
    workspace = Workspace.load(xml)
    ref_spec = pyhf.readxml.parse(xml, xml.parent.parent)
    pyhf.readxml.clear_filecache()
    assert workspace.spec == ref_spec
    ref, ref_data = _pyhf(ref_spec, None)
    model = workspace.model()
    assert_same_config(model, ref)
    np.testing.assert_array_equal(workspace.data(model).numpy(), ref_data)
    points = _points(np.asarray(ref.config.suggested_bounds(), dtype=float), N_POINTS, seed=2)
    rel, finite = max_relative_logpdf_difference(model, ref, ref_data, points)
    assert finite >= 20
    assert rel < RTOL


# ---------------------------------------------------------------------- a small workspace
def small_spec(*, lumi: bool = True) -> dict:
    """Two channels, three samples, every modifier type, shared and per-channel sets."""
    sig_mods = [
        {"name": "mu", "type": "normfactor", "data": None},
        {"name": "staterror_SR", "type": "staterror", "data": [0.8, 1.1, 0.5]},
    ]
    if lumi:
        sig_mods.append({"name": "lumi", "type": "lumi", "data": None})
    spec = {
        "channels": [
            {
                "name": "SR",
                "samples": [
                    {"name": "signal", "data": [4.0, 6.0, 2.5], "modifiers": sig_mods},
                    {
                        "name": "background",
                        "data": [20.0, 15.0, 0.0],
                        "modifiers": [
                            {"name": "jes", "type": "normsys", "data": {"hi": 1.12, "lo": 0.91}},
                            {
                                "name": "jes",
                                "type": "histosys",
                                "data": {
                                    "hi_data": [21.0, 16.5, 0.0],
                                    "lo_data": [19.5, 13.0, 0.0],
                                },
                            },
                            {"name": "staterror_SR", "type": "staterror", "data": [2.0, 1.5, 0.0]},
                            {"name": "bkg_unc", "type": "shapesys", "data": [3.0, 0.0, 1.0]},
                        ],
                    },
                ],
            },
            {
                "name": "CR",
                "samples": [
                    {
                        "name": "background",
                        "data": [50.0, 40.0],
                        "modifiers": [
                            {"name": "jes", "type": "normsys", "data": {"hi": 1.05, "lo": 0.97}},
                            {"name": "cr_shape", "type": "shapefactor", "data": None},
                            {"name": "k_bkg", "type": "normfactor", "data": None},
                        ],
                    },
                    {
                        "name": "other",
                        "data": [5.0, 3.0],
                        "modifiers": [
                            {
                                "name": "model",
                                "type": "histosys",
                                "data": {"hi_data": [6.0, 3.1], "lo_data": [4.5, 2.7]},
                            },
                            {"name": "k_bkg", "type": "normfactor", "data": None},
                        ],
                    },
                ],
            },
        ],
        "observations": [
            {"name": "SR", "data": [27.0, 20.0, 3.0]},
            {"name": "CR", "data": [53.0, 47.0]},
        ],
        "measurements": [
            {
                "name": "meas",
                "config": {
                    "poi": "mu",
                    "parameters": [{"name": "k_bkg", "bounds": [[0.1, 5.0]], "inits": [1.2]}],
                },
            }
        ],
        "version": "1.0.0",
    }
    if lumi:
        spec["measurements"][0]["config"]["parameters"].append(
            {
                "name": "lumi",
                "auxdata": [1.0],
                "sigmas": [0.02],
                "bounds": [[0.8, 1.2]],
                "inits": [1.0],
            }
        )
    return spec


SETTINGS = {
    "code1/code0": {"normsys": {"interpcode": "code1"}, "histosys": {"interpcode": "code0"}},
    "code4/code4p": {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}},
    "code1/code4p": {"normsys": {"interpcode": "code1"}, "histosys": {"interpcode": "code4p"}},
}


@pytest.mark.parametrize("settings", list(SETTINGS))
def test_small_workspace_matches_pyhf(settings):
    spec = small_spec()
    ref, ref_data = _pyhf(spec, SETTINGS[settings])
    workspace = Workspace.from_spec(spec)
    model = workspace.model(modifier_settings=SETTINGS[settings])
    assert_same_config(model, ref)
    points = _points(np.asarray(ref.config.suggested_bounds(), dtype=float), 40, seed=3)
    rel, finite = max_relative_logpdf_difference(model, ref, ref_data, points)
    assert finite >= 20
    assert rel < RTOL


def test_default_modifier_settings_are_pyhf_defaults():
    spec = small_spec()
    ref, ref_data = _pyhf(spec, None)  # pyhf.Model default: normsys code4, histosys code4p
    model = Workspace.from_spec(spec).model()
    assert model.modifier_settings["normsys"] == {"interpcode": "code4"}
    points = _points(np.asarray(ref.config.suggested_bounds(), dtype=float), 30, seed=4)
    rel, _ = max_relative_logpdf_difference(model, ref, ref_data, points)
    assert rel < RTOL
    # a settings dict that names only normsys leaves histosys at its own default, code0
    settings = {"normsys": {"interpcode": "code4"}}
    ref, ref_data = _pyhf(spec, settings)
    model = Workspace.from_spec(spec).model(modifier_settings=settings)
    rel, _ = max_relative_logpdf_difference(model, ref, ref_data, points)
    assert rel < RTOL


def test_models_with_few_modifier_types_match_pyhf():
    """Only per-bin factors, only additive modifiers, only one normsys, no constraints."""
    spec = small_spec(lumi=False)
    variants = {
        "staterror+histosys": {"staterror", "histosys"},
        "histosys": {"histosys"},
        "normsys": {"normsys"},
        "shapefactor+normfactor": {"shapefactor", "normfactor"},
    }
    for keep in variants.values():
        variant = copy.deepcopy(spec)
        for channel in variant["channels"]:
            for sample in channel["samples"]:
                sample["modifiers"] = [m for m in sample["modifiers"] if m["type"] in keep]
        variant["measurements"][0]["config"]["parameters"] = []
        workspace = Workspace.from_spec(variant)
        model = workspace.model(poi_name="")
        ref = pyhf.Workspace(variant).model(poi_name=None)
        ref_data = np.asarray(pyhf.Workspace(variant).data(ref), dtype=float)
        assert_same_config(model, ref)
        points = _points(np.asarray(ref.config.suggested_bounds(), dtype=float), 10, seed=9)
        rel, _ = max_relative_logpdf_difference(model, ref, ref_data, points)
        assert rel < RTOL


ALPHAS = [-2.5, -1.0, -0.3, 0.0, 0.4, 1.0, 2.2]


@pytest.mark.parametrize(
    ("modifier", "code"),
    [("normsys", "code1"), ("normsys", "code4"), ("histosys", "code0"), ("histosys", "code4p")],
)
def test_interpolation_code_against_pyhf(modifier, code):
    spec = {
        "channels": [
            {
                "name": "ch",
                "samples": [
                    {
                        "name": "sig",
                        "data": [5.0, 3.0, 1.0],
                        "modifiers": [{"name": "mu", "type": "normfactor", "data": None}],
                    },
                    {
                        "name": "bkg",
                        "data": [30.0, 20.0, 10.0],
                        "modifiers": [
                            {"name": "n", "type": "normsys", "data": {"hi": 1.25, "lo": 0.85}},
                            {
                                "name": "h",
                                "type": "histosys",
                                "data": {
                                    "hi_data": [33.0, 21.0, 9.0],
                                    "lo_data": [28.0, 18.5, 10.5],
                                },
                            },
                        ],
                    },
                ],
            }
        ],
        "observations": [{"name": "ch", "data": [36.0, 22.0, 12.0]}],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }
    settings = {modifier: {"interpcode": code}}
    ref, data = _pyhf(spec, settings)
    model = Workspace.from_spec(spec).model(modifier_settings=settings)
    index = model.par_slices["n" if modifier == "normsys" else "h"].start
    for alpha in ALPHAS:
        pars = model.suggested_init()
        pars[index] = alpha
        ours = model.expected_actualdata(pars).numpy()
        np.testing.assert_allclose(ours, ref.expected_actualdata(pars.numpy()), rtol=1e-12)
        logpdf = float(model.logpdf(pars, torch.as_tensor(data)))
        assert logpdf == pytest.approx(float(ref.logpdf(pars.numpy(), data)[0]), rel=RTOL)


# ---------------------------------------------------------------------- batching
def test_batched_calls_equal_loops():
    workspace = Workspace.from_spec(small_spec())
    model = workspace.model()
    data = workspace.data(model)
    bounds = model.suggested_bounds().numpy()
    pars = torch.as_tensor(_points(bounds, 6, seed=5))
    datasets = torch.stack([model.expected_data(p) for p in pars[:4]]) + 0.5
    single = torch.stack([model.logpdf(p, d) for p, d in zip(pars[:4], datasets, strict=True)])
    torch.testing.assert_close(model.logpdf(pars[:4], datasets), single, rtol=1e-14, atol=0)
    # (B, 1, P) parameters with (D, N + A) datasets -> (B, D)
    grid = model.logpdf(pars[:, None, :], datasets)
    assert grid.shape == (6, 4)
    loop = torch.stack([torch.stack([model.logpdf(p, d) for d in datasets]) for p in pars])
    torch.testing.assert_close(grid, loop, rtol=1e-14, atol=0)
    # one parameter point, many datasets; many points, one dataset
    torch.testing.assert_close(model.logpdf(pars[0], datasets), loop[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(
        model.logpdf(pars, data),
        torch.stack([model.logpdf(p, data) for p in pars]),
        rtol=1e-14,
        atol=0,
    )
    assert model.logpdf(pars[0], data).shape == ()
    expected = model.expected_data(pars.reshape(2, 3, -1))
    assert expected.shape == (2, 3, model.nmain + model.naux)
    torch.testing.assert_close(
        expected.reshape(6, -1),
        torch.stack([model.expected_data(p) for p in pars]),
        rtol=1e-14,
        atol=0,
    )
    torch.testing.assert_close(model.twice_nll(pars, data), -2 * model.logpdf(pars, data))


def test_main_plus_constraint_is_logpdf_and_fused_product_is_per_type_product():
    workspace = Workspace.from_spec(small_spec())
    model = workspace.model()
    data = workspace.data(model)
    pars = torch.as_tensor(_points(model.suggested_bounds().numpy(), 3, seed=6))
    total = model.main_logpdf(pars, data[: model.nmain]) + model.constraint_logpdf(
        pars, data[model.nmain :]
    )
    torch.testing.assert_close(total, model.logpdf(pars, data), rtol=1e-14, atol=0)
    x = pars.T.contiguous()
    product = torch.ones(model._nominal_column.shape[0], 3, dtype=torch.float64)
    for mod in model._modifiers:
        if mod.op == "multiply":
            product = product * mod.apply(x)
    fused = model._cell_rates(x)
    delta = sum(mod.apply(x) for mod in model._modifiers if mod.op == "add")
    torch.testing.assert_close(fused, (model._nominal_column + delta) * product)
    assert with_ones([x]).shape == (model.npars + 1, 3)


def test_dtype_and_device_follow_the_build():
    workspace = Workspace.from_spec(small_spec())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.float64):
            model = workspace.model(dtype=dtype, device=device)
            data = workspace.data(model)
            result = model.logpdf(model.suggested_init(), data)
            assert result.dtype == dtype and result.device.type == device
            assert model.auxdata.dtype == dtype
            ref = workspace.model().logpdf(
                workspace.model().suggested_init(), workspace.data(workspace.model())
            )
            rtol = 1e-5 if dtype == torch.float32 else 1e-12
            assert float(result) == pytest.approx(float(ref), rel=rtol)


# ---------------------------------------------------------------------- gradients
def tensor_spec(inputs: dict[str, torch.Tensor]) -> dict:
    """small_spec with yields, templates, normsys factors and staterror data as tensors."""
    spec = small_spec()
    sr_sig, sr_bkg = spec["channels"][0]["samples"]
    cr_bkg, cr_other = spec["channels"][1]["samples"]
    sr_sig["data"] = inputs["signal"]
    sr_sig["modifiers"][1]["data"] = inputs["stat_sig"]
    sr_bkg["data"] = inputs["background"]
    sr_bkg["modifiers"][0]["data"] = {"hi": inputs["hi"], "lo": inputs["lo"]}
    sr_bkg["modifiers"][1]["data"] = {"hi_data": inputs["up"], "lo_data": inputs["down"]}
    sr_bkg["modifiers"][2]["data"] = inputs["stat_bkg"]
    sr_bkg["modifiers"][3]["data"] = inputs["shapesys"]
    cr_bkg["data"] = [inputs["cr"][0], inputs["cr"][1]]  # a list of 0-d tensors also works
    cr_other["modifiers"][0]["data"]["hi_data"] = inputs["cr_up"]
    return spec


def gradient_inputs() -> dict[str, torch.Tensor]:
    values = {
        "signal": [4.0, 6.0, 2.5],
        "stat_sig": [0.8, 1.1, 0.5],
        "background": [20.0, 15.0, 0.5],
        "hi": 1.12,
        "lo": 0.91,
        "up": [21.0, 16.5, 0.6],
        "down": [19.5, 13.0, 0.45],
        "stat_bkg": [2.0, 1.5, 0.2],
        "shapesys": [3.0, 0.4, 1.0],
        "cr": [50.0, 40.0],
        "cr_up": [6.0, 3.1],
    }
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}


@pytest.mark.parametrize("settings", ["code1/code0", "code4/code4p"])
def test_gradcheck_in_parameters_and_spec_tensors(settings):
    inputs = gradient_inputs()
    names = list(inputs)
    workspace = Workspace.from_spec(tensor_spec(inputs))
    model = workspace.model(modifier_settings=SETTINGS[settings])
    generator = torch.Generator().manual_seed(7)
    pars = model.suggested_init() + 0.2 * torch.rand(
        model.npars, generator=generator, dtype=torch.float64
    )
    pars.requires_grad_(True)
    data = workspace.data(model).detach()

    def logpdf(p, *tensors):
        ws = Workspace.from_spec(tensor_spec(dict(zip(names, tensors, strict=True))))
        m = ws.model(modifier_settings=SETTINGS[settings])
        return m.logpdf(p, data)

    assert torch.autograd.gradcheck(logpdf, (pars, *inputs.values()))
    # second derivatives in the parameters (Newton fits use the autograd Hessian)
    assert torch.autograd.gradgradcheck(lambda p: model.logpdf(p, data), (pars,))


def test_gradients_reach_every_spec_tensor_and_stay_finite_at_the_init():
    inputs = gradient_inputs()
    workspace = Workspace.from_spec(tensor_spec(inputs))
    model = workspace.model()
    data = workspace.data(model)
    # background-only start point: mu = 0 and every alpha = 0 (kinks of the interpolations)
    start = model.suggested_init()
    start[model.poi_index] = 0.0
    away = start + 0.3
    for pars, nonzero in ((start, False), (away, True)):
        pars = pars.clone().requires_grad_(True)
        value = model.logpdf(pars, data)
        grads = torch.autograd.grad(value, [pars, *inputs.values()], retain_graph=True)
        for name, grad in zip(["pars", *inputs], grads, strict=True):
            assert torch.isfinite(grad).all(), name
            if nonzero:
                assert grad.abs().sum() > 0, name
    hessian = torch.autograd.functional.hessian(lambda p: model.logpdf(p, data.detach()), start)
    assert torch.isfinite(hessian).all()


def test_prefit_uncertainties_and_unconstrained_count():
    workspace = Workspace.from_spec(small_spec())
    model = workspace.model()
    ref, _ = _pyhf(small_spec(), None)
    expected = []
    for name in ref.config.par_order:
        paramset = ref.config.param_set(name)
        if not paramset.constrained:
            widths = [0.0] * paramset.n_parameters
        else:
            widths = list(paramset.width())
        expected += [0.0 if f else w for w, f in zip(widths, paramset.suggested_fixed, strict=True)]
    np.testing.assert_allclose(model.prefit_uncertainties().numpy(), expected, rtol=1e-14)
    free_unconstrained = sum(
        not f
        for name in ref.config.par_order
        if not ref.config.param_set(name).constrained
        for f in ref.config.param_set(name).suggested_fixed
    )
    assert model.unconstrained_free_count() == free_unconstrained


# ---------------------------------------------------------------------- export and patches
def test_to_json_round_trips_and_is_pyhf_valid(tmp_path):
    inputs = gradient_inputs()
    workspace = Workspace.from_spec(tensor_spec(inputs))
    exported = workspace.to_json()
    pyhf.schema.validate(exported, "workspace.json")
    path = tmp_path / "ws.json"
    path.write_text(json.dumps(exported))  # plain floats only
    again = Workspace.load(path)
    assert again.to_json() == exported
    model, model_again = workspace.model(), again.model()
    data = workspace.data(model).detach()
    pars = model.suggested_init()
    assert float(model_again.logpdf(pars, data)) == pytest.approx(
        float(model.logpdf(pars, data).detach()), rel=1e-14
    )
    # the tensors themselves are kept (not copied) by from_spec
    assert workspace.spec["channels"][0]["samples"][0]["data"] is inputs["signal"]


def _write(path: pathlib.Path, obj) -> pathlib.Path:
    path.write_text(json.dumps(obj))
    return path


def test_json_patch_file_applies(tmp_path):
    ws_path = _write(tmp_path / "ws.json", small_spec())
    patch = _write(
        tmp_path / "patch.json",
        [{"op": "replace", "path": "/channels/0/samples/0/data", "value": [8.0, 9.0, 1.0]}],
    )
    workspace = Workspace.load(ws_path, patches=[patch])
    assert workspace.spec["channels"][0]["samples"][0]["data"] == [8.0, 9.0, 1.0]
    assert "patch.json" in workspace.source
    patched = small_spec()
    patched["channels"][0]["samples"][0]["data"] = [8.0, 9.0, 1.0]
    ref, ref_data = _pyhf(patched, None)
    model = workspace.model()
    assert float(model.logpdf(model.suggested_init(), workspace.data(model))) == pytest.approx(
        float(ref.logpdf(ref.config.suggested_init(), ref_data)[0]), rel=RTOL
    )


def _patchset(spec: dict) -> dict:
    def signal(name: str, yields: list[float], values: list[float]) -> dict:
        return {
            "metadata": {"name": name, "values": values},
            "patch": [
                {
                    "op": "add",
                    "path": "/channels/1/samples/-",
                    "value": {
                        "name": "signal",
                        "data": yields,
                        "modifiers": [{"name": "mu", "type": "normfactor", "data": None}],
                    },
                }
            ],
        }

    return {
        "metadata": {
            "description": "signal hypotheses",
            "digests": {"sha256": pyhf.utils.digest(spec, "sha256")},
            "labels": ["mass"],
            "references": {"hepdata": "ins1234567"},
        },
        "patches": [signal("m300", [1.0, 0.5], [300]), signal("m500", [0.3, 0.2], [500])],
        "version": "1.0.0",
    }


def test_patchset_patch_applies_like_pyhf(tmp_path):
    spec = small_spec()
    ws_path = _write(tmp_path / "ws.json", spec)
    ps_path = _write(tmp_path / "patchset.json", _patchset(spec))
    workspace = Workspace.load(ws_path, patches=[f"{ps_path}:m500"])
    ref_ws = pyhf.PatchSet(_patchset(spec)).apply(pyhf.Workspace(spec), "m500")
    assert workspace.to_json() == dict(ref_ws)
    ref = ref_ws.model()
    model = workspace.model()
    assert model.par_names == tuple(ref.config.par_names)
    points = _points(np.asarray(ref.config.suggested_bounds(), dtype=float), 25, seed=8)
    rel, _ = max_relative_logpdf_difference(model, ref, np.asarray(ref_ws.data(ref)), points)
    assert rel < RTOL


def test_patch_errors_name_file_and_operation(tmp_path):
    spec = small_spec()
    ws_path = _write(tmp_path / "ws.json", spec)
    bad = _write(
        tmp_path / "bad_patch.json",
        [
            {"op": "replace", "path": "/channels/0/name", "value": "SR2"},
            {"op": "remove", "path": "/channels/7"},
        ],
    )
    with pytest.raises(ConfigError, match=r"bad_patch\.json: operation 1 \(remove /channels/7\)"):
        Workspace.load(ws_path, patches=[bad])
    ps_path = _write(tmp_path / "ps.json", _patchset(spec))
    with pytest.raises(
        ConfigError, match=r"ps\.json: no patch named 'm999'; valid names: m300, m500"
    ):
        Workspace.load(ws_path, patches=[f"{ps_path}:m999"])
    other = copy.deepcopy(spec)
    other["observations"][0]["data"][0] = 99.0
    other_path = _write(tmp_path / "other.json", other)
    with pytest.raises(ConfigError, match=r"ps\.json: patchset was made for a different workspace"):
        Workspace.load(other_path, patches=[f"{ps_path}:m300"])
    with pytest.raises(InputFileError, match="missing_patch.json"):
        Workspace.load(ws_path, patches=[tmp_path / "missing_patch.json"])
    not_a_patch = _write(tmp_path / "np.json", {"op": "add"})
    with pytest.raises(ConfigError, match=r"np\.json"):
        Workspace.load(ws_path, patches=[not_a_patch])
    # a patch that makes the workspace invalid is reported with the patched source
    invalid = _write(
        tmp_path / "inv.json", [{"op": "remove", "path": "/channels/0/samples/0/data"}]
    )
    with pytest.raises(ConfigError, match=r"inv\.json: channels\[0\]\.samples\[0\]: 'data' is a"):
        Workspace.load(ws_path, patches=[invalid])


# ---------------------------------------------------------------------- bad input
def test_schema_errors_name_file_and_json_path(tmp_path):
    spec = small_spec()
    del spec["channels"][0]["samples"][1]["modifiers"][0]["type"]
    path = _write(tmp_path / "ws.json", spec)
    with pytest.raises(
        ConfigError,
        match=r"ws\.json: channels\[0\]\.samples\[1\]\.modifiers\[0\]: 'type' is a required "
        r"property$",
    ):
        Workspace.load(path)
    spec = small_spec()
    del spec["channels"][0]["samples"][1]["modifiers"][0]["data"]["hi"]
    with pytest.raises(
        ConfigError,
        match=r"ws2\.json: channels\[0\]\.samples\[1\]\.modifiers\[0\]\.data: 'hi' is a required",
    ):
        Workspace.load(_write(tmp_path / "ws2.json", spec))
    spec = small_spec()
    spec["observations"][1]["data"] = "many"
    with pytest.raises(ConfigError, match=r"ws3\.json: observations\[1\]\.data: 'many' is not"):
        Workspace.load(_write(tmp_path / "ws3.json", spec))
    spec = small_spec()
    del spec["version"]
    with pytest.raises(ConfigError, match=r"ws4\.json: 'version' is a required property"):
        Workspace.load(_write(tmp_path / "ws4.json", spec))


def _pyhf_first_error(instance, schema: str):
    try:
        pyhf.schema.validate(instance, schema)
    except pyhf.exceptions.InvalidSpecification as exc:
        return exc.parent
    return None


def test_schema_check_judges_as_pyhf():
    """``pyhf_schema`` (pyhf's schema files without importing pyhf) finds the same first error
    as ``pyhf.schema.validate``, and accepts what it accepts (bools count as numbers there)."""
    from analysis.likelihood.workspace import _inline_refs, pyhf_schema

    def mutated(change):
        spec = small_spec()
        change(spec)
        return spec

    cases = [
        small_spec(),
        mutated(lambda s: s["channels"][0]["samples"][0]["data"].__setitem__(0, True)),
        mutated(lambda s: s["channels"][0]["samples"][1]["modifiers"][0].pop("type")),
        mutated(lambda s: s["channels"][0]["samples"][1]["modifiers"][0]["data"].pop("hi")),
        mutated(lambda s: s["observations"][1].__setitem__("data", "many")),
        mutated(lambda s: s.pop("version")),
        mutated(lambda s: s["measurements"][0]["config"].__setitem__("poi", 3)),
        mutated(lambda s: s.__setitem__("extra", 1)),
    ]
    for spec in cases:
        ours = next(pyhf_schema("workspace.json").iter_errors(spec), None)
        theirs = _pyhf_first_error(spec, "workspace.json")
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert (ours.message, list(ours.absolute_path)) == (
                theirs.message,
                list(theirs.absolute_path),
            )
    assert cases[1] and next(pyhf_schema("workspace.json").iter_errors(cases[1]), None) is None
    for ops in ([{"op": "remove", "path": "/channels/0"}], [{"op": "add"}], {"op": "add"}):
        ours = next(pyhf_schema("jsonpatch.json").iter_errors(ops), None)
        assert (ours is None) == (_pyhf_first_error(ops, "jsonpatch.json") is None)
    loop = {"a.json": {"definitions": {"x": {"items": {"$ref": "#/definitions/x"}}}}}
    with pytest.raises(ValueError, match=r"a\.json#/definitions/x refers to itself"):
        _inline_refs({"$ref": "a.json#/definitions/x"}, "a.json", loop, ())


def test_validation_runs_once_per_content(tmp_path, monkeypatch):
    """The schema check of a workspace runs once per content in a process (seconds on a
    published likelihood): again for other content, and every time for an invalid one."""
    from analysis.likelihood import workspace as ws

    checks = []
    check = ws._check_semantics
    monkeypatch.setattr(ws, "_check_semantics", lambda *a: (checks.append(a[1]), check(*a)))
    monkeypatch.setattr(ws, "_VALIDATED", {})
    spec = small_spec()
    path = _write(tmp_path / "ws.json", spec)
    first = Workspace.load(path)
    assert Workspace.load(path) == first == Workspace.from_spec(copy.deepcopy(spec))
    assert checks == [str(path)]
    tensors = copy.deepcopy(spec)
    tensors["observations"][0]["data"] = torch.tensor(spec["observations"][0]["data"])
    Workspace.from_spec(tensors)  # the same numbers
    assert len(checks) == 1
    spec["observations"][0]["data"][0] += 1.0
    Workspace.from_spec(spec)
    assert len(checks) == 2
    del spec["version"]
    for name in ("a.json", "b.json"):
        with pytest.raises(ConfigError, match=rf"{name}: 'version' is a required property"):
            Workspace.from_spec(spec, source=name)


def test_unknown_modifier_type_lists_valid_types(tmp_path):
    spec = small_spec()
    spec["channels"][1]["samples"][0]["modifiers"][0]["type"] = "normsyst"
    with pytest.raises(ConfigError) as info:
        Workspace.load(_write(tmp_path / "ws.json", spec))
    message = str(info.value)
    assert (
        "ws.json: channels[1].samples[0].modifiers[0]: unknown modifier type 'normsyst'" in message
    )
    assert "histosys, lumi, normfactor, normsys, shapefactor, shapesys, staterror" in message
    model_spec = {"channels": spec["channels"], "parameters": []}
    with pytest.raises(ConfigError, match="unknown modifier type 'normsyst'; valid types"):
        Model(model_spec)


def test_file_errors(tmp_path):
    with pytest.raises(InputFileError, match="nothere.json: no such file"):
        Workspace.load(tmp_path / "nothere.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"channels": [')
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        Workspace.load(broken)


def test_semantic_errors():
    spec = small_spec()
    spec["channels"][0]["samples"][1]["data"] = [1.0, 2.0]
    with pytest.raises(
        ConfigError,
        match=r"channels\[0\]\.samples\[1\]\.data: 2 values but the "
        "channel has 3 bins",
    ):
        Workspace.from_spec(spec)
    spec = small_spec()
    spec["observations"] = spec["observations"][:1]
    with pytest.raises(ConfigError, match="no observation for channel 'CR'"):
        Workspace.from_spec(spec)
    spec = small_spec()
    spec["channels"][1]["samples"][1]["modifiers"].append(
        {"name": "bkg_unc", "type": "shapesys", "data": [1.0, 1.0]}
    )
    with pytest.raises(ConfigError, match="shapesys 'bkg_unc' is used on more than one sample"):
        Workspace.from_spec(spec).model()
    spec = small_spec()
    spec["measurements"][0]["config"]["parameters"] = []  # lumi needs its settings
    with pytest.raises(ConfigError, match="parameter 'lumi' needs inits, bounds, auxdata, sigmas"):
        Workspace.from_spec(spec).model()
    spec = small_spec()
    spec["measurements"][0]["config"]["parameters"].append({"name": "jes", "sigmas": [2.0]})
    with pytest.raises(ConfigError, match="sets 'sigmas' for parameter 'jes', which does not use"):
        Workspace.from_spec(spec).model()
    spec = small_spec()
    spec["measurements"][0]["config"]["parameters"].append({"name": "cr_shape", "inits": [1.0]})
    with pytest.raises(ConfigError, match="1 value\\(s\\) of 'inits' for parameter 'cr_shape'"):
        Workspace.from_spec(spec).model()
    spec = small_spec()
    spec["channels"][1]["samples"][1]["modifiers"].append(
        {"name": "jes", "type": "normfactor", "data": None}
    )
    with pytest.raises(ConfigError, match="parameter 'jes' is used by a histosys and a normfactor"):
        Workspace.from_spec(spec).model()


def test_poi_and_measurement_errors():
    spec = small_spec()
    workspace = Workspace.from_spec(spec)
    with pytest.raises(ConfigError, match="POI 'nope' is not a parameter of the model"):
        workspace.model(poi_name="nope")
    with pytest.raises(ConfigError, match="POI 'cr_shape' has 2 components"):
        workspace.model(poi_name="cr_shape")
    assert (
        workspace.model(poi_name="k_bkg").poi_index == workspace.model().par_slices["k_bkg"].start
    )
    model = workspace.model(poi_name="")
    assert model.poi_name is None and model.poi_index is None
    spec["measurements"][0]["config"]["poi"] = ""
    with pytest.raises(ConfigError, match="measurement 'meas' has no POI; pass poi_name"):
        Workspace.from_spec(spec).model()
    with pytest.raises(ConfigError, match="no measurement named 'other'; valid: meas"):
        workspace.model("other")
    assert workspace.measurement_names == ("meas",)
    with pytest.raises(
        ConfigError, match="'code2' is not available for histosys; valid: code0, code4p"
    ):
        workspace.model(modifier_settings={"histosys": {"interpcode": "code2"}})
    with pytest.raises(ConfigError, match="unknown modifier type 'normsy'"):
        workspace.model(modifier_settings={"normsy": {"interpcode": "code1"}})


def test_shape_errors():
    workspace = Workspace.from_spec(small_spec())
    model = workspace.model()
    data = workspace.data(model)
    with pytest.raises(ValueError, match=f"pars has 3 entries .* but {model.npars} were expected"):
        model.logpdf(torch.zeros(3, dtype=torch.float64), data)
    with pytest.raises(DataError, match=f"data has 4 entries .* but {model.nmain + model.naux}"):
        model.logpdf(model.suggested_init(), data[:4])


# ---------------------------------------------------------------------- batched sample yields
def _batched_yields_spec() -> dict:
    """small_spec with nothing on 'signal' and 'background' that pyhf derives from a nominal
    at build time except histosys (staterror and shapesys move to the 'other' sample)."""
    spec = small_spec()
    sr_sig, sr_bkg = spec["channels"][0]["samples"]
    cr_other = spec["channels"][1]["samples"][1]
    sr_sig["modifiers"] = [m for m in sr_sig["modifiers"] if m["type"] != "staterror"] + [
        {
            "name": "sig_shape",
            "type": "histosys",
            "data": {"hi_data": [4.5, 6.2, 2.4], "lo_data": [3.8, 5.5, 2.6]},
        },
        {"name": "sig_norm", "type": "normsys", "data": {"hi": 1.1, "lo": 0.85}},
    ]
    sr_bkg["modifiers"] = [m for m in sr_bkg["modifiers"] if m["type"] in ("normsys", "histosys")]
    cr_other["modifiers"] += [
        {"name": "staterror_CR", "type": "staterror", "data": [0.4, 0.3]},
        {"name": "other_unc", "type": "shapesys", "data": [1.0, 0.6]},
    ]
    return spec


def _with_yields(spec: dict, sample: str, row: np.ndarray) -> dict:
    """``spec`` with ``sample``'s data replaced by ``row`` (its bins in the model's channel
    order, i.e. sorted channel names) and its histosys templates moved with it (deltas kept)."""
    spec = copy.deepcopy(spec)
    offset = 0
    for channel in sorted(spec["channels"], key=lambda c: c["name"]):
        for entry in channel["samples"]:
            if entry["name"] != sample:
                continue
            old = np.asarray(entry["data"], dtype=float)
            new = row[offset : offset + old.size]
            offset += old.size
            for mod in entry["modifiers"]:
                if mod["type"] == "histosys":
                    hi, lo = (np.asarray(mod["data"][k]) for k in ("hi_data", "lo_data"))
                    mod["data"] = {
                        "hi_data": (new + hi - old).tolist(),
                        "lo_data": (new - old + lo).tolist(),
                    }
            entry["data"] = new.tolist()
    assert offset == row.size
    return spec


@pytest.mark.parametrize("settings", ["code1/code0", "code4/code4p"])
@pytest.mark.parametrize("sample", ["signal", "background"])
def test_with_sample_yields_equals_a_model_per_yields(sample, settings):
    spec = _batched_yields_spec()
    workspace = Workspace.from_spec(spec)
    model = workspace.model(modifier_settings=SETTINGS[settings])
    data = workspace.data(model)
    n_bins = {"signal": 3, "background": 5}[sample]  # background: CR (2 bins) then SR (3)
    rng = np.random.default_rng(11)
    yields = rng.uniform(0.5, 30.0, size=(4, n_bins))
    pars = torch.as_tensor(_points(model.suggested_bounds().numpy(), 4, seed=12))
    batched = model.with_sample_yields(sample, torch.as_tensor(yields))
    assert batched.npars == model.npars and batched.par_names == model.par_names
    datasets = data + torch.as_tensor(rng.uniform(0.0, 3.0, size=(4, data.shape[0])))
    got = {
        "logpdf": batched.logpdf(pars, data),
        "logpdf per dataset": batched.logpdf(pars, datasets),
        "expected_data": batched.expected_data(pars),
        "by_sample": batched.expected_by_sample(pars),
    }
    for b in range(4):
        single = Workspace.from_spec(_with_yields(spec, sample, yields[b])).model(
            modifier_settings=SETTINGS[settings]
        )
        want = {
            "logpdf": single.logpdf(pars[b], data),
            "logpdf per dataset": single.logpdf(pars[b], datasets[b]),
            "expected_data": single.expected_data(pars[b]),
            "by_sample": single.expected_by_sample(pars[b]),
        }
        for key, value in want.items():
            torch.testing.assert_close(
                got[key][b], value, rtol=1e-12, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}"
            )
    # the original model is untouched
    torch.testing.assert_close(
        model.logpdf(pars, data),
        workspace.model(modifier_settings=SETTINGS[settings]).logpdf(pars, data),
    )


def test_with_sample_yields_gradients_and_errors():
    workspace = Workspace.from_spec(_batched_yields_spec())
    model = workspace.model()
    data = workspace.data(model)
    pars = torch.as_tensor(_points(model.suggested_bounds().numpy(), 2, seed=13))
    yields = torch.tensor([[4.0, 6.0, 2.5], [1.0, 9.0, 0.7]], dtype=torch.float64)
    yields.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda y: model.with_sample_yields("signal", y).twice_nll(pars, data), (yields,)
    )
    with pytest.raises(ConfigError, match="sample 'nope' is not in the model"):
        model.with_sample_yields("nope", yields)
    with pytest.raises(ValueError, match=r"yields has shape \(3,\) but \(B, 3\) was expected"):
        model.with_sample_yields("signal", yields[0])
    with pytest.raises(ValueError, match="already batched over 2 yields"):
        model.with_sample_yields("signal", yields).with_sample_yields("signal", yields[:1])


@pytest.mark.parametrize("name", _xml_cases())
def test_xml_fits_like_pyhf(name):
    """The XML models fit as pyhf fits them (numpy backend, tight Minuit).

    From the suggested init our Minuit fit and pyhf's land in the same minimum. Our exact Newton
    fit is never above it, and pyhf started at our best fit stays there: in
    multichan_coupledhistosys the likelihood has two minima, and Newton finds the lower one
    (twice_nll 26.564) where both Minuit fits stop in the other (28.033).
    """
    import pyhf.readxml

    from analysis import fit as fitting

    xml = reference_path("pyhf_validation", "xml", name, "config", "example.xml")
    workspace = Workspace.load(xml)
    model = workspace.model()
    data = workspace.data(model)
    try:
        ref_ws = pyhf.Workspace(pyhf.readxml.parse(xml, xml.parent.parent))
    finally:
        pyhf.readxml.clear_filecache()
    ref = ref_ws.model()
    ref_data = ref_ws.data(ref)
    assert model.par_names == tuple(ref.config.par_names)
    newton = fitting.fit_model(model, data, method="newton")
    minuit = fitting.fit_model(model, data, method="minuit")
    pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-8, strategy=2))
    try:
        from_init, twice_nll_init = pyhf.infer.mle.fit(ref_data, ref, return_fitted_val=True)
        from_ours, twice_nll_ours = pyhf.infer.mle.fit(
            ref_data, ref, init_pars=newton.bestfit.tolist(), return_fitted_val=True
        )
    finally:
        pyhf.set_backend("numpy", "scipy")
    sigma = newton.uncertainty.numpy()
    # same start, same minimiser: the same minimum to MIGRAD's precision (EDM < 2e-5, i.e.
    # within 3.2e-3 standard deviations and 1e-5 in twice_nll)
    np.testing.assert_array_less(np.abs(minuit.bestfit.numpy() - from_init), 5e-3 * sigma + 1e-12)
    assert float(minuit.twice_nll) == pytest.approx(float(twice_nll_init), abs=2e-5)
    # the exact minimum: never above pyhf's, and pyhf's tight Minuit started there stays there
    assert float(newton.twice_nll) <= float(twice_nll_init) + 1e-8
    np.testing.assert_array_less(np.abs(newton.bestfit.numpy() - from_ours), 1e-5 * sigma + 1e-12)
    assert float(newton.twice_nll) == pytest.approx(float(twice_nll_ours), abs=1e-8)


def test_poisson_term_at_zero_count_has_plain_derivatives():
    """n = 0: the term is -lambda, with derivative -1 also at lambda = 0 (a signal-only bin
    fitted at mu = 0; xlogy's gradient there is NaN); values equal scipy's Poisson log-pmf."""
    import scipy.stats

    from analysis.likelihood.distributions import poisson_logpdf

    n = torch.tensor([0.0, 0.0, 3.0, 7.0], dtype=torch.float64)
    lam = torch.tensor([0.0, 2.5, 1.5, 7.0], dtype=torch.float64, requires_grad=True)
    value = poisson_logpdf(n, lam)
    expected = scipy.stats.poisson.logpmf(n.numpy(), lam.detach().numpy())
    np.testing.assert_allclose(value.detach().numpy(), expected, rtol=1e-14)
    (grad,) = torch.autograd.grad(value.sum(), lam)
    np.testing.assert_allclose(grad.numpy(), [-1.0, -1.0, 3.0 / 1.5 - 1.0, 0.0], rtol=1e-14)


# ---------------------------------------------------------------------- structure reuse
def _values(**changes) -> dict[str, torch.Tensor]:
    """gradient_inputs() numbers with ``changes``, as fresh leaves that require grad."""
    values = {k: v.detach().clone() for k, v in gradient_inputs().items()}
    values.update({k: torch.tensor(v, dtype=torch.float64) for k, v in changes.items()})
    return {k: v.requires_grad_(True) for k, v in values.items()}


# Numbers that differ from gradient_inputs() everywhere, and flip the number-dependent flags:
# staterror bin 2 without uncertainty (fixed), shapesys bin 1 without uncertainty (fixed), a
# normsys hi below 1; the measurement's settings of k_bkg and lumi change too.
OTHER_VALUES = {
    "signal": [3.0, 7.5, 1.5],
    "stat_sig": [0.6, 1.3, 0.0],
    "background": [18.0, 16.0, 0.7],
    "hi": 0.97,
    "lo": 0.88,
    "up": [19.0, 17.5, 0.9],
    "down": [17.5, 14.0, 0.5],
    "stat_bkg": [1.5, 1.7, 0.0],
    "shapesys": [2.5, 0.0, 0.3],
    "cr": [45.0, 44.0],
    "cr_up": [5.5, 3.6],
}


def _other_measurement(spec: dict) -> dict:
    parameters = spec["measurements"][0]["config"]["parameters"]
    parameters[0].update({"bounds": [[0.2, 4.0]], "inits": [0.9]})  # k_bkg
    parameters[1].update({"auxdata": [1.01], "sigmas": [0.035], "inits": [0.98]})  # lumi
    return spec


def _model_spec(spec: dict) -> dict:
    return {
        "channels": spec["channels"],
        "parameters": spec["measurements"][0]["config"]["parameters"],
    }


def _assert_same_model(
    got: Model, ref: Model, data: torch.Tensor, leaves: tuple, ref_leaves: tuple
) -> None:
    """Every output of ``got`` equals that of ``ref`` exactly, and so do the gradients of
    ``twice_nll`` with respect to the leaves each was built from."""
    from analysis.likelihood.derivatives import twice_nll_derivatives

    assert got.par_names == ref.par_names and got.poi_index == ref.poi_index
    for method in ("suggested_init", "suggested_bounds", "suggested_fixed", "prefit_uncertainties"):
        assert torch.equal(getattr(got, method)(), getattr(ref, method)()), method
    assert torch.equal(got.kinked_parameters(), ref.kinked_parameters())
    assert got.unconstrained_free_count() == ref.unconstrained_free_count()
    assert torch.equal(got.auxdata, ref.auxdata)
    generator = torch.Generator().manual_seed(3)
    init = ref.suggested_init()
    pars = init + 0.3 * torch.randn(5, ref.npars, generator=generator, dtype=torch.float64)
    pars = torch.cat([init[None], pars])
    assert torch.equal(got.expected_data(pars), ref.expected_data(pars))
    assert torch.equal(got.expected_by_sample(pars), ref.expected_by_sample(pars))
    assert torch.equal(got.twice_nll(pars, data), ref.twice_nll(pars, data))
    for a, b in zip(
        twice_nll_derivatives(got, pars, data), twice_nll_derivatives(ref, pars, data), strict=True
    ):
        assert torch.equal(a, b)
    grads = torch.autograd.grad(got.twice_nll(pars, data).sum(), leaves)
    ref_grads = torch.autograd.grad(ref.twice_nll(pars, data).sum(), ref_leaves)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("lumi", [True, False])
def test_with_spec_values_equals_a_fresh_build(settings, lumi):
    """A model made on another model's structure (every modifier type: normfactor, normsys,
    histosys, staterror, shapesys, shapefactor, lumi) equals the model built from scratch from
    the same spec: outputs, exact derivatives and gradients with respect to the spec's tensors;
    numbers that decide flags (fixed staterror and shapesys bins) are recomputed too."""

    def spec_of(values):
        spec = tensor_spec(values)
        if not lumi:
            spec["channels"][0]["samples"][0]["modifiers"].pop(2)
            spec["measurements"][0]["config"]["parameters"].pop(1)
        return spec

    first = Workspace.from_spec(spec_of(_values())).model(modifier_settings=SETTINGS[settings])
    before = first.expected_data(first.suggested_init()).detach().clone()
    for changes, measurement in (({}, False), (OTHER_VALUES, True)):
        leaves, ref_leaves = _values(**changes), _values(**changes)
        spec, ref_spec = spec_of(leaves), spec_of(ref_leaves)
        if measurement and lumi:
            spec, ref_spec = _other_measurement(spec), _other_measurement(ref_spec)
        reused = first.with_spec_values(_model_spec(spec))
        workspace = Workspace.from_spec(ref_spec)
        ref = workspace.model(modifier_settings=SETTINGS[settings])
        data = workspace.data(ref).detach()
        _assert_same_model(reused, ref, data, tuple(leaves.values()), tuple(ref_leaves.values()))
        # the structure is shared, not rebuilt
        assert reused._cell_slots is first._cell_slots and reused._block_slots is first._block_slots
    # the fixed flags did change with the numbers, and the first model is untouched
    assert not torch.equal(reused.suggested_fixed(), first.suggested_fixed())
    assert torch.equal(first.expected_data(first.suggested_init()), before)


def test_with_spec_values_keeps_graphs_apart_and_rejects_other_structures():
    first = Workspace.from_spec(tensor_spec(_values())).model()
    leaves = _values(**OTHER_VALUES)
    second = first.with_spec_values(_model_spec(tensor_spec(leaves)))
    third = second.with_spec_values(_model_spec(tensor_spec(_values())))  # chains too
    init = first.suggested_init()
    assert torch.equal(third.expected_data(init), first.expected_data(init))
    # gradients of the second model reach its own leaves only, every one of them
    data = Workspace.from_spec(small_spec()).data(first).detach()
    grads = torch.autograd.grad(
        second.twice_nll(init + 0.1, data), list(leaves.values()), allow_unused=True
    )
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)

    def changed(edit):
        spec = _model_spec(small_spec())
        edit(spec)
        return spec

    other_structures = [
        lambda s: s["channels"][0]["samples"][1]["modifiers"].pop(),  # a modifier less
        lambda s: s["channels"][1]["samples"][0]["modifiers"][1].update(name="other"),
        lambda s: s["channels"][1]["samples"][0]["modifiers"][2].update(type="shapefactor"),
        lambda s: s["channels"].reverse(),
    ]
    for edit in other_structures:
        with pytest.raises(ConfigError, match="build a new Model"):
            first.with_spec_values(changed(edit))
    bins = changed(lambda s: s["channels"][1]["samples"][1].update(data=[5.0, 3.0, 1.0]))
    with pytest.raises(ConfigError, match="has 2 bins"):
        first.with_spec_values(bins)
    template = changed(
        lambda s: s["channels"][1]["samples"][1]["modifiers"][0]["data"].update(hi_data=[6.0])
    )
    with pytest.raises(ConfigError, match="hi_data"):
        first.with_spec_values(template)
    batched = first.with_sample_yields("signal", torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="not batched"):
        batched.with_spec_values(_model_spec(small_spec()))
