"""Every workspace under ``../shared/reference`` through the six statistics commands.

``diffana fit`` (and ``fit --method minuit``), ``hypotest``, ``significance``, ``limit``, ``scan``
and ``ranking`` run on each workspace (exit code 0, JSON written with ``-o``) and every number
they write is checked against pyhf 0.7.6 on the same input: numpy backend, MINUIT with
tolerance 1e-6 (EDM < 2e-9 in twice the NLL), the backend restored afterwards. The workspaces:

- the 9 pyhf validation cases (``pyhf_validation/reference_cases``): their ``workspace`` member,
  written to a temporary file for the CLI, which reads workspaces with pyhf's default
  interpolation (normsys code4, histosys code4p), as ``pyhf.Workspace.model()`` does; their
  stored CLs, made with normsys code1 / histosys code0, are checked in test_inference.py;
- pyhf's documented 2-bin example, cabinetry's example workspace;
- the three HistFactory XML folders (``pyhf_validation/xml``), read directly by diffana and by
  ``pyhf.readxml`` for the reference;
- a small workspace built here with the POI on its bound (background-only data and a bin that
  holds only signal, ``_signal_only_bin`` of test_inference.py; expected Z = 11.2);
- the published ATLAS likelihood ANA-SUSY-2018-16 (219 parameters; marked slow), read as
  ``..._with_signal.json`` by fit, limit and ranking and as its background-only part plus
  ``..._signal_patch.json`` (``--patch``) by hypotest, significance and scan.

Reference minima (:meth:`Reference.minimum`): pyhf fits with the given parameters fixed, started
from pyhf's suggested init and from our own (in-process, :mod:`analysis.inference`) minimum of
the same problem; the lower of the two pyhf minima is the reference. Our point only seeds
pyhf's MINUIT: the value is pyhf's minimum of pyhf's logpdf, so where pyhf's own start stops in
a higher local minimum (the coupled-histosys workspaces have two, see
:func:`test_reference_calculator_reproduces_pyhf_hypotest`) the reference is the lower one. On
the ATLAS likelihood pyhf's fits are too slow for the suite (``pyhf fit`` 17 s, ``pyhf cls``
79 s): there the reference minimum is our in-process point, evaluated with pyhf's logpdf, after
checking with finite differences of pyhf's logpdf that it is a stationary point of pyhf's
likelihood on the free parameters (see :data:`GRAD_TOL`).

From those minima the asymptotic quantities follow pyhf's ``AsymptoticCalculator`` (Cowan,
Cranmer, Gross, Vitells, arXiv:1007.1727), written out in :func:`asymptotic_cls`; that this
reproduces ``pyhf.infer.hypotest`` is :func:`test_reference_calculator_reproduces_pyhf_hypotest`.
The free fit to an Asimov dataset is not run: the Asimov data are the model's expectation
(auxiliary data included) at the parameters that made them, where every Poisson and constraint
term is at its maximum, so those parameters are its exact minimum (pyhf's MINUIT needs 10^5
calls to find it on cabinetry's example when the POI sits on its bound there).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import pathlib
from dataclasses import dataclass, field

import numpy as np
import pyhf
import pyhf.readxml
import pytest
import scipy.stats
import torch
from click.testing import CliRunner

from analysis import inference
from analysis.cli import main
from analysis.likelihood import Workspace
from tests.conftest import REFERENCE
from tests.test_inference import _signal_only_bin

SUSY = "ANA-SUSY-2018-16"
#: significance level of the CLs limits (diffana limit's default --cl 0.95)
ALPHA = 0.05
#: pyhf's order of the expected band: test statistic at -mu_hat/sigma = +2 ... -2
BAND_NSIGMA = (2.0, 1.0, 0.0, -1.0, -2.0)
#: ``diffana fit --method minuit`` is MIGRAD with cabinetry's tolerance (EDM < 2e-5 in twice the
#: NLL): within sqrt(EDM / 2) = 3.2e-3 standard deviations of the minimum, 1e-5 above it in
#: twice the NLL. ``diffana fit`` (Newton, the default) is checked at 1e-3 standard deviations.
MIGRAD_SIGMAS = 5e-3
#: twice NLL of ``diffana fit`` against the reference minimum, relative (1e-5 absolute from
#: MIGRAD's EDM is below this for every workspace here, whose minima are 11 to 600)
FIT_TWICE_NLL_RTOL = 1e-6
#: HESSE against HESSE: both are MINUIT's finite-difference second derivatives in its internal
#: (limit-transformed) coordinates, at points MIGRAD's tolerance apart, ours with the analytic
#: gradient handed to MINUIT. Measured: 1e-4 away from bounds, up to 1.4e-3 where a POI 0.5 to
#: 1.8 errors from its bound moves every correlated error through the limit transformation
#: (cabinetry's Signal_norm). Against the exact curvature pyhf's HESSE is off by up to 3.6%
#: (1bin_shapesys, mu 0.5 errors from its bound).
HESSE_RTOL = 2e-3
#: exact-Hessian errors against the curvature of pyhf's twice NLL by central finite differences
#: (step 1e-4 of each parameter's scale: truncation ~1e-8, rounding ~1e-9 relative). Measured:
#: 9e-6 at most (the reference minimum is pyhf's MINUIT point, not exactly ours).
EXACT_ERROR_RTOL = 1e-4
#: stationarity of our points on pyhf's likelihood where pyhf's fits are not run: the largest
#: finite-difference derivative of pyhf's twice NLL along a free parameter that is not on a
#: bound. On the ATLAS likelihood the smallest eigenvalue of the Hessian of twice the NLL is
#: 0.59, so |g|_inf <= 1e-4 over its 219 parameters puts the point within
#: |g|^2 / (2 * 0.59) <= 2e-6 of the local minimum in twice the NLL (measured: |g| ~ 2e-6,
#: the finite differences' own noise)
GRAD_TOL = 1e-4
#: limits: pyhf's CLs must cross ALPHA within this relative distance of our limit
LIMIT_RTOL = 1e-5


# ----------------------------------------------------------------------------- the workspaces
@dataclass(frozen=True)
class Case:
    """One reference workspace: how to read it (``kind``) and what the CLI reads."""

    name: str
    kind: str  # "case" (validation case wrapper), "json", "xml", "bound", "susy"
    path: pathlib.Path | None = None


def _cases() -> list:
    folder = REFERENCE / "pyhf_validation"
    cases = [Case(p.stem, "case", p) for p in sorted((folder / "reference_cases").glob("*.json"))]
    cases += [
        Case(p.stem, "json", p)
        for p in (
            folder / "2-bin_1-channel.json",
            REFERENCE / "cabinetry" / "example_workspace.json",
        )
        if p.exists()
    ]
    cases += [Case(p.parts[-3], "xml", p) for p in sorted(folder.glob("xml/*/config/example.xml"))]
    params = [pytest.param(c, id=c.name) for c in cases]
    params.append(pytest.param(Case("signal_only_bin", "bound"), id="signal_only_bin"))
    susy = REFERENCE / "published" / f"{SUSY}_with_signal.json"
    if susy.exists():
        params.append(pytest.param(Case(SUSY, "susy", susy), id=SUSY, marks=pytest.mark.slow))
    if not cases:
        params.append(
            pytest.param(
                None,
                id="no-reference",
                marks=pytest.mark.skip(reason=f"reference data not found at {REFERENCE}"),
            )
        )
    return params


CASES = _cases()


# ----------------------------------------------------------------------------- pyhf and the CLI
@contextlib.contextmanager
def tight_minuit():
    backend = pyhf.get_backend()
    pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-6))
    try:
        yield
    finally:
        pyhf.set_backend(*backend)


def _strict_json(text: str) -> object:
    """JSON without NaN or Infinity (``files.json_text`` writes strict JSON)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-finite number {constant} in the output")

    return json.loads(text, parse_constant=refuse)


