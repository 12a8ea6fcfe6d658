"""What the profile likelihood around the best fit says: likelihood scans, the POI uncertainty,
the ranking of nuisance parameters by their impact on the POI, and the goodness of fit.

- Scan: twice the NLL with the parameter fixed at each value and the others profiled, minus
  the global minimum (default values: best fit +- 2 post-fit uncertainties, as cabinetry).
- POI uncertainty: ``sigma_mu = sqrt(2 [H^-1]_mu,mu)`` at the best fit, H the Hessian of twice
  the NLL (the inverse Fisher information), differentiable in what the model was built from.
- Ranking: the POI shift when one nuisance parameter is fixed at its best fit +- its pre-fit
  (constraint) or post-fit uncertainty and the others refitted (cabinetry ``fit.ranking``).
- Goodness of fit: saturated model, ``2 (NLL_best - NLL_sat)`` with the Poisson terms at
  ``lambda = n`` and the constraint terms at the suggested initial parameters, chi2 with
  ``n_bins - n_unconstrained`` degrees of freedom (cabinetry ``fit._goodness_of_fit``).
"""

from __future__ import annotations

import logging
import math

import torch

from analysis.errors import ConfigError
from analysis.fit import value_grad_hessian
from analysis.inference.mle import free_fit, minimize
from analysis.inference.results import GoodnessOfFit, RankingResult, ScanResult
from analysis.inference.utils import InferenceError, _settings, require_poi
from analysis.likelihood.model import TwiceNLL

log = logging.getLogger(__name__)


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
    Hessian at the best fit, or, for a parameter held on a bound, the one-sided profile error
    (:func:`analysis.fit.fit` with ``poi=parameter``).
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
        poi=parameter,  # on a bound: the one-sided profile error, not NaN
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


#: refits per batched call of :func:`ranking`. The structured derivatives cost about 2.5 ms per
#: row from 8 rows on (3.9 ms at 1) on ANA-SUSY-2018-16 (219 parameters), while a batch
#: iterates until its slowest row has converged: small batches waste fewer iterations, down
#: to where the per-call overhead shows (measured there, one thread, whole ranking: 11-18 s at
#: 8 rows, 17 s at 24)
RANKING_BATCH = 8

#: the four impacts of a parameter, in :class:`RankingResult` order
_IMPACT_NAMES = ("+prefit", "-prefit", "+postfit", "-postfit")


