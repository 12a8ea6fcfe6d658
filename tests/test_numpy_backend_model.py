"""The numpy HistFactory model (analysis.numpy_backend) against pyhf 0.7.6 and the torch model.

Three independent references, on seeded random workspaces and on every reference workspace:

- pyhf 0.7.6 (numpy backend, ``pyhf.Workspace(ws).model(modifier_settings=...)``): parameter
  names and order, suggested init/bounds/fixed, auxdata, ``expected_data`` and ``logpdf`` at the
  suggested init and at random points inside the bounds;
- the torch :class:`analysis.likelihood.Model` (itself tested against pyhf in
  test_likelihood.py): the same quantities, the kinked parameters, and the exact gradient and
  Hessian of ``twice_nll`` (:func:`analysis.likelihood.derivatives.twice_nll_derivatives`);
- central finite differences of the numpy model's own ``twice_nll`` for its gradient and
  Hessian, at points away from the kinks of the interpolation codes (alpha = 0, |alpha| = 1).

The random workspaces (:func:`random_workspace`) are valid pyhf workspaces unlike the demo:
1-4 channels of 1-6 bins, 1-4 samples each, every modifier type (a normsys and a histosys of one
name, modifiers shared across channels, a shapefactor shared by two channels of equal size,
staterror over several samples with a bin of zero uncertainty, which pyhf fixes, shapesys with
bins of zero nominal or zero uncertainty), measurement settings (fixed parameters, custom
inits and bounds), zero-yield sample bins and observations with zeros and non-integers. Every
main bin has a positive total yield (a bin with no prediction at all is not a likelihood).
Each is checked with pyhf's default interpolation (normsys code4, histosys code4p) and with
normsys code1 / histosys code0.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyhf
import pytest
import torch

from analysis.likelihood import Workspace
from analysis.likelihood.derivatives import twice_nll_derivatives
from analysis.numpy_backend.model import NumpyModel
from tests.conftest import REFERENCE, reference_path

#: random workspaces (seeds 0 .. N_WORKSPACES - 1)
N_WORKSPACES = 32
#: random points inside the bounds (besides the suggested init) where values are compared
N_POINTS = 3
SETTINGS: dict[str, dict | None] = {
    "default": None,  # pyhf's model default: normsys code4, histosys code4p
    "code1_code0": {"normsys": {"interpcode": "code1"}, "histosys": {"interpcode": "code0"}},
}
#: values against pyhf and the torch model: relative, absolute (whichever is larger)
RTOL, ATOL = 1e-12, 1e-10
#: exact derivatives against the torch model's, relative to the largest entry
DERIVATIVE_RTOL = 1e-10
#: finite differences of twice_nll: central, 2 points per parameter for the gradient, 4 per
#: pair for the Hessian; tolerances relative to max(1, largest entry). Rounding of values up to
#: ~1e3 (2e-16 relative) over the step and the truncation error (h^2 times third or fourth
#: derivatives) bound them; measured on these workspaces: gradient 2e-9, Hessian 1.3e-6,
#: Hessian from differences of the exact gradient 3.4e-10
FD_GRAD_STEP, FD_GRAD_RTOL = 1e-5, 1e-7
FD_HESS_STEP, FD_HESS_RTOL = 1e-4, 2e-5
FD_GRAD_HESS_STEP, FD_GRAD_HESS_RTOL = 1e-5, 1e-7

SAMPLE_NAMES = ("signal", "ttbar", "wjets", "multijet", "diboson", "zjets")
NORMSYS_POOL = ("jes", "xsec_tt", "pdf")
HISTOSYS_POOL = ("jes", "isr", "fsr")  # "jes" is also a normsys: one parameter, both modifiers
ALPHA_TYPES = {"normsys", "histosys"}
GAMMA_TYPES = {"staterror", "shapesys", "shapefactor"}


# ---------------------------------------------------------------------- the generator
def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in values]


def random_workspace(seed: int) -> dict:
    """A valid pyhf workspace drawn from ``seed`` (see the module docstring for what it holds).

    Features alternate with the seed's bits as well as by chance, so that every one of them
    appears many times among the first few dozen seeds (:func:`test_generator_covers_features`).
    """
    rng = np.random.default_rng(1000 + seed)
    n_channels = int(rng.integers(1, 5))
    nbins = [int(n) for n in rng.integers(1, 7, size=n_channels)]
    # a shapefactor shared by two channels needs the same bin count in both
    shared_sf = n_channels >= 2 and (seed % 2 == 0 or rng.random() < 0.5)
    if shared_sf:
        nbins[1] = nbins[0]
    use_lumi = seed % 3 != 1
    channels, observations = [], []
    for c in range(n_channels):
        name = f"region_{'abcd'[c]}"
        n = nbins[c]
        n_samples = int(rng.integers(1, 5))
        names = ["signal"] if c == 0 or rng.random() < 0.5 else []
        rest = [s for s in SAMPLE_NAMES if s != "signal"]
        names += list(rng.choice(rest, size=n_samples - len(names), replace=False))
        if not names:
            names = [str(rng.choice(rest))]
        nominals = []
        for _ in names:
            nominal = rng.uniform(0.5, 60.0, size=n) * rng.choice([0.1, 1.0, 5.0])
            nominal[rng.random(n) < 0.15] = 0.0  # zero-yield bins of a sample
            nominals.append(nominal)
        total = np.sum(nominals, axis=0)
        for b in np.flatnonzero(total == 0.0):  # every bin has a prediction
            nominals[-1][b] = rng.uniform(1.0, 10.0)
        # staterror on several samples (at least one), one bin possibly without uncertainty
        stat_samples = {i for i in range(len(names)) if rng.random() < 0.7} or {0}
        stat_zero_bin = int(rng.integers(n)) if (seed % 4 in (0, 3) and n > 1) else None
        samples = []
        for i, (sample, nominal) in enumerate(zip(names, nominals, strict=True)):
            modifiers: list[dict[str, Any]] = []
            if sample == "signal":
                modifiers.append({"name": "mu", "type": "normfactor", "data": None})
            if sample in ("ttbar", "wjets") and rng.random() < 0.6:
                modifiers.append({"name": f"k_{sample}", "type": "normfactor", "data": None})
            if use_lumi and rng.random() < 0.8:
                modifiers.append({"name": "lumi", "type": "lumi", "data": None})
            for sys in NORMSYS_POOL:
                if rng.random() < 0.4:
                    hi, lo = rng.uniform(1.02, 1.35), rng.uniform(0.7, 0.98)
                    if rng.random() < 0.2:  # both variations on one side
                        lo = rng.uniform(1.01, hi)
                    modifiers.append({"name": sys, "type": "normsys", "data": {"hi": hi, "lo": lo}})
            for sys in HISTOSYS_POOL:
                if rng.random() < 0.35 or (sys == "jes" and seed % 2 == 1 and i == 0):
                    up = nominal * (1.0 + rng.uniform(-0.2, 0.2, size=n))
                    down = nominal * (1.0 + rng.uniform(-0.2, 0.2, size=n))
                    zero = nominal == 0.0
                    up[zero] = rng.uniform(0.0, 0.5, size=int(zero.sum()))
                    down[zero] = 0.0
                    modifiers.append(
                        {
                            "name": sys,
                            "type": "histosys",
                            "data": {"hi_data": _rounded(up), "lo_data": _rounded(down)},
                        }
                    )
            if i in stat_samples:
                unc = np.sqrt(nominal) * rng.uniform(0.2, 1.0, size=n)
                if stat_zero_bin is not None:
                    unc[stat_zero_bin] = 0.0
                modifiers.append(
                    {"name": f"staterror_{name}", "type": "staterror", "data": _rounded(unc)}
                )
            if rng.random() < 0.3 or (seed % 5 == 2 and i == len(names) - 1):
                unc = nominal * rng.uniform(0.05, 0.3, size=n)
                unc[rng.random(n) < 0.2] = 0.0  # zero uncertainty: a fixed gamma in pyhf
                modifiers.append(
                    {"name": f"shape_{name}_{sample}", "type": "shapesys", "data": _rounded(unc)}
                )
            if shared_sf and c < 2 and i == len(names) - 1:
                modifiers.append({"name": "sf_shared", "type": "shapefactor", "data": None})
            elif rng.random() < 0.1:
                modifiers.append({"name": f"sf_{name}", "type": "shapefactor", "data": None})
            samples.append({"name": sample, "data": _rounded(nominal), "modifiers": modifiers})
        channels.append({"name": name, "samples": samples})
        total = np.sum([s["data"] for s in samples], axis=0)
        observed = total * rng.uniform(0.6, 1.4, size=n)
        kind = rng.random(n)
        observed = np.where(kind < 0.4, np.round(observed), np.round(observed, 3))
        observed[kind > 0.85] = 0.0
        observations.append({"name": name, "data": [float(v) for v in observed]})
    parameters = _measurement_parameters(channels, use_lumi, seed, rng)
    return {
        "channels": channels,
        "observations": observations,
        "measurements": [
            {"name": "meas", "config": {"poi": "mu", "parameters": parameters}},
        ],
        "version": "1.0.0",
    }


def _modifier_types(spec: Mapping[str, Any]) -> dict[str, set[str]]:
    """Parameter name -> the modifier types that use it."""
    types: dict[str, set[str]] = {}
    for channel in spec["channels"]:
        for sample in channel["samples"]:
            for modifier in sample["modifiers"]:
                types.setdefault(modifier["name"], set()).add(modifier["type"])
    return types


def _measurement_parameters(
    channels: list[dict], use_lumi: bool, seed: int, rng: np.random.Generator
) -> list[dict]:
    """Measurement settings of the parameters the channels use: lumi (required), a fixed
    parameter, custom inits and bounds of normfactors, normsys/histosys and staterror sets."""
    types = _modifier_types({"channels": channels})
    params: list[dict] = []
    if use_lumi and "lumi" in types:
        sigma = float(rng.choice([0.017, 0.03, 0.05]))
        init = 1.02 if seed % 6 == 0 else 1.0  # pyhf needs lumi's inits, auxdata and sigmas
        params.append(
            {
                "name": "lumi",
                "auxdata": [1.0],
                "sigmas": [sigma],
                "inits": [init],
                "bounds": [[0.7, 1.3]],
            }
        )
    mu = {"name": "mu", "bounds": [[0.0, float(rng.choice([5.0, 10.0, 20.0]))]]}
    if seed % 2 == 0:
        mu["inits"] = [float(rng.uniform(0.2, 2.0))]
    params.append(mu)
    alphas = sorted(n for n, t in types.items() if t & ALPHA_TYPES)
    for k, name in enumerate(alphas):
        if (k + seed) % 3 == 0:
            params.append({"name": name, "inits": [0.3], "bounds": [[-3.0, 3.0]]})
        elif (k + seed) % 4 == 1:
            params.append({"name": name, "fixed": True, "inits": [-0.4]})
    for name in sorted(n for n in types if n.startswith("k_")):
        if seed % 3 == 0:
            params.append({"name": name, "fixed": True, "inits": [1.3]})
        else:
            params.append({"name": name, "inits": [1.1], "bounds": [[0.1, 8.0]]})
    stat = sorted(n for n, t in types.items() if "staterror" in t)
    if stat and seed % 4 == 2:
        nbins = next(
            len(c["samples"][0]["data"]) for c in channels if f"staterror_{c['name']}" == stat[0]
        )
        params.append({"name": stat[0], "inits": [1.05] * nbins, "bounds": [[0.2, 3.0]] * nbins})
    if "sf_shared" in types and seed % 4 == 0:
        nbins = len(channels[0]["samples"][0]["data"])
        params.append({"name": "sf_shared", "bounds": [[0.0, 5.0]] * nbins})
    return params


# ---------------------------------------------------------------------- references
@dataclass(frozen=True)
class Reference:
    """pyhf's numbers for one workspace and modifier setting."""

    spec: dict
    settings: dict | None
    par_names: tuple[str, ...]
    par_slices: dict[str, tuple[int, int]]
    poi_index: int | None
    init: np.ndarray
    bounds: np.ndarray
    fixed: list[bool]
    auxdata: np.ndarray
    nmain: int
    data: np.ndarray  # observed main data then auxdata
    points: np.ndarray  # (1 + N_POINTS, P): the init, then random points inside the bounds
    expected: np.ndarray  # (1 + N_POINTS, nmain + naux)
    logpdf: np.ndarray  # (1 + N_POINTS,)
    kink_free: np.ndarray  # (2, P): points away from the interpolation kinks