def cli(folder: pathlib.Path, command: str, inputs: list[str], *args: object) -> dict:
    """``diffana COMMAND INPUT... ARGS --device cpu -o FILE``: exit code 0, the JSON written."""
    target = folder / f"{command}.json"
    target.unlink(missing_ok=True)
    result = CliRunner().invoke(
        main, [command, *inputs, *map(str, args), "--device", "cpu", "-o", str(target)]
    )
    assert result.exit_code == 0, (command, result.exit_code, result.stderr, result.exception)
    return _strict_json(target.read_text())


def asymptotic_cls(q: float, q_asimov: float, test_stat: str) -> tuple[float, list[float]]:
    """pyhf's AsymptoticCalculator from the test statistic on the data and on the Asimov data:
    (CLs, expected CLs band), or for q0 the discovery p-values (CLs+b).

    In -mu_hat/sigma space (arXiv:1007.1727 sec. 3.7; eq. 65-66 for q~):
    ``t = sqrt(q) - sqrt(q_A)``, for q~ ``(q - q_A) / (2 sqrt(q_A))`` where ``sqrt(q) > sqrt(q_A)``;
    ``CLs+b = Phi(-(t + sqrt(q_A)))``, ``CLb = Phi(-t)``; the band at ``t = 2, 1, 0, -1, -2``.
    """
    sq, sqa = math.sqrt(q), math.sqrt(q_asimov)
    t = (q - q_asimov) / (2 * sqa) if test_stat == "qtilde" and sq > sqa else sq - sqa
    phi = scipy.stats.norm.cdf
    clsb, clb = phi(-(t + sqa)), phi(-t)
    clsb_exp = [phi(-(n + sqa)) for n in BAND_NSIGMA]
    if test_stat == "q0":
        return float(clsb), [float(p) for p in clsb_exp]
    return float(clsb / clb), [
        float(p / phi(-n)) for p, n in zip(clsb_exp, BAND_NSIGMA, strict=True)
    ]


