"""Asymptotic hypothesis tests, discovery significance, upper limits and the global fit on the
numpy backend: :mod:`analysis.inference`'s calculators and intervals, in numpy, with the same
fits from the same starts and the same formulae, returning the dictionaries that the commands
write (the result records' ``to_dict``).

Asymptotics (Cowan, Cranmer, Gross, Vitells, arXiv:1007.1727): with ``s = sqrt(q)`` and
``s_A = sqrt(q_A)``, ``t = s - s_A`` (q, q0) and for q~ ``t = (q - q_A) / (2 s_A)`` when
``s > s_A``; ``CLs+b = Phi(-(t + s_A))``, ``CLb = Phi(-t)``; the expected band at
``t = 2, 1, 0, -1, -2``. The Asimov data are the model's expectation at the fit to the data with
the POI fixed at 0 (1 for q0). ``Phi`` is ``erfc(-x / sqrt 2) / 2``, exact in the tails down
to 1e-308, so ``Z = sqrt(q0)`` stays finite however large.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from analysis.numpy_backend import Unsupported
from analysis.numpy_backend.fit import minimize
from analysis.numpy_backend.model import NumpyModel

#: pyhf's order of the expected band (-mu_hat/sigma = +2 .. -2): CLs from -2 to +2 sigma; these
#: constants are the torch engine's too (analysis.inference imports them from here)
BAND_NSIGMA = (2.0, 1.0, 0.0, -1.0, -2.0)
#: the limits' bracketing grid, evaluated GRID_CHUNK values at a time (analysis.inference)
GRID_POINTS, GRID_CHUNK = 21, 5
#: POI values of the CLs curve through the limits, from 0 to 1.5 times the largest
CURVE_POINTS = 31
#: the torch engine calls a unit-diagonal Hessian eigenvalue below 1e-9 degenerate and warns
#: (analysis.fit); a fit here can end 1e-5 away along a flat direction, where the eigenvalue is
#: still ~1e-5, so anything below this goes to the torch engine
NEAR_SINGULAR_EIGENVALUE = 1e-4


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Phi(x) through erfc, accurate in both tails."""
    flat = np.asarray(x, dtype=float)
    return np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in flat.ravel()]).reshape(
        flat.shape
    )


def _require_converged(result: Any, what: str) -> None:
    if not result.converged.all():
        raise Unsupported(f"a {what} did not converge")


