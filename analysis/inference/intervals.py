"""Upper limits on the POI (pyhf's ``infer.intervals.upper_limits``).

The limit is the POI value where CLs = 1 - CL, found for all six curves (observed and the five
expected) together: one batched hypotest on a grid brackets every crossing, then the Illinois
method (regula falsi) solves all six in batched hypotests. In grad mode the limits are
differentiable by implicit differentiation of the root.
"""

from __future__ import annotations

import math

import torch

from analysis.inference.calculators import AsymptoticCalculator
from analysis.inference.results import LimitResult
from analysis.inference.test_statistics import TestStat
from analysis.inference.utils import InferenceError, require_poi

#: POI values of the batched scan that brackets each limit before root finding
GRID_POINTS = 21


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