def _statistic(nll_fixed: float, nll_free: float, mu_hat: float, mu: float, test_stat: str):
    """pyhf's q_mu, q~_mu (mu_hat bounded at 0 by the model) or q0 from the two minima."""
    t = max(nll_fixed - nll_free, 0.0)
    if test_stat == "q0":
        return 0.0 if mu_hat < 0 else t
    return 0.0 if mu_hat > mu else t


@dataclass
class Minimum:
    pars: np.ndarray
    twice_nll: float  # -2 pyhf logpdf at pars
    pyhf_default: float | None = None  # pyhf's fit from its own start (None: not run)
    hesse: np.ndarray | None = None  # pyhf's HESSE errors at pars (free fit to the data)


@dataclass
class Reference:
    """One workspace as pyhf sees it, our model of it, and the CLI's inputs."""

    case: Case
    folder: pathlib.Path
    spec: dict
    cli_input: list[str]
    alt_input: list[str] | None = None  # the same workspace given another way (a patch)
    pyhf_fits: bool = True
    _minima: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        workspace = pyhf.Workspace(self.spec)
        self.pmodel = workspace.model()
        self.data = np.asarray(workspace.data(self.pmodel), dtype=float)
        config = self.pmodel.config
        self.names = list(config.par_names)
        self.poi = config.poi_index
        self.init = np.asarray(config.suggested_init(), dtype=float)
        self.bounds = np.asarray(config.suggested_bounds(), dtype=float)
        self.fixed = np.asarray(config.suggested_fixed(), dtype=bool)
        ours = Workspace.load(self.cli_input[0], patches=self.cli_input[2::2])
        self.model = ours.model()
        # same parameters and data layout as pyhf: our points can seed pyhf's fits as they are
        assert list(self.model.par_names) == self.names
        np.testing.assert_allclose(ours.data(self.model).numpy(), self.data, rtol=1e-12)

    def twice_nll(self, pars: np.ndarray, data: np.ndarray | None = None) -> float:
        data = self.data if data is None else data
        return float(-2 * self.pmodel.logpdf(np.asarray(pars, dtype=float), data)[0])

    def asimov(self, mu: float) -> tuple[np.ndarray, np.ndarray]:
        """pyhf's Asimov dataset: expected data (auxdata included) at the fit with POI = mu."""
        pars = self.minimum("data", {self.poi: mu}).pars
        return np.asarray(self.pmodel.expected_data(pars), dtype=float), pars

    def _data(self, key: str) -> np.ndarray:
        return self.data if key == "data" else self.asimov(float(key.removeprefix("asimov")))[0]

    def _ours(self, data: np.ndarray, fixed: dict[int, float]) -> np.ndarray:
        start = torch.as_tensor(self.init, dtype=torch.float64).clone()
        mask = torch.as_tensor(self.fixed).clone()
        for i, value in fixed.items():
            start[i], mask[i] = value, True
        with torch.no_grad():
            x, _ = inference.minimize(
                self.model,
                torch.as_tensor(data, dtype=torch.float64),
                start,
                bounds=self.model.suggested_bounds(),
                fixed=mask,
            )
        return x.numpy()

    def minimum(self, key: str, fixed: dict[int, float], *, hesse: bool = False) -> Minimum:
        """The reference minimum of twice pyhf's NLL on the data (``key="data"``) or on the
        Asimov data of POI = m (``"asimov{m}"``) with the parameters in ``fixed`` fixed."""
        cache_key = (key, tuple(sorted(fixed.items())), hesse)
        if cache_key in self._minima:
            return self._minima[cache_key]
        data = self._data(key)
        ours = self._ours(data, fixed)
        if not self.pyhf_fits:
            self.assert_stationary(ours, data, fixed)
            result = Minimum(ours, self.twice_nll(ours, data))
        else:
            mask = self.fixed.copy()
            default = self.init.copy()
            for i, value in fixed.items():
                default[i], mask[i] = value, True
            found = []
            with tight_minuit():
                for start in (default, ours):
                    out = pyhf.infer.mle.fit(
                        data,
                        self.pmodel,
                        init_pars=start.tolist(),
                        par_bounds=self.bounds.tolist(),
                        fixed_params=mask.tolist(),
                        return_fitted_val=True,
                        return_uncertainties=hesse,
                    )
                    pars = np.asarray(out[0], dtype=float)
                    found.append((self.twice_nll(pars[:, 0] if hesse else pars, data), pars))
            (nll, pars), (default_nll, default_pars) = min(found, key=lambda f: f[0]), found[0]
            # HESSE from pyhf's own run (from its suggested init) unless that stopped in another
            # minimum: HESSE depends on MIGRAD's history (from our start, already at the
            # minimum, pyhf's HESSE gives cabinetry's Luminosity 0.979; from its own 0.991;
            # exact 0.998)
            same = default_nll - nll <= 1e-6 * max(1.0, abs(nll))
            result = Minimum(
                pars[:, 0] if hesse else pars,
                nll,
                pyhf_default=default_nll,
                hesse=(default_pars if same else pars)[:, 1] if hesse else None,
            )
        self._minima[cache_key] = result
        return result

    def _free(self, fixed: dict[int, float]) -> np.ndarray:
        mask = self.fixed.copy()
        mask[list(fixed)] = True
        return np.nonzero(~mask)[0]

    def _on_bound(self, x: np.ndarray) -> np.ndarray:
        scale = 1e-9 * np.maximum(1.0, np.abs(self.bounds))
        return (x - self.bounds[:, 0] <= scale[:, 0]) | (self.bounds[:, 1] - x <= scale[:, 1])

    def assert_stationary(self, x: np.ndarray, data: np.ndarray, fixed: dict[int, float]):
        """Finite differences of pyhf's twice NLL at ``x``: ~0 along every free parameter not
        on a bound, not negative into the domain for one on a bound (second-order one-sided)."""
        f0 = self.twice_nll(x, data)
        on_bound = self._on_bound(x)
        worst = (0.0, None)
        for i in self._free(fixed):
            h = 1e-5 * max(1.0, abs(x[i]))

            def f(step: float, i=i) -> float:
                shifted = x.copy()
                shifted[i] += step
                return self.twice_nll(shifted, data)

            if on_bound[i]:
                inward = 1.0 if x[i] - self.bounds[i, 0] < self.bounds[i, 1] - x[i] else -1.0
                slope = (-3 * f0 + 4 * f(inward * h) - f(2 * inward * h)) / (2 * h)
                assert slope > -GRAD_TOL, (self.names[i], "on its bound, pulled inside", slope)
                continue
            g = (f(h) - f(-h)) / (2 * h)
            if abs(g) > abs(worst[0]):
                worst = (g, self.names[i])
        assert abs(worst[0]) <= GRAD_TOL, ("not a stationary point of pyhf's NLL", worst)

    def exact_errors(self, x: np.ndarray, held: np.ndarray) -> dict[int, float]:
        """sqrt(diag(2 H^-1)) of pyhf's twice NLL at ``x`` (finite differences), over the free
        parameters less those ``held`` (on a bound)."""
        free = [i for i in self._free({}) if not held[i]]
        steps = {i: 1e-4 * max(1.0, abs(x[i])) for i in free}

        def f(shifts: dict[int, float]) -> float:
            y = x.copy()
            for i, s in shifts.items():
                y[i] += s
            return self.twice_nll(y)

        n = len(free)
        hessian = np.zeros((n, n))
        for a, i in enumerate(free):
            for b, j in enumerate(free[: a + 1]):
                hi, hj = steps[i], steps[j]
                if i == j:
                    value = (f({i: hi}) - 2 * f({}) + f({i: -hi})) / hi**2
                else:
                    value = (
                        f({i: hi, j: hj}) - f({i: hi, j: -hj}) - f({i: -hi, j: hj})
                        + f({i: -hi, j: -hj})
                    ) / (4 * hi * hj)  # fmt: skip
                hessian[a, b] = hessian[b, a] = value
        errors = np.sqrt(np.diag(2 * np.linalg.inv(hessian)))
        return dict(zip(free, errors, strict=True))

    # ------------------------------------------------------------------ asymptotics
    def test_statistics(self, mu: float, test_stat: str, observed: bool = True):
        """(q, q_A) at ``mu`` (``q`` None unless ``observed``) from the reference minima."""
        asimov_mu = 1.0 if test_stat == "q0" else 0.0
        key = f"asimov{asimov_mu}"
        asimov_data, asimov_pars = self.asimov(asimov_mu)
        # the exact free minimum on the Asimov data: the parameters that made it (see above)
        nll_free_a = self.twice_nll(asimov_pars, asimov_data)
        fixed_a = self.minimum(key, {self.poi: mu})
        q_a = _statistic(fixed_a.twice_nll, nll_free_a, asimov_mu, mu, test_stat)
        if not observed:
            return None, q_a
        free = self.minimum("data", {}, hesse=self.pyhf_fits)
        fixed = self.minimum("data", {self.poi: mu})
        q = _statistic(fixed.twice_nll, free.twice_nll, free.pars[self.poi], mu, test_stat)
        return q, q_a

    def hypotest(self, mu: float, test_stat: str) -> tuple[float, float, list[float]]:
        q, q_a = self.test_statistics(mu, test_stat)
        return (q, *asymptotic_cls(q, q_a, test_stat))