def _random_points(
    spec: Mapping[str, Any],
    par_slices: Mapping[str, tuple[int, int]],
    init: np.ndarray,
    bounds: np.ndarray,
    rng: np.random.Generator,
    n: int,
    *,
    avoid_kinks: bool,
) -> np.ndarray:
    """``n`` points inside the bounds, each parameter within 2 of its init (alphas within
    [-2, 2], gammas and normfactors within [0.5, 2], lumi within 0.1 of 1). With
    ``avoid_kinks`` every alpha has 0.15 <= |alpha| <= 0.85 or 1.15 <= |alpha| <= 1.85."""
    types = _modifier_types(spec)
    low, high = bounds[:, 0].copy(), bounds[:, 1].copy()
    alpha = np.zeros(len(init), dtype=bool)
    for name, (start, stop) in par_slices.items():
        kinds = types.get(name, set())
        if kinds & ALPHA_TYPES:
            lo, hi = -2.0, 2.0
            alpha[start:stop] = True
        elif "lumi" in kinds:
            lo, hi = 0.9, 1.1
        else:  # normfactor, gammas
            lo, hi = 0.5, 2.0
        low[start:stop] = np.maximum(low[start:stop], lo)
        high[start:stop] = np.minimum(high[start:stop], hi)
    points = rng.uniform(low, high, size=(n, len(init)))
    if avoid_kinks:
        size = rng.uniform(0.15, 0.85, size=points.shape) + rng.integers(0, 2, size=points.shape)
        signed = size * rng.choice([-1.0, 1.0], size=points.shape)
        points = np.where(alpha, np.clip(signed, low, high), points)
        # bounds tighter than the kink-free bands (none here) would put a point on a kink
        a = np.abs(points[:, alpha])
        assert (np.minimum(np.abs(a - 1.0), a) >= 0.15 - 1e-12).all()
    return points