def ranking(model, data, fit_result, *, init=None, bounds=None, fixed=None) -> RankingResult:
    """Pre- and post-fit impacts of every nuisance parameter on the POI (cabinetry's ranking).

    For each nuisance parameter ``i`` (not the POI, not fixed) and each shift ``d`` in
    (+pre-fit, -pre-fit, +post-fit, -post-fit) uncertainty, ``i`` is fixed at
    ``bestfit_i + d`` (clipped to its bounds), the other parameters refitted, and the impact is
    ``mu_hat(i fixed) - mu_hat``; 0 where ``d`` is 0 (no constraint, so no pre-fit
    uncertainty) and for fixed parameters, NaN with a warning where the likelihood is not finite
    at the shifted point. ``mu_hat`` is the exact minimum from ``fit_result.bestfit`` (a MIGRAD
    minimum is only good to its EDM tolerance, and impacts are differences of two minima).

    The refits run as batched calls of :data:`RANKING_BATCH` rows, each row with its own fixed
    mask, started where the quadratic approximation at the minimum puts the conditional
    minimum (:func:`_conditional_starts`): a few Newton steps from there, where cabinetry
    starts every refit from ``init``. Where the likelihood has one minimum per fixed value (the
    smooth interpolations) both reach the same point; kinked models are still multi-started by
    :func:`~analysis.inference.mle.minimize`.
    """
    poi = require_poi(model)
    init, bounds, fixed = _settings(model, init, bounds, fixed)
    data = torch.as_tensor(data, dtype=model.dtype, device=model.device)
    prefit = model.prefit_uncertainties()
    bestfit, uncertainty = fit_result.bestfit.to(init), fit_result.uncertainty.to(init)
    nominal, _ = minimize(model, data, bestfit, bounds=bounds, fixed=fixed, what="nominal fit")
    nominal_poi, nominal = nominal[poi], nominal.detach()
    rows = torch.tensor([i for i in range(model.npars) if i != poi], device=init.device)
    shifts = torch.stack(
        [prefit[rows], -prefit[rows], uncertainty[rows], -uncertainty[rows]], dim=-1
    )  # (parameters, 4)
    needed = (shifts != 0) & ~fixed[rows, None]
    row, column = torch.nonzero(needed, as_tuple=True)
    which = rows[row]  # the parameter fixed in each refit
    refits = torch.arange(which.numel(), device=init.device)
    value = torch.minimum(
        torch.maximum(bestfit[which] + shifts[row, column], bounds[which, 0]), bounds[which, 1]
    )
    fixed_rows = fixed.expand(which.numel(), model.npars).clone()
    fixed_rows[refits, which] = True
    moved = nominal.expand(which.numel(), model.npars).clone()
    moved[refits, which] = value
    start = _conditional_starts(model, data, nominal, which, value, bounds, fixed)
    start = torch.where(torch.isfinite(model.twice_nll(start, data))[:, None], start, moved)
    good = torch.isfinite(model.twice_nll(start, data))
    for k in torch.nonzero(~good).flatten().tolist():
        log.warning(
            "ranking: no impact of %s at %s: the likelihood is not finite there",
            model.par_names[int(which[k])],
            _IMPACT_NAMES[int(column[k])],
        )
    impacts = torch.where(needed, torch.nan, 0.0).to(init)
    for chunk in torch.nonzero(good).flatten().split(RANKING_BATCH):
        x, _ = minimize(
            model, data, start[chunk], bounds=bounds, fixed=fixed_rows[chunk], what="ranking fit"
        )
        impacts[row[chunk], column[chunk]] = x[:, poi] - nominal_poi
    labels = tuple(model.par_names[i] for i in rows.tolist())
    return RankingResult(labels, bestfit[rows], uncertainty[rows], *impacts.unbind(-1))


def _conditional_starts(model, data, nominal, which, value, bounds, fixed) -> torch.Tensor:
    """Start points (R, P) for the fits with parameter ``which[r]`` fixed at ``value[r]``: the
    minimum of the quadratic approximation of twice the NLL at the free minimum ``nominal``.

    With ``C = H_FF^-1`` (F: the parameters neither fixed nor on a bound at ``nominal``) the
    minimum over the others with ``x_i`` fixed at ``nominal_i + delta`` lies at
    ``nominal + C[:, i] / C[i, i] * delta`` (Schur complement: ``-H_rr^-1 H_ri = C_ri / C_ii``);
    it is the linear response that the post-fit correlations describe, clipped to the bounds.
    Where H_FF is not positive definite (a degenerate direction), or ``i`` is on a bound, the
    start is ``nominal`` with only ``x_i`` moved.
    """
    moved = nominal.expand(which.numel(), model.npars).clone()
    refits = torch.arange(which.numel(), device=nominal.device)
    moved[refits, which] = value
    _, _, hessian = value_grad_hessian(TwiceNLL(model, data), nominal)
    scale = 1e-10 * (1.0 + nominal.abs())
    on_bound = (nominal - bounds[:, 0] <= scale) | (bounds[:, 1] - nominal <= scale)
    free = torch.nonzero(~fixed & ~on_bound).flatten()
    chol, info = torch.linalg.cholesky_ex(hessian[free[:, None], free])
    if int(info) != 0:
        return moved
    inverse = torch.cholesky_inverse(chol)
    position = torch.full((model.npars,), -1, dtype=torch.int64, device=nominal.device)
    position[free] = torch.arange(free.numel(), device=nominal.device)
    k = position[which]
    usable = k >= 0
    k = k.clamp_min(0)
    response = inverse[:, k].T / inverse[k, k].unsqueeze(-1)  # (R, |F|)
    delta = torch.where(usable, value - nominal[which], 0.0)
    start = nominal.expand(which.numel(), model.npars).clone()
    start[:, free] += response * delta.unsqueeze(-1)
    start = torch.minimum(torch.maximum(start, bounds[:, 0]), bounds[:, 1])
    start = torch.where(fixed, nominal, start)
    start[refits, which] = value
    return torch.where(usable.unsqueeze(-1), start, moved)


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