_REFERENCES: dict[str, Reference] = {}


def reference(case: Case, tmp_path_factory) -> Reference:
    if case.name in _REFERENCES:
        return _REFERENCES[case.name]
    folder = tmp_path_factory.mktemp(case.name)
    alt, fits = None, True
    if case.kind == "case":  # the CLI reads a workspace: the case's "workspace" member
        spec = json.loads(case.path.read_text())["workspace"]
        inputs = [str(folder / "workspace.json")]
        pathlib.Path(inputs[0]).write_text(json.dumps(spec))
    elif case.kind == "json":
        spec, inputs = json.loads(case.path.read_text()), [str(case.path)]
    elif case.kind == "xml":
        try:
            spec = pyhf.readxml.parse(case.path, case.path.parent.parent)
        finally:
            pyhf.readxml.clear_filecache()
        inputs = [str(case.path)]
    elif case.kind == "bound":
        spec = _signal_only_bin()
        inputs = [str(folder / "signal_only_bin.json")]
        pathlib.Path(inputs[0]).write_text(json.dumps(spec))
    else:  # the ATLAS likelihood; also its background-only part + the signal patch
        spec, inputs, fits = json.loads(case.path.read_text()), [str(case.path)], False
        patch = case.path.with_name(f"{SUSY}_signal_patch.json")
        background = copy.deepcopy(spec)
        for channel in background["channels"]:
            channel["samples"] = [s for s in channel["samples"] if s["name"] != "signal"]
        (folder / "background_only.json").write_text(json.dumps(background))
        alt = [str(folder / "background_only.json"), "--patch", str(patch)]
        assert Workspace.load(alt[0], patches=[alt[2]]).spec == Workspace.load(case.path).spec
    ref = Reference(case, folder, spec, inputs, alt, pyhf_fits=fits)
    _REFERENCES[case.name] = ref
    return ref


