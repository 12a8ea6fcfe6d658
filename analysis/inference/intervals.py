"""Upper limits on the POI (pyhf's ``infer.intervals.upper_limits``).

The limit is the POI value where CLs = 1 - CL, found for all six curves (observed and the five
expected) together: batched hypotests on a grid bracket every crossing, then the Illinois
method (regula falsi) solves all six in batched calls of seven fits each
(:meth:`AsymptoticCalculator.limit_cls`). In grad mode the limits are differentiable by
implicit differentiation of the root. :func:`upper_limit_with_curve` adds the CLs curve through
the limits (pyhf's ``upper_limit`` with ``return_results``) from the same calculator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from analysis.inference.calculators import AsymptoticCalculator
from analysis.inference.results import HypotestResult, LimitResult
from analysis.inference.test_statistics import TestStat
from analysis.inference.utils import InferenceError
from analysis.numpy_backend.infer import CURVE_POINTS, GRID_CHUNK, GRID_POINTS  # both engines


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
    curves: Sequence[int] | None = None,
) -> torch.Tensor:
    """The POI values where CLs = 1 - ``cl``: tensor (6,), observed then expected -2..+2 sigma
    (:data:`LIMIT_CURVES`), or only those of ``curves`` (indices into them, in that order),
    which then alone must be bracketed.

    All six curves are solved together by the Illinois method (regula falsi that halves the
    stale end's value, superlinear and always bracketed): each step is one batched call of
    seven fixed-POI fits (:meth:`AsymptoticCalculator.limit_cls`). The default bracket is
    (0, upper POI bound); it must bracket every crossing, else :class:`InferenceError`. In
    grad mode the limits are differentiable in what the model and data were built from, by
    implicit differentiation of the root:
    ``d mu*/d phi = -(d CLs/d phi) / (d CLs/d mu)`` at ``mu*`` (one more batched hypotest).
    """
    calculator = AsymptoticCalculator(model, data, test_stat, init=init, bounds=bounds, fixed=fixed)
    return _limits(calculator, cl, bracket=bracket, xtol=xtol, max_iter=max_iter, curves=curves)


#: the six curves of :func:`upper_limits`, in the order of its result
LIMIT_CURVES = ("observed", "-2 sigma", "-1 sigma", "median", "+1 sigma", "+2 sigma")


def _limits(
    calculator: AsymptoticCalculator,
    cl: float,
    *,
    bracket,
    xtol: float,
    max_iter: int,
    curves: Sequence[int] | None = None,
) -> torch.Tensor:
    """:func:`upper_limits` with the fits of ``calculator`` (which caches the free fits).

    All six curves are evaluated together (one batched call per step); a curve left out of
    ``curves`` is held at a bracket of width 0, so its root is neither required nor searched."""
    model = calculator.model
    selection = list(range(6)) if curves is None else [int(c) for c in curves]
    wanted = torch.zeros(6, dtype=torch.bool, device=model.device)
    wanted[selection] = True
    alpha = 1.0 - cl
    poi_bounds = calculator.bounds[calculator.poi]
    if bracket is None:
        low, high = float(poi_bounds[0]), float(poi_bounds[1])
    else:
        low, high = (float(b) for b in bracket)
    low = max(low, 1e-9 * max(abs(high), 1.0))  # CLs is 1 at mu = 0 by construction

    def excess(mu: torch.Tensor) -> torch.Tensor:
        return calculator.limit_cls(mu) - alpha

    def log_ratio(mu: torch.Tensor) -> torch.Tensor:  # log(CLs / alpha): near-linear in mu
        return torch.log(torch.clamp(excess(mu) + alpha, min=1e-300)) - math.log(alpha)

    with torch.no_grad():
        # hypotests on a grid, GRID_CHUNK values per batched call from the low end up to the
        # first call where every curve has fallen below alpha, bracket every curve (the same
        # brackets as the whole grid, at a fraction of its fits where the limits lie far below
        # the upper POI bound); then Illinois on log CLs
        grid = torch.linspace(low, high, GRID_POINTS, dtype=model.dtype, device=model.device)
        chunks = []
        for chunk in grid.split(GRID_CHUNK):
            result = calculator.hypotest(chunk)
            chunks.append(torch.cat([result.cls_obs[:, None], result.cls_exp], dim=1))
            if bool((torch.cat(chunks) < alpha).any(0)[wanted].all()):
                break
        cls_grid = torch.cat(chunks)  # (grid values so far, 6)
        grid = grid[: cls_grid.shape[0]]
        values = torch.log(torch.clamp(cls_grid, min=1e-300)) - math.log(alpha)
        below = values < 0
        for bad, where, end in [(~below.any(0), "upper", high), (below[0], "lower", low)]:
            bad = bad & wanted
            if bool(bad.any()):
                which = ", ".join(n for n, b in zip(LIMIT_CURVES, bad.tolist(), strict=True) if b)
                raise InferenceError(
                    f"CLs at the {where} end of the bracket ({end:g}) does not bracket "
                    f"CLs = {alpha:g} for the {which} limit; widen the bracket or the POI bounds"
                )
        # first grid point below alpha, per curve (1 for the curves not wanted: any bracket)
        first = torch.where(wanted, below.to(torch.int64).argmax(0), 1)
        columns = torch.arange(6, device=grid.device)
        lo, hi = grid[first - 1], grid[first]
        f_lo, f_hi = values[first - 1, columns], values[first, columns]
        hi = torch.where(wanted, hi, lo)  # width 0: nothing to search
        f_hi = torch.where(wanted, f_hi, f_lo)
        roots = _illinois(log_ratio, lo, hi, f_lo, f_hi, xtol=xtol, max_iter=max_iter)
        # a curve not wanted sits at a wanted root: near mu = 0 its q is 0, whose sqrt has an
        # infinite derivative, and the backward pass below would multiply it by 0 (NaN)
        roots = torch.where(wanted, roots, roots[selection[0]])
    if not torch.is_grad_enabled():
        return roots[selection]
    mu = roots.clone().requires_grad_(True)
    value = excess(mu)
    (slope,) = torch.autograd.grad(value.sum(), mu, retain_graph=True)
    # select before dividing: a curve not wanted may have slope 0, whose 0 / 0 in the backward
    # pass would reach the model's graph as NaN
    value, slope = value[selection], slope[selection]
    return roots[selection] - (value - value.detach()) / slope.detach()


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


def upper_limit_with_curve(
    model,
    data,
    cl: float = 0.95,
    test_stat: TestStat = "qtilde",
    *,
    n_points: int = CURVE_POINTS,
    xtol: float = 1e-5,
    init=None,
    bounds=None,
    fixed=None,
) -> tuple[LimitResult, HypotestResult]:
    """The limits (:func:`upper_limit`) and the CLs curve through them: hypotests at
    ``n_points`` POI values from 0 to 1.5 times the largest limit (at most the upper POI bound),
    the Brazil plot of pyhf's ``upper_limit(..., return_results=True)``.

    One :class:`AsymptoticCalculator` does both: the free fits to the data and to the Asimov
    data, and the fit that defines the Asimov data, are made once, and the curve is one batched
    call of the fixed-POI fits at its points.
    """
    calculator = AsymptoticCalculator(model, data, test_stat, init=init, bounds=bounds, fixed=fixed)
    with torch.no_grad():
        limits = _limits(calculator, cl, bracket=None, xtol=xtol, max_iter=100).tolist()
        top = min(1.5 * max(limits), float(calculator.bounds[calculator.poi, 1]))
        grid = torch.linspace(0.0, top, n_points, dtype=model.dtype, device=model.device)
        curve = calculator.hypotest(grid)
    return LimitResult(cl, limits[0], tuple(limits[1:])), curve
