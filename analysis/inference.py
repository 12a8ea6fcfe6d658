"""Statistical inference on a HistFactory model: test statistics, asymptotic CLs, discovery
significance, upper limits, likelihood scans, ranking, goodness of fit and toys.

Conventions are pyhf's (0.7.6) and, for the result records, cabinetry's:

- Test statistics (Cowan, Cranmer, Gross, Vitells, arXiv:1007.1727). With
  ``t_mu = max(0, 2 NLL(mu, theta_hat_hat) - 2 NLL(mu_hat, theta_hat))``:
  ``q_mu = t_mu if mu_hat <= mu else 0`` (eq. 14), ``q~_mu`` the same with the POI bounded below
  at 0 (eq. 16; pyhf fits within the model's bounds for both), ``q0 = t_0 if mu_hat >= 0 else
  0`` (eq. 12).
- Asymptotics (Wald approximation, sec. 3): the Asimov dataset is the model's expectation at
  the parameters fitted to the *observed* data with the POI fixed at 0 (at 1 for q0), as pyhf
  does. With ``s = sqrt(q)`` and ``s_A = sqrt(q_A)`` the test statistic in ``-mu_hat/sigma``
  space is ``t = s - s_A`` (q, q0), and for q~ ``t = s - s_A`` if ``s <= s_A`` else
  ``(q - q_A) / (2 s_A)`` (eq. 65-66). Then ``CLs+b = Phi(-(t + s_A))``, ``CLb = Phi(-t)``,
  ``CLs = CLs+b / CLb``; the expected band uses ``t = n`` for ``n = 2, 1, 0, -1, -2`` (pyhf's
  order, i.e. CLs from the -2 sigma to the +2 sigma band). For q0 the p-value is CLs+b.
- Upper limits: the POI where CLs = 1 - CL, found by bracketing and bisection with all six
  curves (observed and the five expected) solved together in batched hypotests.
- Ranking: the POI shift when one nuisance parameter is fixed at its best fit +- its pre-fit
  (constraint) or post-fit uncertainty and the others refitted (cabinetry ``fit.ranking``).
- Goodness of fit: saturated model, ``2 (NLL_best - NLL_sat)`` with the Poisson terms at
  ``lambda = n`` and the constraint terms at the suggested initial parameters, chi2 with
  ``n_bins - n_unconstrained`` degrees of freedom (cabinetry ``fit._goodness_of_fit``).

All fits here are the batched torch Newton fits of :mod:`analysis.fit`: the many fits that a
hypotest, a limit, a scan or a set of toys needs run as one batched call. Everything stays in
torch on the model's device; results are small frozen records.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from analysis.errors import AnalysisError, ConfigError
from analysis.fit import newton_minimize, value_grad_hessian, with_implicit_gradient
from analysis.likelihood.model import TwiceNLL
from analysis.progress import progress_bar

log = logging.getLogger(__name__)

TestStat = Literal["q", "qtilde", "q0"]
#: order of the expected band in pyhf: -mu_hat/sigma = +2 ... -2, i.e. CLs from -2 to +2 sigma
BAND_NSIGMA = (2.0, 1.0, 0.0, -1.0, -2.0)


class InferenceError(AnalysisError, ArithmeticError):
    """An inference step cannot be done for this model or data (e.g. no bracketed limit)."""


# ----------------------------------------------------------------------------- records
def _float64(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _number_or_none(value: torch.Tensor) -> float | None:
    """A float for JSON, ``None`` (null) where it is NaN."""
    number = float(value.detach())
    return None if math.isnan(number) else number


@dataclass(frozen=True)
class HypotestResult:
    """CLs of a hypothesis test at each tested POI value (leading shape of ``poi_value``)."""

    poi_value: torch.Tensor
    test_stat: str
    teststat: torch.Tensor  # the observed q (q_mu, q~_mu or q0)
    cls_obs: torch.Tensor  # CLs (CLs+b, i.e. the p-value, for q0)
    cls_exp: torch.Tensor  # (..., 5): -2 sigma .. +2 sigma
    clsb_obs: torch.Tensor
    clb_obs: torch.Tensor
    teststat_asimov: torch.Tensor | None = None  # q on the Asimov data (asymptotic tests)

    def to_dict(self) -> dict:
        return {
            "poi_value": self.poi_value.detach().tolist(),
            "test_stat": self.test_stat,
            "teststat": self.teststat.detach().tolist(),
            "cls_obs": self.cls_obs.detach().tolist(),
            "cls_exp": self.cls_exp.detach().tolist(),
        }

    @classmethod
    def from_scan(cls, scan: Mapping[str, Any], test_stat: str = "qtilde") -> HypotestResult:
        """CLs on a POI grid as ``diffana limit`` writes it (its ``scan``: ``poi_values``,
        ``cls_obs``, ``cls_exp``); the test statistic and CLs+b, CLb are not stored (NaN)."""
        poi = _float64(scan["poi_values"])
        nan = torch.full_like(poi, math.nan)
        return cls(
            poi, test_stat, nan, _float64(scan["cls_obs"]), _float64(scan["cls_exp"]), nan, nan
        )


@dataclass(frozen=True)
class SignificanceResult:
    """Discovery p-values and significances (observed, and expected under mu = 1)."""

    observed_p_value: float
    observed_significance: float
    expected_p_value: float
    expected_significance: float

    def to_dict(self) -> dict:
        return {
            "observed": {
                "p_value": self.observed_p_value,
                "significance": self.observed_significance,
            },
            "expected": {
                "p_value": self.expected_p_value,
                "significance": self.expected_significance,
            },
        }


@dataclass(frozen=True)
class LimitResult:
    """Upper limits on the POI at confidence level ``cl``: observed and the expected band."""

    cl: float
    observed: float
    expected: tuple[float, float, float, float, float]  # -2 sigma .. +2 sigma

    def to_dict(self) -> dict:
        return {"cl": self.cl, "observed": self.observed, "expected": list(self.expected)}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> LimitResult:
        """The inverse of :meth:`to_dict` (a ``diffana limit`` JSON file)."""
        return cls(
            float(payload["cl"]),
            float(payload["observed"]),
            cast(
                "tuple[float, float, float, float, float]",
                tuple(float(x) for x in payload["expected"]),
            ),
        )


@dataclass(frozen=True)
class ScanResult:
    """Profile-likelihood scan: ``delta_twice_nll`` at each value of ``parameter``."""

    parameter: str
    bestfit: float
    uncertainty: float
    values: torch.Tensor
    delta_twice_nll: torch.Tensor

    def to_dict(self) -> dict:
        return {
            "parameter": self.parameter,
            "bestfit": self.bestfit,
            "uncertainty": self.uncertainty,
            "values": self.values.detach().tolist(),
            "delta_twice_nll": self.delta_twice_nll.detach().tolist(),
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> ScanResult:
        """The inverse of :meth:`to_dict` (a ``diffana scan`` JSON file)."""
        return cls(
            payload["parameter"],
            float(payload["bestfit"]),
            float(payload["uncertainty"]),
            _float64(payload["values"]),
            _float64(payload["delta_twice_nll"]),
        )


@dataclass(frozen=True)
class RankingResult:
    """Impact of each nuisance parameter on the POI (cabinetry's RankingResults fields)."""

    labels: tuple[str, ...]
    bestfit: torch.Tensor
    uncertainty: torch.Tensor
    prefit_up: torch.Tensor
    prefit_down: torch.Tensor
    postfit_up: torch.Tensor
    postfit_down: torch.Tensor

    def to_dict(self) -> dict:
        return {
            "ranking": [
                {
                    "name": name,
                    "bestfit": float(self.bestfit[i].detach()),
                    "uncertainty": float(self.uncertainty[i].detach()),
                    "prefit_up": _number_or_none(self.prefit_up[i]),
                    "prefit_down": _number_or_none(self.prefit_down[i]),
                    "postfit_up": _number_or_none(self.postfit_up[i]),
                    "postfit_down": _number_or_none(self.postfit_down[i]),
                }
                for i, name in enumerate(self.labels)
            ]
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> RankingResult:
        """The inverse of :meth:`to_dict` (a ``diffana ranking`` JSON file)."""
        entries = payload["ranking"]

        def column(key: str) -> torch.Tensor:  # null: an impact that could not be computed
            return _float64([math.nan if entry[key] is None else entry[key] for entry in entries])

        return cls(
            tuple(entry["name"] for entry in entries),
            *(
                column(key)
                for key in (
                    "bestfit",
                    "uncertainty",
                    "prefit_up",
                    "prefit_down",
                    "postfit_up",
                    "postfit_down",
                )
            ),
        )


@dataclass(frozen=True)
class GoodnessOfFit:
    """Saturated-model goodness of fit."""

    delta_twice_nll: float
    ndof: int
    p_value: float

    def to_dict(self) -> dict:
        return {"delta_twice_nll": self.delta_twice_nll, "ndof": self.ndof, "p_value": self.p_value}


# ----------------------------------------------------------------------------- helpers
def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x), the standard normal CDF, accurate in both tails: ``exp(log_ndtr(x))``.

    ``torch.special.ndtr`` itself rounds to 0 below x = -8.3 (Phi(-11.2) = 1.8e-29 came out
    as 0), where ``log_ndtr`` keeps full relative precision down to the smallest doubles
    (x = -38.5); above 0 both agree to the last bit.
    """
    return torch.exp(torch.special.log_ndtr(x))


def require_poi(model) -> int:
    """The POI's index in the parameters; ConfigError when the model has none."""
    if model.poi_index is None:
        raise ConfigError("the model has no parameter of interest (measurement POI missing)")
    return int(model.poi_index)


def _settings(model, init, bounds, fixed):
    init = (
        model.suggested_init()
        if init is None
        else torch.as_tensor(init, dtype=model.dtype, device=model.device)
    )
    bounds = (
        model.suggested_bounds()
        if bounds is None
        else torch.as_tensor(bounds, dtype=model.dtype, device=model.device)
    )
    fixed = (
        model.suggested_fixed()
        if fixed is None
        else torch.as_tensor(fixed, dtype=torch.bool, device=model.device)
    )
    return init, bounds, fixed


#: Newton iterations of the first, whole-batch pass (most fits converge in 3-7)
FIRST_PASS_ITERATIONS = 12
#: POI values of the batched scan that brackets each limit before root finding
GRID_POINTS = 21
#: offsets (in units of the constraint width) of the extra starts for kinked parameters
KINK_STARTS = (0.5, -0.5)


def minimize(model, data, start, *, bounds, fixed, what: str = "fit"):
    """Batched Newton fits of ``model`` to ``data`` from ``start`` (..., P).

    Parameters with a kink at 0 (histosys code0, normsys code1; see
    :meth:`~analysis.likelihood.Model.kinked_parameters`) make the likelihood piecewise smooth
    with possibly one local minimum on each side of the kink, and a Newton fit (or MIGRAD) from
    0 stops in whichever it walks into. Such models are fitted from the given start and from
    the start shifted by +0.5 and -0.5 on all kinked parameters, in one batched call, and the
    lowest converged minimum is kept. Smooth models (code4/code4p, pyhf's defaults) are fitted
    once. Returns (parameters (..., P), twice_nll (...)).

    In grad mode the results are differentiable in whatever the model and the data were built
    from: the parameters by the implicit function theorem
    (:func:`~analysis.fit.with_implicit_gradient`), the minimum value by the envelope theorem.
    """
    objective = TwiceNLL(model, data)
    x, fun = _best_minimum(model, objective, start, bounds, fixed, what)
    if not torch.is_grad_enabled():
        return x, fun
    x = with_implicit_gradient(objective, x, bounds=bounds, fixed=fixed)
    return x, objective(x)


def _best_minimum(model, objective, start, bounds, fixed, what):
    data = objective.data
    kinked = model.kinked_parameters() & ~fixed
    if not bool(kinked.any()):
        x, fun, converged = _newton(model, data, start, bounds, fixed)
        _report_unconverged(converged, what)
        return x, fun
    offsets = [torch.zeros_like(start)] + [
        torch.where(kinked, d, 0.0).expand_as(start) for d in KINK_STARTS
    ]
    starts = torch.stack([start + o for o in offsets])
    starts = torch.minimum(torch.maximum(starts, bounds[:, 0]), bounds[:, 1])
    starts = torch.where(fixed, start, starts)
    x, fun, converged = _newton(model, data, starts, bounds, fixed)
    best = torch.where(converged, fun, torch.inf).argmin(0)
    x = torch.take_along_dim(x, best[None, ..., None], dim=0)[0]
    _report_unconverged(converged.any(0), what)
    return x, torch.take_along_dim(fun, best[None], dim=0)[0]


def _newton(model, data, start, bounds, fixed):
    """Batched Newton fits in two passes: all elements with a short iteration cap, then only
    the ones that have not converged, on their own slice of the data (a few stragglers would
    otherwise keep the whole batch iterating)."""
    result = newton_minimize(
        TwiceNLL(model, data),
        start,
        bounds=bounds,
        fixed=fixed,
        max_iter=FIRST_PASS_ITERATIONS,
    )
    x, fun, converged = result.x, result.fun, result.converged
    if bool(converged.all()) or start.dim() == 1:
        if not bool(converged.all()):  # a single fit: just keep going
            more = newton_minimize(
                TwiceNLL(model, data), x, bounds=bounds, fixed=fixed
            )
            return more.x, more.fun, more.converged
        return x, fun, converged
    # the stragglers' own rows of everything that may be batched: data, bounds, fixed masks
    todo, batch = ~converged, start.shape[:-1]
    rest = data.expand(*batch, data.shape[-1])[todo]
    more = newton_minimize(
        TwiceNLL(model, rest),
        x[todo],
        bounds=bounds.expand(*batch, *bounds.shape[-2:])[todo],
        fixed=fixed.expand(*batch, fixed.shape[-1])[todo],
    )
    x, fun, converged = x.clone(), fun.clone(), converged.clone()
    x[todo], fun[todo], converged[todo] = more.x, more.fun, more.converged
    return x, fun, converged


def _report_unconverged(converged: torch.Tensor, what: str) -> None:
    failed = int((~converged).sum())
    if failed:
        log.warning("%d of %d %s(s) did not converge", failed, converged.numel(), what)


def free_fit(model, data, *, init=None, bounds=None, fixed=None):
    """Batched unconditional fits: returns (parameters (..., P), twice_nll (...))."""
    init, bounds, fixed = _settings(model, init, bounds, fixed)
    start = init.expand(*data.shape[:-1], init.shape[-1]).clone()
    return minimize(model, data, start, bounds=bounds, fixed=fixed, what="free fit")


def fixed_poi_fit(model, data, poi_value, *, init=None, bounds=None, fixed=None):
    """Batched fits with the POI fixed at ``poi_value`` (broadcast against the data's batch)."""
    init, bounds, fixed = _settings(model, init, bounds, fixed)
    poi = require_poi(model)
    poi_value = torch.as_tensor(poi_value, dtype=init.dtype, device=init.device)
    batch = torch.broadcast_shapes(data.shape[:-1], poi_value.shape)
    start = init.expand(*batch, init.shape[-1]).clone()
    start[..., poi] = poi_value
    fixed = fixed.clone()
    fixed[poi] = True
    x, fun = minimize(model, data, start, bounds=bounds, fixed=fixed, what="fixed-POI fit")
    if poi_value.requires_grad:  # the POI column carries the tested value's gradient
        is_poi = torch.arange(x.shape[-1], device=x.device) == poi
        x = torch.where(is_poi, poi_value.unsqueeze(-1), x)
        fun = model.twice_nll(x, data)
    return x, fun


def statistic_from_fits(nll_fixed, nll_free, mu_hat, poi_value, test_stat: TestStat):
    """q from the two fits: ``t = max(0, 2NLL_fixed - 2NLL_free)``, zeroed where ``mu_hat``
    lies above the tested value (q, q~) or below 0 (q0); see the module docstring."""
    t = torch.clamp(nll_fixed - nll_free, min=0.0)
    if test_stat == "q0":
        return torch.where(mu_hat < 0, torch.zeros_like(t), t)
    if test_stat in ("q", "qtilde"):
        return torch.where(mu_hat > poi_value, torch.zeros_like(t), t)
    raise ConfigError(f"unknown test statistic '{test_stat}'; expected q, qtilde or q0")


def test_statistic(
    model,
    data,
    poi_value,
    test_stat: TestStat = "qtilde",
    *,
    init=None,
    bounds=None,
    fixed=None,
    free=None,
):
    """The observed test statistic (q_mu, q~_mu or q0) at ``poi_value``, batched.

    ``free`` is the free fit ``(parameters, twice_nll)`` of ``data`` when it is known already;
    the fixed-POI fits start from it.
    """
    poi = require_poi(model)
    if free is None:
        free = free_fit(model, data, init=init, bounds=bounds, fixed=fixed)
    x_free, nll_free = free
    poi_value = torch.as_tensor(poi_value, dtype=x_free.dtype, device=x_free.device)
    _, nll_fixed = fixed_poi_fit(
        model, data, poi_value, init=x_free.detach(), bounds=bounds, fixed=fixed
    )
    return statistic_from_fits(nll_fixed, nll_free, x_free[..., poi], poi_value, test_stat)


def asimov_data(
    model, data, asimov_poi: float, *, init=None, bounds=None, fixed=None
) -> torch.Tensor:
    """pyhf's Asimov dataset: expected data at the fit to ``data`` with the POI fixed."""
    pars, _ = fixed_poi_fit(model, data, asimov_poi, init=init, bounds=bounds, fixed=fixed)
    return model.expected_data(pars)


def asymptotic_cls(sqrt_q: torch.Tensor, sqrt_q_asimov: torch.Tensor, test_stat: TestStat):
    """(CLs+b, CLb, CLs) and the expected (..., 5) CLs+b and CLs from the Wald approximation."""
    if test_stat == "qtilde":
        safe = torch.where(sqrt_q_asimov > 0, sqrt_q_asimov, torch.ones_like(sqrt_q_asimov))
        t = torch.where(
            sqrt_q <= sqrt_q_asimov,
            sqrt_q - sqrt_q_asimov,
            (sqrt_q**2 - sqrt_q_asimov**2) / (2 * safe),
        )
    else:
        t = sqrt_q - sqrt_q_asimov
    clsb, clb = normal_cdf(-(t + sqrt_q_asimov)), normal_cdf(-t)
    n = torch.tensor(BAND_NSIGMA, dtype=t.dtype, device=t.device)
    clsb_exp = normal_cdf(-(n + sqrt_q_asimov.unsqueeze(-1)))
    clb_exp = normal_cdf(-n).expand_as(clsb_exp)
    return clsb, clb, clsb / clb, clsb_exp, clsb_exp / clb_exp


class AsymptoticCalculator:
    """Asymptotic hypothesis tests of one model and dataset at any POI values (pyhf's name).

    The fits that do not depend on the tested POI value are done once here, in two batched
    calls: the free fit to the data together with the fit that defines the Asimov dataset
    (POI fixed at 0, or at 1 for q0), then the free fit to the Asimov data. Each
    :meth:`hypotest` needs one more batched call: the fixed-POI fits to the data and to the
    Asimov data, at every tested value at once.
    """

    def __init__(
        self, model, data, test_stat: TestStat = "qtilde", *, init=None, bounds=None, fixed=None
    ) -> None:
        if test_stat not in ("q", "qtilde", "q0"):
            raise ConfigError(f"unknown test statistic '{test_stat}'; expected q, qtilde or q0")
        self.model, self.test_stat = model, test_stat
        self.poi = require_poi(model)
        self.init, self.bounds, self.fixed = _settings(model, init, bounds, fixed)
        kwargs = {"init": self.init, "bounds": self.bounds, "fixed": self.fixed}
        self.data = torch.as_tensor(data, dtype=model.dtype, device=model.device)
        batch = self.data.shape[:-1]
        asimov_poi = 1.0 if test_stat == "q0" else 0.0
        if model.nominal_batch > 1:  # a batched model takes exactly its own batch of fits
            self.free = free_fit(model, self.data, **kwargs)
            self.asimov = asimov_data(model, self.data, asimov_poi, **kwargs)
        else:  # row 0: free fit to the data; row 1: POI fixed at the Asimov value
            start = self.init.expand(2, *batch, model.npars).clone()
            start[1, ..., self.poi] = asimov_poi
            fixed_rows = self.fixed.expand(2, *([1] * len(batch)), model.npars).clone()
            fixed_rows[1, ..., self.poi] = True
            x, fun = minimize(
                model, self.data, start, bounds=self.bounds, fixed=fixed_rows, what="fit to data"
            )
            self.free = (x[0], fun[0])
            self.asimov = model.expected_data(x[1])
        self.free_asimov = free_fit(
            model, self.asimov, init=self.init, bounds=self.bounds, fixed=self.fixed
        )

    def hypotest(self, poi_value) -> HypotestResult:
        """CLs (or the q0 p-value) at ``poi_value``: a number or a 1-D tensor of values."""
        model, poi = self.model, self.poi
        poi_value = torch.as_tensor(poi_value, dtype=model.dtype, device=model.device)
        if model.nominal_batch > 1:  # one call per dataset: the batch must stay the model's
            kwargs = {"bounds": self.bounds, "fixed": self.fixed}
            q, q_asimov = (
                test_statistic(model, d, poi_value, self.test_stat, free=f, **kwargs)
                for d, f in ((self.data, self.free), (self.asimov, self.free_asimov))
            )
            return self._result(poi_value, q, q_asimov)
        batch = torch.broadcast_shapes(self.data.shape[:-1], poi_value.shape)
        data = torch.stack([d.expand(*batch, d.shape[-1]) for d in (self.data, self.asimov)])
        fits = (self.free, self.free_asimov)
        free_x = torch.stack([f[0].detach().expand(*batch, model.npars) for f in fits])
        free_nll = torch.stack([f[1].expand(batch) for f in fits])
        mu = poi_value.expand(batch)
        start = free_x.clone()
        start[..., poi] = mu.detach()
        fixed = self.fixed.clone()
        fixed[poi] = True
        x, nll = minimize(model, data, start, bounds=self.bounds, fixed=fixed, what="fixed-POI fit")
        if poi_value.requires_grad:  # the POI column carries the tested value's gradient
            is_poi = torch.arange(model.npars, device=x.device) == poi
            x = torch.where(is_poi, mu.unsqueeze(-1), x)
            nll = model.twice_nll(x, data)
        q_pair = statistic_from_fits(nll, free_nll, free_x[..., poi], mu, self.test_stat)
        return self._result(poi_value, q_pair[0], q_pair[1])

    def _result(self, poi_value, q, q_asimov) -> HypotestResult:
        clsb, clb, cls, clsb_exp, cls_exp = asymptotic_cls(
            torch.sqrt(q), torch.sqrt(q_asimov), self.test_stat
        )
        if self.test_stat == "q0":
            cls, cls_exp = clsb, clsb_exp
        return HypotestResult(poi_value, self.test_stat, q, cls, cls_exp, clsb, clb, q_asimov)


def hypotest(
    model, data, poi_value, test_stat: TestStat = "qtilde", *, init=None, bounds=None, fixed=None
) -> HypotestResult:
    """Asymptotic hypothesis test(s) at ``poi_value`` (a number or a 1-D tensor of values).

    For one dataset (no batch dimensions) the seven kinds of fit run as two batched calls:
    on the data the free fit, the fit that defines the Asimov dataset and the fixed-POI fits;
    on the Asimov data its free fit and fixed-POI fits. Otherwise see
    :class:`AsymptoticCalculator`, which also serves many calls on one dataset.
    """
    data = torch.as_tensor(data, dtype=model.dtype, device=model.device)
    poi_value = torch.as_tensor(poi_value, dtype=model.dtype, device=model.device)
    if test_stat not in ("q", "qtilde", "q0"):
        raise ConfigError(f"unknown test statistic '{test_stat}'; expected q, qtilde or q0")
    if data.dim() != 1 or poi_value.dim() > 1 or poi_value.requires_grad:
        calculator = AsymptoticCalculator(
            model, data, test_stat, init=init, bounds=bounds, fixed=fixed
        )
        return calculator.hypotest(poi_value)
    poi = require_poi(model)
    init, bounds, fixed = _settings(model, init, bounds, fixed)
    mus = poi_value.reshape(-1)
    n_mu = mus.shape[0]
    # call 1, on the data: free fit, POI at the Asimov value, POI at each tested value
    asimov_poi = torch.full(
        (1,), 1.0 if test_stat == "q0" else 0.0, dtype=mus.dtype, device=mus.device
    )
    start = init.expand(2 + n_mu, model.npars).clone()
    start[1:, poi] = torch.cat([asimov_poi, mus])
    fixed_rows = fixed.expand(2 + n_mu, model.npars).clone()
    fixed_rows[1:, poi] = True
    x, nll = minimize(model, data, start, bounds=bounds, fixed=fixed_rows, what="fit to data")
    asimov = model.expected_data(x[1])
    # call 2, on the Asimov data: free fit and POI at each tested value
    start_a = init.expand(1 + n_mu, model.npars).clone()
    start_a[1:, poi] = mus
    fixed_a = fixed.expand(1 + n_mu, model.npars).clone()
    fixed_a[1:, poi] = True
    x_a, nll_a = minimize(
        model, asimov, start_a, bounds=bounds, fixed=fixed_a, what="fit to Asimov data"
    )

    q = statistic_from_fits(nll[2:], nll[0], x[0, poi].detach(), mus, test_stat)
    q_asimov = statistic_from_fits(nll_a[1:], nll_a[0], x_a[0, poi].detach(), mus, test_stat)
    clsb, clb, cls, clsb_exp, cls_exp = asymptotic_cls(
        torch.sqrt(q), torch.sqrt(q_asimov), test_stat
    )
    if test_stat == "q0":
        cls, cls_exp = clsb, clsb_exp
    shape = poi_value.shape
    return HypotestResult(
        poi_value,
        test_stat,
        q.reshape(shape),
        cls.reshape(shape),
        cls_exp.reshape(*shape, 5),
        clsb.reshape(shape),
        clb.reshape(shape),
        q_asimov.reshape(shape),
    )


def toy_hypotest(
    model,
    data,
    poi_value: float,
    test_stat: TestStat = "qtilde",
    *,
    n_toys: int = 2000,
    seed: int = 0,
    init=None,
    bounds=None,
    fixed=None,
    batch_size: int = 1000,
    progress: bool = False,
) -> HypotestResult:
    """Hypothesis test at ``poi_value`` with pseudo-experiments instead of asymptotics.

    pyhf's ToyCalculator semantics: toys are drawn (:meth:`Model.sample`) at the fits to the
    data with the POI fixed at ``poi_value`` (signal + background) and at 0 (background only;
    for q0 the roles are mu = 0 and mu = 1), every toy's test statistic at ``poi_value`` comes
    from one batched free fit and one batched fixed-POI fit of all toys, and
    ``CLs+b = P(q >= q_obs | s+b)``, ``CLb = P(q >= q_obs | b)``, ``CLs = CLs+b / CLb``. The
    expected band is the 2.3, 15.9, 50, 84.1 and 97.7 percentiles of CLs (CLs+b for q0)
    evaluated at each background-only toy (linear interpolation, as pyhf).

    The toys are fitted ``batch_size`` at a time (both hypotheses in each batched call; fits
    are independent per toy, so the batch size changes nothing but memory and the steps of
    the ``progress`` bar, shown on a terminal).
    """
    kwargs = {"init": init, "bounds": bounds, "fixed": fixed}
    data = torch.as_tensor(data, dtype=model.dtype, device=model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        q_obs = test_statistic(model, data, poi_value, test_stat, **kwargs)
        other = 1.0 if test_stat == "q0" else 0.0
        pars_sb, _ = fixed_poi_fit(model, data, poi_value, **kwargs)
        pars_b, _ = fixed_poi_fit(model, data, other, **kwargs)
        toys = model.sample(torch.stack([pars_sb, pars_b]), n_toys, generator=generator)
        bar = progress_bar(n_toys, "toys", enabled=progress, unit="toy")
        try:
            batches = []
            for batch in torch.split(toys, max(1, int(batch_size))):
                batches.append(test_statistic(model, batch, poi_value, test_stat, **kwargs))
                bar.update(batch.shape[0])
        finally:
            bar.close()
        q_toys = torch.cat(batches)  # (n_toys, 2)
        q_sb, q_b = q_toys[:, 0], q_toys[:, 1]

        def pvalues(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            clsb = (q_sb.unsqueeze(-1) >= q.reshape(1, -1)).to(q.dtype).mean(0)
            clb = (q_b.unsqueeze(-1) >= q.reshape(1, -1)).to(q.dtype).mean(0)
            return clsb.reshape(q.shape), clb.reshape(q.shape)

        clsb, clb = pvalues(q_obs)
        clsb_toys, clb_toys = pvalues(q_b)  # p-values at every background-only toy
        levels = normal_cdf(-torch.tensor(BAND_NSIGMA, dtype=q_obs.dtype, device=q_obs.device))
        band = clsb_toys if test_stat == "q0" else clsb_toys / clb_toys
        cls_exp = torch.quantile(band, levels)
    cls = clsb if test_stat == "q0" else clsb / clb
    poi = torch.as_tensor(poi_value, dtype=model.dtype, device=model.device)
    return HypotestResult(poi, test_stat, q_obs, cls, cls_exp, clsb, clb)


def significance(model, data, *, init=None, bounds=None, fixed=None) -> SignificanceResult:
    """Discovery significance and p-value from q0: observed, and median expected for mu = 1.

    ``Z = sqrt(q0)`` on the data and ``Z_A = sqrt(q0_A)`` on the Asimov data with mu = 1
    (Cowan, Cranmer, Gross, Vitells, Eur. Phys. J. C 71 (2011) 1554, eqs. 53 and 57), and
    ``p = Phi(-Z)`` (:func:`normal_cdf`): Z stays finite and exact however large it is (a
    p-value below 1e-308 is reported as 0, the significance still as sqrt(q0)); inverting a
    p-value that has rounded to 0 would give an infinite Z.
    """
    result = hypotest(model, data, 0.0, "q0", init=init, bounds=bounds, fixed=fixed)
    z_obs = torch.sqrt(result.teststat.clamp_min(0.0))
    # hypotest (asymptotic) always sets teststat_asimov
    z_exp = torch.sqrt(cast(torch.Tensor, result.teststat_asimov).clamp_min(0.0))
    return SignificanceResult(
        float(normal_cdf(-z_obs)), float(z_obs), float(normal_cdf(-z_exp)), float(z_exp)
    )


def upper_limits(
    model,
    data,
    cl: float = 0.95,
    test_stat: TestStat = "qtilde",
    *,
    bracket=None,
    xtol: float = 1e-5,
    init=None,
    bounds=None,
    fixed=None,
    max_iter: int = 100,
) -> torch.Tensor:
    """The POI values where CLs = 1 - ``cl``: tensor (6,), observed then expected -2..+2 sigma.

    All six curves are solved together by the Illinois method (regula falsi that halves the
    stale end's value, superlinear and always bracketed): each step is one batched hypotest at
    six POI values. The default bracket is (0, upper POI bound); it must bracket every
    crossing, else :class:`InferenceError`. In grad mode the limits are differentiable in
    what the model and data were built from, by implicit differentiation of the root:
    ``d mu*/d phi = -(d CLs/d phi) / (d CLs/d mu)`` at ``mu*`` (one more batched hypotest).
    """
    alpha = 1.0 - cl
    poi = require_poi(model)
    poi_bounds = model.suggested_bounds()[poi] if bounds is None else torch.as_tensor(bounds)[poi]
    if bracket is None:
        low, high = float(poi_bounds[0]), float(poi_bounds[1])
    else:
        low, high = (float(b) for b in bracket)
    low = max(low, 1e-9 * max(abs(high), 1.0))  # CLs is 1 at mu = 0 by construction
    six = (torch.arange(1, 6), torch.arange(5))

    calculator = AsymptoticCalculator(model, data, test_stat, init=init, bounds=bounds, fixed=fixed)

    def excess(mu: torch.Tensor) -> torch.Tensor:
        result = calculator.hypotest(mu)
        return torch.cat([result.cls_obs[:1], result.cls_exp[six]]) - alpha

    def log_ratio(mu: torch.Tensor) -> torch.Tensor:  # log(CLs / alpha): near-linear in mu
        return torch.log(torch.clamp(excess(mu) + alpha, min=1e-300)) - math.log(alpha)

    with torch.no_grad():
        # one batched hypotest on a grid brackets every curve, then Illinois on log CLs
        grid = torch.linspace(low, high, GRID_POINTS, dtype=model.dtype, device=model.device)
        result = calculator.hypotest(grid)
        curves = torch.cat([result.cls_obs[:, None], result.cls_exp], dim=1)  # (grid, 6)
        values = torch.log(torch.clamp(curves, min=1e-300)) - math.log(alpha)
        below = values < 0
        names = ["observed", "-2 sigma", "-1 sigma", "median", "+1 sigma", "+2 sigma"]
        for bad, where, end in [(~below[-1], "upper", high), (below[0], "lower", low)]:
            if bool(bad.any()):
                which = ", ".join(n for n, b in zip(names, bad.tolist(), strict=True) if b)
                raise InferenceError(
                    f"CLs at the {where} end of the bracket ({end:g}) does not bracket "
                    f"CLs = {alpha:g} for the {which} limit; widen the bracket or the POI bounds"
                )
        first = below.to(torch.int64).argmax(0)  # first grid point below alpha, per curve
        columns = torch.arange(6, device=grid.device)
        lo, hi = grid[first - 1], grid[first]
        f_lo, f_hi = values[first - 1, columns], values[first, columns]
        roots = _illinois(log_ratio, lo, hi, f_lo, f_hi, xtol=xtol, max_iter=max_iter)
    if not torch.is_grad_enabled():
        return roots
    mu = roots.clone().requires_grad_(True)
    value = excess(mu)
    (slope,) = torch.autograd.grad(value.sum(), mu, retain_graph=True)
    return roots - (value - value.detach()) / slope.detach()


def _illinois(f, a, b, fa, fb, *, xtol: float, max_iter: int) -> torch.Tensor:
    """Roots of the decreasing functions ``f`` (elementwise, batched) bracketed by ``[a, b]``."""
    side = torch.zeros_like(a)
    c = b
    for _ in range(max_iter):
        c_new = torch.where(fb != fa, (a * fb - b * fa) / (fb - fa), 0.5 * (a + b))
        c_new = torch.clamp(c_new, torch.minimum(a, b), torch.maximum(a, b))
        done = (c_new - c).abs() < xtol
        c = c_new
        if bool(done.all()):
            break
        fc = f(c)
        right = fc * fb > 0  # c replaces b
        fa = torch.where(right & (side == -1), fa / 2, fa)
        fb = torch.where(~right & (side == 1), fb / 2, fb)
        b, fb = torch.where(right, c, b), torch.where(right, fc, fb)
        a, fa = torch.where(right, a, c), torch.where(right, fa, fc)
        side = torch.where(right, -1.0, 1.0)
    return c


def upper_limit(
    model, data, cl: float = 0.95, test_stat: TestStat = "qtilde", **kwargs
) -> LimitResult:
    """Observed and expected upper limits as a :class:`LimitResult` (see :func:`upper_limits`)."""
    with torch.no_grad():
        limits = upper_limits(model, data, cl, test_stat, **kwargs).tolist()
    return LimitResult(cl, limits[0], tuple(limits[1:]))


def poi_uncertainty(model, data, *, init=None, bounds=None, fixed=None) -> torch.Tensor:
    """sigma_mu = sqrt(2 [H^-1]_mu,mu) at the best fit, H the Hessian of twice the NLL.

    Differentiable in grad mode (the best fit by the implicit function theorem, the Hessian with
    ``create_graph``). Parameters fixed or on a bound are left out of the inversion.
    """
    poi = require_poi(model)
    init, bounds, fixed = _settings(model, init, bounds, fixed)
    x, _ = free_fit(model, data, init=init, bounds=bounds, fixed=fixed)
    _, _, hessian = value_grad_hessian(
        TwiceNLL(model, data), x, create_graph=torch.is_grad_enabled()
    )
    scale = 1e-10 * torch.clamp(x.detach().abs(), min=1.0)
    on_bound = ((x.detach() - bounds[:, 0]).abs() <= scale) | (
        (bounds[:, 1] - x.detach()).abs() <= scale
    )
    free = ~fixed & ~on_bound
    free[poi] = True
    index = torch.nonzero(free).squeeze(-1)
    sub = hessian[..., index[:, None], index]
    position = int((index == poi).nonzero())
    covariance = 2 * torch.linalg.inv(sub)
    return torch.sqrt(covariance[..., position, position])


def scan(
    model,
    data,
    parameter: str,
    values=None,
    *,
    n_steps: int = 11,
    init=None,
    bounds=None,
    fixed=None,
) -> ScanResult:
    """Profile likelihood of ``parameter``: twice NLL at each value minus the global minimum.

    Default ``values``: ``n_steps`` points within best fit +- 2 post-fit uncertainties
    (cabinetry's default), clipped to the parameter's bounds; the uncertainty from the inverse
    Hessian at the best fit.
    """
    from analysis.fit import fit as single_fit

    if parameter not in model.par_names:
        raise ConfigError(
            f"unknown parameter '{parameter}'; parameters: {', '.join(model.par_names)}"
        )
    index = model.par_names.index(parameter)
    init, bounds, fixed = _settings(model, init, bounds, fixed)
    data = torch.as_tensor(data, dtype=model.dtype, device=model.device)
    best = single_fit(
        TwiceNLL(model, data),
        init,
        bounds=bounds,
        fixed=fixed,
        labels=model.par_names,
        method="newton",
    )
    center, width = float(best.bestfit[index]), float(best.uncertainty[index])
    if values is None and not math.isfinite(width):
        raise InferenceError(
            f"'{parameter}' has no parabolic uncertainty at the best fit (a degenerate "
            "direction of the likelihood), so the default range (best fit +- 2 sigma) does not "
            "exist; give the values (diffana scan --range LOW HIGH)"
        )
    if values is None:  # best fit +- 2 sigma, within the parameter's bounds
        low = max(center - 2 * width, float(bounds[index, 0]))
        high = min(center + 2 * width, float(bounds[index, 1]))
        values = torch.linspace(low, high, n_steps, dtype=model.dtype, device=model.device)
    values = torch.as_tensor(values, dtype=model.dtype, device=model.device)
    start = init.expand(values.shape[0], init.shape[0]).clone()
    start[:, index] = values
    fixed_scan = fixed.clone()
    fixed_scan[index] = True
    _, nll = minimize(model, data, start, bounds=bounds, fixed=fixed_scan, what="scan fit")
    return ScanResult(parameter, center, width, values, nll - best.twice_nll)


def ranking(model, data, fit_result, *, init=None, bounds=None, fixed=None) -> RankingResult:
    """Pre- and post-fit impacts of every nuisance parameter on the POI (cabinetry's ranking)."""
    poi = require_poi(model)
    init, bounds, fixed = _settings(model, init, bounds, fixed)
    data = torch.as_tensor(data, dtype=model.dtype, device=model.device)
    prefit = model.prefit_uncertainties()
    bestfit, uncertainty = fit_result.bestfit.to(init), fit_result.uncertainty.to(init)
    # the impacts are differences of two minima: take the nominal one from the same exact
    # minimiser as the refits (a MIGRAD minimum is only good to its EDM tolerance)
    nominal, _ = minimize(model, data, bestfit, bounds=bounds, fixed=fixed, what="nominal fit")
    nominal_poi = nominal[poi]
    rows = [i for i in range(model.npars) if i != poi]
    impacts = torch.zeros(len(rows), 4, dtype=init.dtype, device=init.device)
    for row, i in enumerate(rows):
        shifts = torch.stack([prefit[i], -prefit[i], uncertainty[i], -uncertainty[i]])
        needed = shifts != 0  # unconstrained (no pre-fit) or fixed parameters: impact 0
        if not bool(needed.any()) or bool(fixed[i]):
            continue
        start = init.expand(4, init.shape[0]).clone()
        start[:, i] = bestfit[i] + shifts
        start[:, i] = torch.minimum(torch.maximum(start[:, i], bounds[i, 0]), bounds[i, 1])
        # where the likelihood is not finite at that start (a template interpolated to a
        # negative bin), start the others from the best fit instead; where it is not finite
        # there either, that impact cannot be computed: NaN, with a warning
        bad = ~torch.isfinite(model.twice_nll(start, data))
        if bool(bad.any()):
            shifted = torch.arange(model.npars, device=start.device) == i
            start[bad] = torch.where(shifted, start[bad], bestfit)
            bad = ~torch.isfinite(model.twice_nll(start, data)) & needed
            for shift in torch.nonzero(bad).flatten().tolist():
                log.warning(
                    "ranking: no impact of %s at %s: the likelihood is not finite there",
                    model.par_names[i],
                    ("+prefit", "-prefit", "+postfit", "-postfit")[shift],
                )
        fit_rows = needed & ~bad
        fixed_i = fixed.clone()
        fixed_i[i] = True
        x, _ = minimize(
            model, data, start[fit_rows], bounds=bounds, fixed=fixed_i, what="ranking fit"
        )
        impacts[row] = torch.where(needed, torch.nan, 0.0).to(impacts)
        impacts[row, fit_rows] = x[:, poi] - nominal_poi
    labels = tuple(model.par_names[i] for i in rows)
    return RankingResult(labels, bestfit[rows], uncertainty[rows], *impacts.unbind(-1))


def poisson_logpdf(n: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """log Poisson(n | lam) with the continuous extension ``n log lam - lam - lgamma(n + 1)``."""
    return torch.xlogy(n, lam) - lam - torch.lgamma(n + 1)


def goodness_of_fit(model, data, twice_nll_best) -> GoodnessOfFit:
    """Saturated-model goodness of fit (cabinetry's convention, see the module docstring)."""
    from scipy import stats

    data = torch.as_tensor(data, dtype=model.dtype, device=model.device)
    init = model.suggested_init()
    main = data[..., : model.nmain]
    main_at_init = poisson_logpdf(main, model.expected_actualdata(init)).sum(-1)
    constraint = model.logpdf(init, data) - main_at_init
    saturated = -(poisson_logpdf(main, main).sum(-1) + constraint)
    delta = float(torch.as_tensor(twice_nll_best) - 2 * saturated)
    ndof = model.nmain - int(model.unconstrained_free_count())
    p_value = float(stats.chi2.sf(delta, ndof)) if ndof > 0 else math.nan
    return GoodnessOfFit(delta, ndof, p_value)