@pytest.fixture(scope="module", params=CASES)
def ref(request, tmp_path_factory) -> Reference:
    return reference(request.param, tmp_path_factory)


def _by_name(out: dict, key: str) -> dict[str, float]:
    return dict(zip(out["labels"], out[key], strict=True))


# ----------------------------------------------------------------------------- the commands
def _assert_best_fit(ref: Reference, out: dict, sigmas: float) -> tuple[np.ndarray, Minimum]:
    """Our best fit's twice NLL, by pyhf's own logpdf at our point, equals the reference
    minimum (or is lower); every free parameter is within ``sigmas`` errors of it."""
    assert out["converged"] is True
    assert out["labels"] == ref.names
    ours = np.asarray(out["bestfit"], dtype=float)
    at_ours = ref.twice_nll(ours)
    assert out["twice_nll"] == pytest.approx(at_ours, rel=1e-9)  # pyhf's likelihood, same value
    best = ref.minimum("data", {}, hesse=ref.pyhf_fits)
    excess = at_ours - best.twice_nll
    assert excess <= FIT_TWICE_NLL_RTOL * abs(best.twice_nll), (at_ours, best.twice_nll)
    errors = np.asarray([np.nan if e is None else e for e in out["uncertainty"]], dtype=float)
    scale = best.hesse if best.hesse is not None else errors
    for i in ref._free({}):
        tolerance = sigmas * scale[i] + 1e-9
        assert ours[i] == pytest.approx(best.pars[i], abs=tolerance), ref.names[i]
    return errors, best


def _mismatches(ref, ours: np.ndarray, expected: dict[int, float], rtol: float) -> dict:
    return {
        ref.names[i]: (float(ours[i]), float(err))
        for i, err in expected.items()
        if not abs(ours[i] - err) <= rtol * err
    }