def pyhf_reference(spec: dict, settings: dict | None, seed: int) -> Reference:
    """pyhf's configuration and values for ``spec`` (numpy backend)."""
    pyhf.set_backend("numpy")
    workspace = pyhf.Workspace(spec)
    model = workspace.model(**({} if settings is None else {"modifier_settings": settings}))
    cfg = model.config
    data = np.asarray(workspace.data(model), dtype=float)
    init = np.asarray(cfg.suggested_init(), dtype=float)
    bounds = np.asarray(cfg.suggested_bounds(), dtype=float)
    slices = {k: (cfg.par_slice(k).start, cfg.par_slice(k).stop) for k in cfg.par_order}
    rng = np.random.default_rng(seed)
    points = np.vstack(
        [init, _random_points(spec, slices, init, bounds, rng, N_POINTS, avoid_kinks=False)]
    )
    kink_free = _random_points(spec, slices, init, bounds, rng, 2, avoid_kinks=True)
    return Reference(
        spec=spec,
        settings=settings,
        par_names=tuple(cfg.par_names),
        par_slices=slices,
        poi_index=cfg.poi_index,
        init=init,
        bounds=bounds,
        fixed=list(cfg.suggested_fixed()),
        auxdata=np.asarray(cfg.auxdata, dtype=float),
        nmain=cfg.nmaindata,
        data=data,
        points=points,
        expected=np.array([model.expected_data(p) for p in points]),
        logpdf=np.array([model.logpdf(p, data)[0] for p in points]),
        kink_free=kink_free,
    )


