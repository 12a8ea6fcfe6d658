"""Batched projected Newton fits of a :class:`~analysis.numpy_backend.model.NumpyModel`: the
algorithm of :func:`analysis.fit.newton_minimize`, in numpy.

Each row of ``start`` (B, P) is one fit with the exact Hessian of twice the NLL; bounds are kept
by an active set (parameters on a bound with the gradient pushing outwards are snapped onto it);
the step is the Newton direction on the free parameters (the saddle-free eigenvalue floor where
the Hessian is not positive definite, a Levenberg term after failed line searches), projected
onto the box, with an Armijo backtracking line search. Convergence: positive-definite free
Hessian, Newton decrement ``edm = g^T H^-1 g / 2 <= tol`` and a settled objective (the last
step changed it by at most ``tol * max(1, |f|)``, or was a full undamped Newton step that
decreased it by its predicted edm to within half); a converged row takes one polishing step.
Models with kinked parameters (histosys code0, normsys code1) are fitted from three starts (0,
+0.5, -0.5 on those parameters) and the lowest converged minimum is kept, as
:func:`analysis.inference.mle.minimize` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.numpy_backend import Unsupported
from analysis.numpy_backend.model import NumpyModel

#: offsets (in units of the constraint width) of the extra starts for kinked parameters, on
#: both engines (analysis.inference.mle imports it from here)
KINK_STARTS = (0.5, -0.5)

#: Newton iterations after which a fit counts as not converged, on both engines (analysis.fit
#: imports it from here). A well-posed fit takes 3-10; a fit whose path runs along the barrier
#: of a bin whose prediction nearly vanishes (backgrounds that cancel, with negative weights)
#: takes many short steps there: 150-190 on the demo's ntuples at 10,000 events with the muon
#: systematics on fewer samples, where a cap of 100 left fits short of their minimum
MAX_ITERATIONS = 300

#: the saddle-free Newton step's floor on the |eigenvalues| of an indefinite Hessian, relative
#: to the largest, on both engines: small enough to resolve curvatures of order 1 next to a
#: nearly vanishing bin's 1e13 (eigh resolves eigenvalues to ~1e-16 of the largest), where the
#: floor of 1e-10 that this replaced (3e3 there) shrank every step in the well-measured
#: directions and stalled the fit
EIGENVALUE_FLOOR = 1e-14


@dataclass(frozen=True)
class Minimum:
    """Fitted parameters (B, P), twice NLL (B,), convergence (B,), the Hessian at the minimum
    (B, P, P) and the parameters held on a bound (B, P)."""

    x: np.ndarray
    fun: np.ndarray
    converged: np.ndarray
    hessian: np.ndarray
    active: np.ndarray


def _direction(hess, grad, free, damping):
    """Newton direction on the free parameters and whether ``H_FF + damping`` is positive
    definite: ``-(H_FF + d)^-1 g_F`` by Cholesky when every row's matrix is positive
    definite, else through the eigen-decomposition, eigenvalues floored at
    ``max(|e - d|, EIGENVALUE_FLOOR max|e|) + d`` (a descent direction where H is indefinite)."""
    pair = free[:, :, None] & free[:, None, :]
    eye = np.eye(hess.shape[-1])
    matrix = np.where(pair, hess, 0.0) + eye * np.where(free, damping[:, None], 1.0)[:, :, None]
    g = np.where(free, grad, 0.0)
    try:  # positive definite everywhere (the usual case): Cholesky, as the torch engine
        np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        pass
    else:
        direction = -np.linalg.solve(matrix, g[:, :, None])[:, :, 0]
        ok = np.ones(len(g), dtype=bool)
        return np.where(free & np.isfinite(direction), direction, 0.0), ok
    evals, evecs = np.linalg.eigh(matrix)
    positive = (evals > 0).all(-1)
    scale = np.maximum(np.abs(evals).max(-1, keepdims=True), np.finfo(float).tiny)
    d = damping[:, None]
    floored = np.maximum(np.abs(evals - d), EIGENVALUE_FLOOR * scale) + d
    coef = np.einsum("bpk,bp->bk", evecs, g) / floored
    direction = -np.einsum("bpk,bk->bp", evecs, coef)
    return np.where(free & np.isfinite(direction), direction, 0.0), positive


def _finite(derivatives: tuple) -> tuple:
    """The value, gradient and Hessian if all are finite; else :class:`Unsupported` (a start
    where the likelihood is not finite, e.g. a bin with data and no expected events: the torch
    engine reports or works around it)."""
    if not all(np.isfinite(d).all() for d in derivatives):
        raise Unsupported("twice NLL or its derivatives not finite at a fit point")
    return derivatives


def newton(
    model: NumpyModel, data, start, bounds, fixed, *, max_iter: int = MAX_ITERATIONS, tol=1e-10
):
    """Projected Newton fits from every row of ``start`` (B, P) to ``data`` ((N,) or (B, N));
    ``fixed`` (P,) or (B, P). Returns a :class:`Minimum`."""
    x = np.array(start, dtype=float)
    batch, npars = x.shape
    lo, hi = bounds[:, 0], bounds[:, 1]
    fixed = np.broadcast_to(fixed, x.shape)
    eps = np.finfo(float).eps
    snap_lo, snap_hi = lo + 1e-10 * (1.0 + np.abs(lo)), hi - 1e-10 * (1.0 + np.abs(hi))
    value, grad, hess = _finite(model.twice_nll_derivatives(x, data))
    done = np.zeros(batch, dtype=bool)
    damping = np.zeros(batch)
    delta_f = np.full(batch, np.inf)
    stalled = np.zeros(batch, dtype=bool)
    quadratic_step = np.zeros(batch, dtype=bool)  # the last step decreased f as predicted
    active = np.zeros_like(fixed)
    for k in range(max_iter + 1):
        active = ~fixed & (((x <= snap_lo) & (grad > 0)) | ((x >= snap_hi) & (grad < 0)))
        free = ~fixed & ~active
        step_newton, positive = _direction(hess, grad, free, np.zeros(batch))
        edm = -0.5 * (np.where(free, grad, 0.0) * step_newton).sum(-1)
        small = np.abs(delta_f) <= tol * np.maximum(np.abs(value), 1.0)
        settled = stalled | small | quadratic_step
        newly = ~done & positive & (edm <= tol) & settled
        done = done | newly
        pending = ~done | newly
        if k == max_iter or not pending.any():
            break
        direction = step_newton
        damped = ~done & (damping > 0)
        if damped.any():
            scale = np.abs(np.diagonal(hess, axis1=-2, axis2=-1)).max(-1)
            direction = direction.copy()
            direction[damped], _ = _direction(
                hess[damped], grad[damped], free[damped], (damping * scale)[damped]
            )
        target = np.where(active & (grad > 0), lo, np.where(active, hi, x))
        step = np.where(active, target - x, direction)
        accepted = np.zeros(batch, dtype=bool)
        full = np.zeros(batch, dtype=bool)  # accepted with alpha = 1
        new_x, new_value = x.copy(), value.copy()
        newton_step = positive & (damping == 0)  # the undamped Newton direction, predicting edm
        quadratic = newton_step & (edm <= tol)
        allowance = 8 * eps * np.maximum(np.abs(value), 1.0)
        alpha = 1.0
        for _ in range(40):
            trial = np.where(fixed, x, np.clip(x + alpha * step, lo, hi))
            with np.errstate(all="ignore"):
                trial_value = model.twice_nll(trial, data)
            decrease = (grad * (trial - x)).sum(-1)
            sufficient = trial_value <= value + 1e-4 * decrease + allowance
            if alpha == 1.0:
                sufficient = sufficient | quadratic
            ok = pending & ~accepted & np.isfinite(trial_value) & sufficient
            new_x = np.where(ok[:, None], trial, new_x)
            new_value = np.where(ok, trial_value, new_value)
            accepted = accepted | ok
            full = full | (ok & (alpha == 1.0))
            if (accepted | ~pending).all():
                break
            alpha *= 0.5
        failed = pending & ~accepted
        damping = np.where(
            failed, np.maximum(10 * damping, 1e-3), np.where(damping >= 1e-6, damping / 10, 0.0)
        )
        with np.errstate(invalid="ignore"):  # NaN edm where H is not positive definite
            agrees = np.abs((value - new_value) - edm) <= 0.5 * edm
        quadratic_step = accepted & full & newton_step & agrees
        delta_f = np.where(accepted, new_value - value, delta_f)
        stalled = failed
        x = new_x
        value, grad, hess = _finite(model.twice_nll_derivatives(x, data))
    return Minimum(x=x, fun=value, converged=done, hessian=hess, active=active)


def minimize(model: NumpyModel, data, start, bounds, fixed) -> Minimum:
    """:func:`newton` from ``start`` (B, P), and for a model with kinked free parameters also
    from ``start`` shifted by :data:`KINK_STARTS` on them; per row the lowest converged
    minimum. Data ``(N,)`` or ``(B, N)``; fixed ``(P,)`` or ``(B, P)``."""
    start = np.asarray(start, dtype=float)
    fixed = np.broadcast_to(fixed, start.shape)
    kinked = model.kinked_parameters() & ~fixed
    if not kinked.any():
        return newton(model, data, start, bounds, fixed)
    starts = [start] + [start + np.where(kinked, d, 0.0) for d in KINK_STARTS]
    starts = [np.where(fixed, start, np.clip(s, bounds[:, 0], bounds[:, 1])) for s in starts]
    n = start.shape[0]
    data = np.asarray(data, dtype=float)
    stacked_data = data if data.ndim == 1 else np.concatenate([data] * 3)
    result = newton(
        model, stacked_data, np.concatenate(starts), bounds, np.concatenate([fixed] * 3)
    )
    fun = np.where(result.converged, result.fun, np.inf).reshape(3, n)
    best = fun.argmin(0) * n + np.arange(n)
    return Minimum(
        x=result.x[best],
        fun=result.fun[best],
        converged=result.converged.reshape(3, n).any(0),
        hessian=result.hessian[best],
        active=result.active[best],
    )