def test_fit(ref):
    """``diffana fit`` (exact Newton minimum and exact-Hessian errors): twice NLL equal to the
    reference minimum (or lower) by pyhf's logpdf at our point, the parameters within 1e-3
    errors of the reference minimum, and the errors of the parameters not held on a bound
    equal to sqrt(diag(2 H^-1)) of pyhf's twice NLL at the reference minimum (H by finite
    differences of pyhf's logpdf, the held parameters fixed)."""
    out = cli(ref.folder, "fit", ref.cli_input)
    errors, best = _assert_best_fit(ref, out, sigmas=1e-3)
    if not ref.pyhf_fits:
        return  # the finite-difference Hessian of 219 parameters: 1e5 pyhf logpdf calls
    held = np.asarray(out["at_bound"], dtype=bool)
    expected = ref.exact_errors(best.pars, held)
    mismatches = _mismatches(ref, errors, expected, EXACT_ERROR_RTOL)
    assert not mismatches, f"uncertainty (ours, exact), rtol {EXACT_ERROR_RTOL}: {mismatches}"


def test_fit_minuit_hesse(ref):
    """``diffana fit --method minuit`` (MIGRAD + HESSE, cabinetry's settings): twice NLL and
    parameters as MIGRAD's tolerance allows, errors equal to pyhf's HESSE (HESSE_RTOL) where
    no free parameter is within 0.1 error of a bound at the reference minimum (there
    MINUIT's limit transformation, whose derivative vanishes on the bound, makes both HESSEs
    depend on how close to the bound each MIGRAD stopped: pyhf's documented 2-bin example has
    mu = 3.6e-5 +- 9.8 from pyhf against the exact 0 +- 1.10)."""
    if not ref.pyhf_fits:
        pytest.skip("no pyhf HESSE on the ATLAS likelihood (pyhf's fit alone takes 17 s)")
    out = cli(ref.folder, "fit", ref.cli_input, "--method", "minuit")
    errors, best = _assert_best_fit(ref, out, sigmas=MIGRAD_SIGMAS)
    free = ref._free({})
    distance = np.minimum(best.pars - ref.bounds[:, 0], ref.bounds[:, 1] - best.pars)
    near = [ref.names[i] for i in free if distance[i] < 0.1 * best.hesse[i]]
    if near:
        pytest.skip(f"HESSE is not comparable with a parameter on its bound: {near}")
    expected = {i: best.hesse[i] for i in free}
    mismatches = _mismatches(ref, errors, expected, HESSE_RTOL)
    assert not mismatches, f"uncertainty (ours, pyhf HESSE), rtol {HESSE_RTOL}: {mismatches}"


def test_hypotest(ref):
    """q~ at mu = 1: CLs and the expected band equal the reference to 1e-5 relative."""
    out = cli(ref.folder, "hypotest", ref.alt_input or ref.cli_input, "--poi-value", 1)
    q, cls_obs, cls_exp = ref.hypotest(1.0, "qtilde")
    assert out["test_stat"] == "qtilde" and out["poi_value"] == 1.0
    assert out["teststat"] == pytest.approx(q, rel=1e-5, abs=1e-7)
    assert out["cls_obs"] == pytest.approx(cls_obs, rel=1e-5)
    np.testing.assert_allclose(out["cls_exp"], cls_exp, rtol=1e-5)


def test_significance(ref):
    """Observed and expected Z = sqrt(q0) equal the reference to 1e-5 (1e-4 absolute where
    q0 ~ 0 and the square root magnifies the fits' 1e-8 noise); p = Phi(-Z)."""
    out = cli(ref.folder, "significance", ref.alt_input or ref.cli_input)
    q0, q0_asimov = ref.test_statistics(0.0, "q0")
    for which, q in (("observed", q0), ("expected", q0_asimov)):
        z = out[which]["significance"]
        assert z == pytest.approx(math.sqrt(q), rel=1e-5, abs=1e-4), which
        assert out[which]["p_value"] == pytest.approx(scipy.stats.norm.sf(z), rel=1e-9), which