@functools.cache
def random_reference(seed: int, settings: str) -> Reference:
    return pyhf_reference(random_workspace(seed), SETTINGS[settings], seed)


def _reference_cases() -> list[str]:
    folder = REFERENCE / "pyhf_validation" / "reference_cases"
    names = sorted(p.stem for p in folder.glob("*.json"))
    return [*names, "cabinetry_example"] if names else ["(reference data absent)"]


def _case_settings(name: str) -> list[tuple[str, str]]:
    """(case, settings key) pairs: a pyhf validation case with its own ``modifier_settings``
    (pyhf's default where it has none), cabinetry's workspace with both of :data:`SETTINGS`."""
    return [(name, k) for k in SETTINGS] if name == "cabinetry_example" else [(name, "case")]


CASES = [pair for name in _reference_cases() for pair in _case_settings(name)]


@functools.cache
def case_reference(name: str, settings: str) -> Reference:
    if name.startswith("("):
        reference_path("pyhf_validation", "reference_cases")
    if name == "cabinetry_example":
        spec = json.loads(reference_path("cabinetry", "example_workspace.json").read_text())
        return pyhf_reference(spec, SETTINGS[settings], seed=5)
    case = json.loads(
        reference_path("pyhf_validation", "reference_cases", f"{name}.json").read_text()
    )
    case_settings = case.get("modifier_settings") if settings == "case" else SETTINGS[settings]
    return pyhf_reference(case["workspace"], case_settings, seed=6)


