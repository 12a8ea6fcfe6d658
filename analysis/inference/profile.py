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