def test_limit(ref):
    """Observed and expected 95% CLs limits: pyhf's CLs (observed, or the expected band's
    entry) crosses 0.05 within LIMIT_RTOL of each of our limits."""
    out = cli(ref.folder, "limit", ref.cli_input)
    assert out["cl"] == 0.95 and len(out["expected"]) == 5
    limits = [out["observed"], *out["expected"]]
    bad = []
    for k, mu in enumerate(limits):
        values = []
        for point in (mu * (1 - LIMIT_RTOL), mu * (1 + LIMIT_RTOL)):
            q, q_a = ref.test_statistics(point, "qtilde", observed=k == 0)
            obs, exp = asymptotic_cls(q if k == 0 else q_a, q_a, "qtilde")
            values.append(obs if k == 0 else exp[k - 1])
        if not values[0] > ALPHA > values[1]:
            bad.append((["observed", "-2", "-1", "median", "+1", "+2"][k], mu, values))
    assert not bad, f"pyhf's CLs does not cross {ALPHA} at our limit (+-{LIMIT_RTOL}): {bad}"


def test_scan(ref):
    """Profile of the POI (default range, 3 points): twice NLL minus its minimum equals the
    reference fixed-POI minima minus the global one to 1e-5."""
    poi = ref.names[ref.poi]
    inputs = ref.alt_input or ref.cli_input
    target = ref.folder / "scan.json"
    result = CliRunner().invoke(
        main, ["scan", *inputs, "--parameter", poi, "--steps", "3", "--device", "cpu", "-o",
               str(target)],
    )  # fmt: skip
    default_range_error = None
    if result.exit_code != 0:  # check the numbers on the best fit's +-2 sigma all the same
        default_range_error = (result.exit_code, result.stderr.strip())
        fit = cli(ref.folder, "fit", ref.cli_input)
        center, width = _by_name(fit, "bestfit")[poi], _by_name(fit, "uncertainty")[poi]
        low, high = ref.bounds[ref.poi]
        out = cli(ref.folder, "scan", inputs, "--parameter", poi, "--steps", 3, "--range",
                  max(low, center - 2 * width), min(high, center + 2 * width))  # fmt: skip
    else:
        out = _strict_json(target.read_text())
    best = ref.minimum("data", {})
    assert out["parameter"] == poi and len(out["values"]) == 3
    assert out["bestfit"] == pytest.approx(best.pars[ref.poi], abs=1e-4)
    expected = [
        ref.minimum("data", {ref.poi: float(v)}).twice_nll - best.twice_nll for v in out["values"]
    ]
    np.testing.assert_allclose(out["delta_twice_nll"], expected, atol=1e-5)
    assert default_range_error is None, (
        f"diffana scan with the default range: {default_range_error}"
    )


def test_ranking(ref):
    """Post-fit impacts of the two highest-ranked parameters: the POI of the reference minimum
    with the parameter fixed at our best fit +- our uncertainty, minus the reference best-fit
    POI, to 1e-4."""
    # the ATLAS likelihood: 4 x 218 batched refits, diffana ranking about 15 s (was 2 minutes)
    out = cli(ref.folder, "ranking", ref.cli_input)
    assert out["poi"] == ref.names[ref.poi]
    assert [e["name"] for e in out["ranking"]] == [n for n in ref.names if n != out["poi"]]
    entries = [e for e in out["ranking"] if e["uncertainty"] and e["postfit_up"] is not None]
    entries.sort(key=lambda e: -max(abs(e["postfit_up"]), abs(e["postfit_down"] or 0.0)))
    assert entries, "no parameter with a post-fit impact"
    nominal = ref.minimum("data", {}).pars[ref.poi]
    for entry in entries[:2]:
        i = ref.names.index(entry["name"])
        for key, sign in (("postfit_up", 1.0), ("postfit_down", -1.0)):
            value = float(np.clip(entry["bestfit"] + sign * entry["uncertainty"], *ref.bounds[i]))
            shifted = ref.minimum("data", {i: value}).pars[ref.poi]
            assert entry[key] == pytest.approx(shifted - nominal, abs=1e-4), (entry["name"], key)


# ----------------------------------------------------------------------------- special cases
REFERENCE_CALCULATOR_CASES = [
    "2-bin_1-channel",
    "2bin_2channel_mu1",
    "multichannel_histfactory",
    "multichan_coupledhistosys_histfactory",
]