# ---------------------------------------------------------------------- the models
def torch_model(ref: Reference):
    return Workspace.from_spec(ref.spec).model(modifier_settings=ref.settings)


def numpy_model(ref: Reference) -> NumpyModel:
    """The numpy model of ``ref``'s workspace, built as the lead's API says."""
    workspace = Workspace.from_spec(ref.spec)
    poi = workspace.measurement()["config"]["poi"]
    return NumpyModel(
        workspace.model_spec(),
        poi_name=poi or None,
        modifier_settings=ref.settings,
        source="random workspace",
    )


def _np(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def assert_matches_pyhf(model: Any, ref: Reference, label: str) -> None:
    """Configuration and values of ``model`` (numpy or torch) against pyhf's."""
    assert tuple(model.par_names) == ref.par_names, label
    slices = {k: (s.start, s.stop) for k, s in model.par_slices.items()}
    assert slices == ref.par_slices, label
    assert (model.npars, model.nmain, model.naux) == (
        len(ref.par_names),
        ref.nmain,
        len(ref.auxdata),
    ), label
    assert model.poi_index == ref.poi_index, label
    np.testing.assert_array_equal(_np(model.suggested_init()), ref.init, err_msg=label)
    np.testing.assert_array_equal(_np(model.suggested_bounds()), ref.bounds, err_msg=label)
    assert _np(model.suggested_fixed()).tolist() == ref.fixed, label
    np.testing.assert_allclose(_np(model.auxdata), ref.auxdata, rtol=RTOL, atol=ATOL, err_msg=label)

    assert np.isfinite(ref.logpdf).all(), label  # NaN would compare equal to NaN below
    batched = _np(model.expected_data(ref.points))
    np.testing.assert_allclose(batched, ref.expected, rtol=RTOL, atol=ATOL, err_msg=label)
    logpdf = _np(model.logpdf(ref.points, ref.data))
    assert logpdf.shape == (len(ref.points),), label
    np.testing.assert_allclose(logpdf, ref.logpdf, rtol=RTOL, atol=ATOL, err_msg=label)
    for point, expected, value in zip(
        ref.points, ref.expected, ref.logpdf, strict=True
    ):  # unbatched
        one = _np(model.expected_data(point))
        np.testing.assert_allclose(one, expected, rtol=RTOL, atol=ATOL, err_msg=label)
        main = _np(model.expected_actualdata(point))
        np.testing.assert_allclose(main, expected[: ref.nmain], rtol=RTOL, atol=ATOL)
        no_aux = _np(model.expected_data(point, include_auxdata=False))
        np.testing.assert_allclose(no_aux, expected[: ref.nmain], rtol=RTOL, atol=ATOL)
        one = float(_np(model.logpdf(point, ref.data)))
        np.testing.assert_allclose(one, value, rtol=RTOL, atol=ATOL, err_msg=label)
        twice = float(_np(model.twice_nll(point, ref.data)))
        np.testing.assert_allclose(twice, -2.0 * value, rtol=RTOL, atol=ATOL, err_msg=label)
    # a batch of data sets with a batch of points: row by row
    data = np.stack([ref.data, np.concatenate([ref.expected[-1][: ref.nmain], ref.auxdata])])
    rows = _np(model.logpdf(ref.points[:2], data))
    single = [float(_np(model.logpdf(p, d))) for p, d in zip(ref.points[:2], data, strict=True)]
    np.testing.assert_allclose(rows, single, rtol=1e-14, atol=1e-12, err_msg=label)


def expected_kinked(ref: Reference) -> np.ndarray:
    """``(P,)`` bool: parameters of normsys code1 or histosys code0 modifiers (a kink at 0).
    With modifier settings given, a type missing from them takes its own default (normsys
    code1, histosys code0), as in pyhf; without, normsys code4 and histosys code4p."""
    settings = ref.settings
    if settings is None:
        codes = {"normsys": "code4", "histosys": "code4p"}
    else:
        codes = {
            "normsys": settings.get("normsys", {}).get("interpcode", "code1"),
            "histosys": settings.get("histosys", {}).get("interpcode", "code0"),
        }
    kinked_codes = {("normsys", "code1"), ("histosys", "code0")}
    mask = np.zeros(len(ref.par_names), dtype=bool)
    for name, kinds in _modifier_types(ref.spec).items():
        if any((kind, codes.get(kind)) in kinked_codes for kind in kinds):
            start, stop = ref.par_slices[name]
            mask[start:stop] = True
    return mask


def assert_numpy_matches_torch(model: NumpyModel, ref: Reference, label: str) -> None:
    """The numpy model against the torch model: values, kinked parameters, derivatives."""
    reference = torch_model(ref)
    assert tuple(model.par_names) == tuple(reference.par_names), label
    assert model.channels == tuple(reference.channels), label
    assert model.poi_name == reference.poi_name, label
    # kinked parameters are the free ones of histosys code0 / normsys code1 sets
    free = ~_np(model.suggested_fixed())
    kinked = _np(model.kinked_parameters())
    np.testing.assert_array_equal(kinked, _np(reference.kinked_parameters()), err_msg=label)
    np.testing.assert_array_equal(kinked, expected_kinked(ref) & free, err_msg=label)
    points = torch.as_tensor(ref.points)
    np.testing.assert_allclose(
        _np(model.expected_data(ref.points)),
        _np(reference.expected_data(points)),
        rtol=RTOL,
        atol=ATOL,
        err_msg=label,
    )
    np.testing.assert_allclose(
        _np(model.logpdf(ref.points, ref.data)),
        _np(reference.logpdf(points, torch.as_tensor(ref.data))),
        rtol=RTOL,
        atol=ATOL,
        err_msg=label,
    )
    pars = np.vstack([ref.points, ref.kink_free])
    value, grad, hess = (_np(v) for v in model.twice_nll_derivatives(pars, ref.data))
    t_value, t_grad, t_hess = (
        _np(v)
        for v in twice_nll_derivatives(reference, torch.as_tensor(pars), torch.as_tensor(ref.data))
    )
    assert grad.shape == (len(pars), model.npars) and hess.shape == (
        len(pars),
        model.npars,
        model.npars,
    ), label
    np.testing.assert_allclose(value, t_value, rtol=RTOL, atol=ATOL, err_msg=label)
    np.testing.assert_allclose(value, _np(model.twice_nll(pars, ref.data)), rtol=1e-14, atol=0)
    for row in range(len(pars)):
        _assert_relative_to_largest(grad[row], t_grad[row], DERIVATIVE_RTOL, f"{label} grad {row}")
        _assert_relative_to_largest(hess[row], t_hess[row], DERIVATIVE_RTOL, f"{label} hess {row}")
    # unbatched call: the same numbers
    v1, g1, h1 = (_np(v) for v in model.twice_nll_derivatives(pars[0], ref.data))
    assert g1.shape == (model.npars,) and h1.shape == (model.npars, model.npars), label
    np.testing.assert_allclose(g1, grad[0], rtol=1e-14, atol=1e-14 * np.abs(grad[0]).max())
    np.testing.assert_allclose(h1, hess[0], rtol=1e-14, atol=1e-14 * np.abs(hess[0]).max())


def _assert_relative_to_largest(actual: np.ndarray, desired: np.ndarray, rtol: float, label: str):
    scale = max(float(np.abs(desired).max(initial=0.0)), 1e-300)
    error = float(np.abs(actual - desired).max(initial=0.0))
    assert error <= rtol * scale, f"{label}: max |difference| {error:.3e}, largest {scale:.3e}"


def assert_finite_differences(model: NumpyModel, ref: Reference, label: str) -> None:
    """Gradient and Hessian at the kink-free points against central finite differences of
    ``model.twice_nll`` (batched: every shifted point in one call)."""
    n = model.npars
    eye = np.eye(n)
    for row, x in enumerate(ref.kink_free):
        value, grad, hess = (_np(v) for v in model.twice_nll_derivatives(x, ref.data))

        def f(points: np.ndarray) -> np.ndarray:
            return _np(model.twice_nll(points, ref.data))

        h = FD_GRAD_STEP
        fd_grad = (f(x + h * eye) - f(x - h * eye)) / (2 * h)
        scale = max(1.0, float(np.abs(grad).max()))
        error = float(np.abs(fd_grad - grad).max())
        assert error <= FD_GRAD_RTOL * scale, f"{label} point {row}: gradient vs FD {error:.3e}"

        h = FD_HESS_STEP
        i, j = np.triu_indices(n)
        shifts = [(+1, +1), (+1, -1), (-1, +1), (-1, -1)]
        values = [f(x + h * (si * eye[i] + sj * eye[j])) for si, sj in shifts]
        fd = (values[0] - values[1] - values[2] + values[3]) / (4 * h * h)
        fd_hess = np.zeros((n, n))
        fd_hess[i, j] = fd
        fd_hess[j, i] = fd
        scale = max(1.0, float(np.abs(hess).max()))
        error = float(np.abs(fd_hess - hess).max())
        assert error <= FD_HESS_RTOL * scale, f"{label} point {row}: Hessian vs FD {error:.3e}"

        h = FD_GRAD_HESS_STEP
        plus = _np(model.twice_nll_derivatives(x + h * eye, ref.data)[1])
        minus = _np(model.twice_nll_derivatives(x - h * eye, ref.data)[1])
        columns = (plus - minus) / (2 * h)  # row k: d grad / d x_k
        error = float(np.abs(columns - hess).max())
        assert error <= FD_GRAD_HESS_RTOL * scale, (
            f"{label} point {row}: Hessian vs FD of the gradient {error:.3e}"
        )


# ---------------------------------------------------------------------- tests
def test_generator_covers_features():
    """Every feature the brief asks for occurs in many of the random workspaces, and pyhf
    accepts each of them (its schema and its model build)."""
    counts: dict[str, int] = {}

    def count(feature: str, present: bool) -> None:
        counts[feature] = counts.get(feature, 0) + int(present)

    for seed in range(N_WORKSPACES):
        spec = random_workspace(seed)
        pyhf.Workspace(spec).model()
        channels = spec["channels"]
        types = _modifier_types(spec)
        mods = [(c["name"], s, m) for c in channels for s in c["samples"] for m in s["modifiers"]]
        params = {p["name"]: p for p in spec["measurements"][0]["config"]["parameters"]}
        count("several channels", len(channels) > 1)
        count("four channels", len(channels) == 4)
        count("one-bin channel", any(len(c["samples"][0]["data"]) == 1 for c in channels))
        count("six-bin channel", any(len(c["samples"][0]["data"]) == 6 for c in channels))
        count("four samples", any(len(c["samples"]) == 4 for c in channels))
        for kind in ("normfactor", "lumi", "normsys", "histosys", "staterror", "shapesys"):
            count(kind, any(m["type"] == kind for _, _, m in mods))
        count("normsys+histosys one name", any(t >= ALPHA_TYPES for t in types.values()))
        count(
            "shared across channels",
            any(
                len({c for c, _, m in mods if m["name"] == name and m["type"] != "staterror"}) > 1
                for name in types
            ),
        )
        count(
            "shapefactor over channels",
            len({c for c, _, m in mods if m["name"] == "sf_shared"}) == 2,
        )
        count(
            "staterror on several samples",
            any(
                sum(any(m["type"] == "staterror" for m in s["modifiers"]) for s in c["samples"]) > 1
                for c in channels
            ),
        )
        count(
            "staterror bin without uncertainty",
            any(
                m["type"] == "staterror" and 0.0 in m["data"] and len(m["data"]) > 1
                for _, _, m in mods
            ),
        )
        count(
            "shapesys zero nominal",
            any(m["type"] == "shapesys" and 0.0 in s["data"] for _, s, m in mods),
        )
        count(
            "shapesys zero uncertainty",
            any(m["type"] == "shapesys" and 0.0 in m["data"] for _, _, m in mods),
        )
        count("fixed parameter", any(p.get("fixed") for p in params.values()))
        count("custom inits", any("inits" in p for p in params.values()))
        count("custom bounds", any("bounds" in p for p in params.values()))
        count("custom staterror settings", any(n.startswith("staterror") for n in params))
        count(
            "zero-yield sample bin", any(0.0 in s["data"] for c in channels for s in c["samples"])
        )
        observed = np.concatenate([o["data"] for o in spec["observations"]])
        count("zero observation", bool((observed == 0).any()))
        count("non-integer observation", bool((observed != np.round(observed)).any()))
    missing = {k: v for k, v in counts.items() if v < 3}
    assert not missing, f"features in fewer than 3 workspaces: {missing} (all: {counts})"


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("seed", range(N_WORKSPACES))
def test_torch_model_matches_pyhf_on_random_workspace(seed, settings):
    """The generator's workspaces through the torch model: the references agree, so a
    disagreement of the numpy model below is its own."""
    ref = random_reference(seed, settings)
    assert_matches_pyhf(torch_model(ref), ref, f"torch, seed {seed}, {settings}")


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("seed", range(N_WORKSPACES))
def test_numpy_model_on_random_workspace(seed, settings):
    ref = random_reference(seed, settings)
    label = f"numpy, seed {seed}, {settings}"
    model = numpy_model(ref)
    assert_matches_pyhf(model, ref, label)
    assert_numpy_matches_torch(model, ref, label)
    assert_finite_differences(model, ref, label)


@pytest.mark.parametrize(("name", "settings"), CASES)
def test_numpy_model_on_reference_workspace(name, settings):
    ref = case_reference(name, settings)
    label = f"numpy, {name}, {settings}"
    assert_matches_pyhf(torch_model(ref), ref, label.replace("numpy", "torch"))
    model = numpy_model(ref)
    assert_matches_pyhf(model, ref, label)
    assert_numpy_matches_torch(model, ref, label)
    assert_finite_differences(model, ref, label)