class Calculator:
    """One model and dataset, any tested POI values (the torch engine's
    :class:`~analysis.inference.AsymptoticCalculator`): the free fit to the data, the fit that
    defines the Asimov data and the free fit to the Asimov data are made once."""

    def __init__(self, model: NumpyModel, data: np.ndarray, test_stat: str) -> None:
        if model.poi_index is None:
            raise Unsupported("no POI")
        self.model, self.data, self.test_stat = model, np.asarray(data, float), test_stat
        self.poi = model.poi_index
        self.init = model.suggested_init()
        self.bounds = model.suggested_bounds()
        self.fixed = model.suggested_fixed()
        with np.errstate(all="ignore"):
            start_value = model.twice_nll(self.init, self.data)
        if not np.isfinite(start_value):
            raise Unsupported("twice NLL not finite at the start")
        asimov_poi = 1.0 if test_stat == "q0" else 0.0
        start = np.stack([self.init, self.init])
        start[1, self.poi] = asimov_poi
        fixed = np.stack([self.fixed, self.fixed])
        fixed[1, self.poi] = True
        fits = minimize(model, self.data, start, self.bounds, fixed)
        _require_converged(fits, "fit")
        self.free = (fits.x[0], fits.fun[0])
        self.asimov = model.expected_data(fits.x[1])
        own = np.clip(fits.x[1], self.bounds[:, 0], self.bounds[:, 1])
        fit_a = minimize(model, self.asimov, own[None], self.bounds, self.fixed)
        _require_converged(fit_a, "fit")
        self.free_asimov = (fit_a.x[0], fit_a.fun[0])

    def _fixed_poi_nll(self, data: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Twice NLL of the fits with the POI fixed at ``values``, from ``init``; ``data``
        ``(N,)`` or one row per value."""
        start = np.repeat(self.init[None], values.size, axis=0)
        start[:, self.poi] = values
        fixed = np.repeat(self.fixed[None], values.size, axis=0)
        fixed[:, self.poi] = True
        fits = minimize(self.model, data, start, self.bounds, fixed)
        _require_converged(fits, "fixed-POI fit")
        return fits.fun

    def _statistic(self, nll: np.ndarray, free: tuple, mu: np.ndarray) -> np.ndarray:
        t = np.maximum(nll - free[1], 0.0)
        mu_hat = free[0][self.poi]
        if self.test_stat == "q0":
            return np.where(mu_hat < 0, 0.0, t)
        return np.where(mu_hat > mu, 0.0, t)

    def cls(self, q: np.ndarray, q_asimov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CLs (the q0 p-value for q0) and the expected band (..., 5)."""
        s, s_a = np.sqrt(q), np.sqrt(q_asimov)
        if self.test_stat == "qtilde":
            safe = np.where(s_a > 0, s_a, 1.0)
            t = np.where(s <= s_a, s - s_a, (q - q_asimov) / (2 * safe))
        else:
            t = s - s_a
        clsb, clb = normal_cdf(-(t + s_a)), normal_cdf(-t)
        n = np.asarray(BAND_NSIGMA)
        clsb_exp = normal_cdf(-(n + s_a[..., None]))
        clb_exp = normal_cdf(-n)
        if self.test_stat == "q0":
            return clsb, clsb_exp
        return clsb / clb, clsb_exp / clb_exp

    def hypotest(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q, CLs, expected CLs (n, 5)) at the POI ``values`` (n,)."""
        values = np.asarray(values, dtype=float).reshape(-1)
        n = values.size
        data = np.concatenate(
            [np.repeat(self.data[None], n, 0), np.repeat(self.asimov[None], n, 0)]
        )
        nll = self._fixed_poi_nll(data, np.concatenate([values, values]))
        q = self._statistic(nll[:n], self.free, values)
        q_a = self._statistic(nll[n:], self.free_asimov, values)
        cls, cls_exp = self.cls(q, q_a)
        return q, cls, cls_exp

    def limit_cls(self, values: np.ndarray) -> np.ndarray:
        """CLs of the six limit curves, each at its own value: the observed at ``values[0]``,
        the expected -2..+2 sigma at ``values[1:]`` (seven fixed-POI fits)."""
        data = np.concatenate([self.data[None], np.repeat(self.asimov[None], 6, 0)])
        nll = self._fixed_poi_nll(data, np.concatenate([values[:1], values]))
        q = self._statistic(nll[:1], self.free, values[:1])
        q_a = self._statistic(nll[1:], self.free_asimov, values)
        cls, _ = self.cls(np.concatenate([q, q_a[1:]]), q_a)
        _, cls_exp = self.cls(q_a, q_a)
        return np.concatenate([cls[:1], cls_exp[np.arange(1, 6), np.arange(5)]])


def hypotest(model: NumpyModel, data: np.ndarray, poi_value: float, test_stat: str) -> dict:
    """``diffana hypotest``'s output at ``poi_value``."""
    calc = Calculator(model, data, test_stat)
    q, cls, cls_exp = calc.hypotest(np.array([poi_value]))
    return {
        "poi_value": float(poi_value),
        "test_stat": test_stat,
        "teststat": float(q[0]),
        "cls_obs": float(cls[0]),
        "cls_exp": cls_exp[0].tolist(),
    }


def significance(model: NumpyModel, data: np.ndarray) -> dict:
    """``diffana significance``'s output: ``Z = sqrt(q0)`` observed and (mu = 1) expected."""
    calc = Calculator(model, data, "q0")
    nll = calc._fixed_poi_nll(np.stack([calc.data, calc.asimov]), np.zeros(2))
    z = [
        math.sqrt(max(float(calc._statistic(nll[i : i + 1], free, np.zeros(1))[0]), 0.0))
        for i, free in enumerate((calc.free, calc.free_asimov))
    ]
    p = [0.5 * math.erfc(v / math.sqrt(2.0)) for v in z]
    return {
        "observed": {"p_value": p[0], "significance": z[0]},
        "expected": {"p_value": p[1], "significance": z[1]},
    }


def upper_limit_with_curve(model: NumpyModel, data: np.ndarray, cl: float) -> dict:
    """``diffana limit``'s output: the observed and expected limits (where CLs = 1 - cl, by
    the Illinois method on log CLs within the bracket of a grid over the POI bounds) and the
    CLs curve at :data:`CURVE_POINTS` values from 0 to 1.5 times the largest limit."""
    calc = Calculator(model, data, "qtilde")
    alpha = 1.0 - cl
    low, high = (float(b) for b in calc.bounds[calc.poi])
    low = max(low, 1e-9 * max(abs(high), 1.0))
    grid = np.linspace(low, high, GRID_POINTS)
    rows = []
    for start in range(0, GRID_POINTS, GRID_CHUNK):
        _, cls, cls_exp = calc.hypotest(grid[start : start + GRID_CHUNK])
        rows.append(np.concatenate([cls[:, None], cls_exp], axis=1))
        if (np.concatenate(rows) < alpha).any(0).all():
            break
    curves = np.concatenate(rows)
    grid = grid[: curves.shape[0]]
    values = np.log(np.maximum(curves, 1e-300)) - math.log(alpha)
    below = values < 0
    if not below.any(0).all() or below[0].any():
        raise Unsupported("the POI bounds do not bracket every limit")
    first = below.argmax(0)
    columns = np.arange(6)
    a, b = grid[first - 1], grid[first]
    fa, fb = values[first - 1, columns], values[first, columns]

    def log_ratio(mu: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(calc.limit_cls(mu), 1e-300)) - math.log(alpha)

    roots = _illinois(log_ratio, a, b, fa, fb, xtol=1e-5, max_iter=100)
    top = min(1.5 * float(roots.max()), high)
    curve = np.linspace(0.0, top, CURVE_POINTS)
    _, cls, cls_exp = calc.hypotest(curve)
    return {
        "cl": cl,
        "observed": float(roots[0]),
        "expected": roots[1:].tolist(),
        "scan": {
            "poi_values": curve.tolist(),
            "cls_obs": cls.tolist(),
            "cls_exp": cls_exp.tolist(),
        },
    }


def _illinois(f, a, b, fa, fb, *, xtol: float, max_iter: int) -> np.ndarray:
    """Roots of the decreasing functions ``f`` bracketed by ``[a, b]`` (regula falsi that
    halves the stale end's value), elementwise, as :func:`analysis.inference.intervals`."""
    side = np.zeros_like(a)
    c = b
    for _ in range(max_iter):
        with np.errstate(all="ignore"):
            c_new = np.where(fb != fa, (a * fb - b * fa) / (fb - fa), 0.5 * (a + b))
        c_new = np.clip(c_new, np.minimum(a, b), np.maximum(a, b))
        done = np.abs(c_new - c) < xtol
        c = c_new
        if done.all():
            break
        fc = f(c)
        right = fc * fb > 0
        fa = np.where(right & (side == -1), fa / 2, fa)
        fb = np.where(~right & (side == 1), fb / 2, fb)
        b, fb = np.where(right, c, b), np.where(right, fc, fb)
        a, fa = np.where(right, a, c), np.where(right, fa, fc)
        side = np.where(right, -1.0, 1.0)
    return c


def global_fit(model: NumpyModel, data: np.ndarray, init: np.ndarray, fixed: np.ndarray) -> dict:
    """``diffana fit``'s output (``--method newton``, no MINOS): the minimum, the covariance
    ``2 H_FF^-1`` of the free parameters, their uncertainties and correlations. Unsupported
    (the torch engine's cases) when the fit does not converge, a free parameter ends on a bound
    or the free Hessian is degenerate."""
    with np.errstate(all="ignore"):
        start_value = model.twice_nll(init, data)
    if not np.isfinite(start_value):
        raise Unsupported("twice NLL not finite at the start")
    result = minimize(model, data, init[None], model.suggested_bounds(), fixed)
    _require_converged(result, "fit")
    if (result.active[0] & ~fixed).any():
        raise Unsupported("a parameter on a bound")
    free = np.nonzero(~fixed)[0]
    h = result.hessian[0][np.ix_(free, free)]
    scale = 1.0 / np.sqrt(np.maximum(np.diagonal(h), np.finfo(float).tiny))
    if np.linalg.eigvalsh(h * scale[:, None] * scale[None, :]).min() <= NEAR_SINGULAR_EIGENVALUE:
        raise Unsupported("a (nearly) degenerate Hessian")
    cov = np.zeros((model.npars, model.npars))
    cov[np.ix_(free, free)] = 2.0 * np.linalg.inv(h)
    cov = 0.5 * (cov + cov.T)
    sigma = np.sqrt(np.maximum(np.diagonal(cov), 0.0))
    return {
        "labels": list(model.par_names),
        "bestfit": result.x[0].tolist(),
        "uncertainty": sigma.tolist(),
        "corr_mat": (cov / (np.outer(sigma, sigma) + 1e-100)).tolist(),
        "twice_nll": float(result.fun[0]),
        "minos": {},
        "converged": True,
        "at_bound": [False] * model.npars,
    }