@pytest.mark.parametrize("name", REFERENCE_CALCULATOR_CASES)
def test_reference_calculator_reproduces_pyhf_hypotest(name, tmp_path_factory):
    """The reference asymptotics of this file equal ``pyhf.infer.hypotest`` (q~ at mu = 1 and
    q0) to 1e-5, except where pyhf's own fits stop in a higher minimum than the reference
    (the coupled-histosys model: two minima on either side of its histosys parameter), which
    is then shown by pyhf's logpdf at pyhf's fitted points."""
    case = next((p.values[0] for p in CASES if p.id == name), None)
    if case is None:
        pytest.skip(f"reference data not found at {REFERENCE}")
    ref = reference(case, tmp_path_factory)
    for mu, test_stat in ((1.0, "qtilde"), (0.0, "q0")):
        _, ours_obs, ours_exp = ref.hypotest(mu, test_stat)
        with tight_minuit():
            obs, exp, calc = pyhf.infer.hypotest(
                mu, ref.data, ref.pmodel, test_stat=test_stat, return_expected_set=True,
                return_calculator=True,
            )  # fmt: skip
        theirs = np.array([float(obs), *map(float, exp)])
        if np.allclose([ours_obs, *ours_exp], theirs, rtol=1e-5, atol=0):
            continue
        # a difference must come with a pyhf fit above the reference minimum of the same problem
        fitted, asimov_mu = calc.fitted_pars, 1.0 if test_stat == "q0" else 0.0
        higher = {
            "free fit": ref.twice_nll(fitted.free_fit_to_data) - ref.minimum("data", {}).twice_nll,
            "fixed-POI fit": ref.twice_nll(fitted.fixed_poi_fit_to_data)
            - ref.minimum("data", {ref.poi: mu}).twice_nll,
            "Asimov fit": ref.twice_nll(fitted.asimov_pars)
            - ref.minimum("data", {ref.poi: asimov_mu}).twice_nll,
        }
        assert max(higher.values()) > 1e-6, (test_stat, ours_obs, ours_exp, theirs, higher)


def test_bound_case_through_the_cli(tmp_path):
    """Background-only data and a bin that holds only signal: mu_hat = 0 on its bound. The CLI's
    expected significance (Z = 11.2, p = 2e-29) is finite in the JSON and equals sqrt(q0_A),
    q0_A from pyhf's logpdf at pyhf's two fits of the Asimov data, and pyhf's q0 p-value turned
    into Z; hypotest and limit equal pyhf's ``hypotest`` (its CLs crosses 0.05 at our limits).
    The same workspace runs all six commands in the parametrized tests above; the library-level
    checks are test_inference.py::test_poi_on_its_bound_gives_pyhf_statistics_and_a_profile_...
    """
    spec = _signal_only_bin()
    path = tmp_path / "signal_only_bin.json"
    path.write_text(json.dumps(spec))
    workspace = pyhf.Workspace(spec)
    model = workspace.model()
    data = workspace.data(model)

    out = cli(tmp_path, "significance", [str(path)])
    z_exp = out["expected"]["significance"]
    assert math.isfinite(z_exp) and z_exp > 8
    assert out["observed"]["significance"] == pytest.approx(0.0, abs=1e-4)
    with tight_minuit():
        mu1 = pyhf.infer.mle.fixed_poi_fit(1.0, data, model)
        asimov = model.expected_data(mu1)
        mu0_asimov = pyhf.infer.mle.fixed_poi_fit(0.0, asimov, model)
        p_obs, p_exp = pyhf.infer.hypotest(0.0, data, model, test_stat="q0", return_expected=True)
    q0_asimov = float(-2 * model.logpdf(mu0_asimov, asimov)[0] + 2 * model.logpdf(mu1, asimov)[0])
    assert z_exp == pytest.approx(math.sqrt(q0_asimov), rel=1e-5)
    assert z_exp == pytest.approx(scipy.stats.norm.isf(float(p_exp)), rel=1e-5)
    assert out["expected"]["p_value"] == pytest.approx(float(p_exp), rel=1e-4)
    assert float(p_obs) == pytest.approx(0.5, abs=1e-4)

    out = cli(tmp_path, "hypotest", [str(path)], "--poi-value", 1)
    with tight_minuit():
        cls_obs, cls_exp = pyhf.infer.hypotest(1.0, data, model, return_expected_set=True)
    assert out["cls_obs"] == pytest.approx(float(cls_obs), rel=1e-5)
    np.testing.assert_allclose(out["cls_exp"], np.asarray(cls_exp, dtype=float), rtol=1e-5)

    # pyhf's own hypotest crosses 0.05 within 1e-4 of each limit (its toms748_scan would take
    # 9 s here: 60 hypotests)
    out = cli(tmp_path, "limit", [str(path)])
    for k, mu in enumerate([out["observed"], *out["expected"]]):
        values = []
        for point in (mu * (1 - 1e-4), mu * (1 + 1e-4)):
            with tight_minuit():
                cls_obs, cls_exp = pyhf.infer.hypotest(point, data, model, return_expected_set=True)
            values.append(float(cls_obs) if k == 0 else float(cls_exp[k - 1]))
        assert values[0] > ALPHA > values[1], (k, mu, values)
