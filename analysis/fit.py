"""Maximum-likelihood fits: a batched torch Newton minimiser, iminuit, and gradients through fits.

Every fit here minimises a *batched objective* ``twice_nll(pars) -> Tensor``: ``pars`` has shape
``(..., P)`` and the result shape ``(...)``, one independent problem per leading index (toys,
hypotheses, scan points). The objective is ``-2 log L``, so one standard deviation is where it
rises by 1 (Minuit's ``errordef = 1``) and the covariance is ``2 H^-1`` with ``H`` the Hessian
of ``twice_nll`` in the free parameters. Fits run in float64 (float32 fits converge to wrong
points, pyhf PR #1306) on the device of ``init``.

* :func:`newton_minimize` -- torch-native projected Newton with a line search, batched over any
  leading dimensions and bound-aware; the fast path (toys, scans, the optimisation loop).
* :func:`fit` -- one fit as a :class:`FitResult`, by MIGRAD + HESSE (+ MINOS) with the torch
  gradient handed to Minuit (``method="minuit"``, the numbers we publish, with cabinetry's
  settings), or by :func:`newton_minimize` with the exact autograd
  Hessian (``method="newton"``). :func:`fit_model` does the same for a likelihood model.
* :func:`fitted_parameters` -- the best-fit point as a differentiable function of external
  tensors (yields, systematic templates), by the implicit function theorem.

Gradients through fits
----------------------
*Profiled likelihood values need nothing special.* At a minimum ``grad_theta f = 0``, so the
total derivative of ``f(theta_hat(phi), phi)`` is its partial derivative in ``phi`` (envelope
theorem). Evaluate ``twice_nll_of(theta_hat.detach(), *params)`` and back-propagate; that is
exact for every parameter that is free at the minimum and for those held fixed or on an active
bound (their ``theta_hat`` does not move to first order).

*Fitted parameters* (the POI at the best fit, the Hessian at a conditional fit for sigma_mu, a
limit found by root finding) need ``d theta_hat / d phi``. Differentiating the stationarity
condition ``grad_theta f(theta_hat(phi), phi) = 0`` gives the implicit function theorem

    d theta_hat / d phi = - H^-1  d(grad_theta f) / d phi,      H = d^2 f / d theta^2,

restricted to the free parameters that are not on an active bound (fixed and active parameters
have zero derivative). :func:`fitted_parameters` is a ``torch.autograd.Function`` whose forward
runs :func:`newton_minimize` on detached inputs and whose backward solves one linear system with
``H`` and makes one vector-Jacobian product of ``grad_theta f`` in ``phi``: the cost of a
backward pass is that of one Newton step, whatever the number of Newton iterations.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from analysis.errors import AnalysisError
from analysis.numpy_backend.fit import EIGENVALUE_FLOOR, MAX_ITERATIONS  # both engines

log = logging.getLogger(__name__)

Objective = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "FitError",
    "FitResult",
    "NewtonResult",
    "fit",
    "fit_model",
    "fitted_parameters",
    "newton_minimize",
    "value_grad_hessian",
    "with_implicit_gradient",
]

# Scaled-Hessian eigenvalues at or below this are treated as zero (a degenerate direction). The
# scaled Hessian D^-1/2 H D^-1/2 has unit diagonal, so this is "1 - correlation" in the worst
# direction; genuine correlations of 0.9999999 stay well above it.
_SINGULAR_EIGENVALUE = 1e-9
# A parameter belongs to a degenerate direction when its component in a null eigenvector is
# at least this large (two parameters that only enter as their sum have components 0.71).
_NULL_COMPONENT = 0.1


class FitError(AnalysisError, ArithmeticError):
    """A fit cannot produce a meaningful answer: non-finite objective, singular Hessian."""


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FitResult:
    """Result of one fit, with cabinetry's ``FitResults`` field names.

    ``uncertainty`` is the parabolic (HESSE) error, 0 for fixed parameters. ``corr_mat`` is the
    correlation matrix; like cabinetry (iminuit's ``covariance.correlation()``) a fixed
    parameter's row and column are all 0, its diagonal included. ``minos`` maps a parameter
    name to ``(lower, upper)`` MINOS errors relative to the best fit (lower negative), as
    iminuit's ``merrors``; it is empty unless MINOS was requested. ``converged`` is False when
    the minimiser did not reach its convergence criterion (a warning is logged too).
    """

    labels: tuple[str, ...]
    bestfit: torch.Tensor
    uncertainty: torch.Tensor
    corr_mat: torch.Tensor
    twice_nll: torch.Tensor
    minos: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    converged: bool = True
    at_bound: tuple[bool, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready lists (the ``diffana fit`` output); an uncertainty that cannot be
        computed (a degenerate direction, a parameter other than the POI on a bound) is NaN
        here and ``null`` with a reason in the JSON written (:func:`analysis.files.json_text`)."""
        return {
            "labels": list(self.labels),
            "bestfit": self.bestfit.tolist(),
            "uncertainty": self.uncertainty.tolist(),
            "corr_mat": self.corr_mat.tolist(),
            "twice_nll": float(self.twice_nll),
            "minos": {name: [float(lo), float(hi)] for name, (lo, hi) in self.minos.items()},
            "converged": bool(self.converged),
            "at_bound": list(self.at_bound) or [False] * len(self.labels),
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> FitResult:
        """The inverse of :meth:`to_dict` (a ``diffana fit`` JSON file), float64 tensors."""
        as_tensor = functools.partial(torch.tensor, dtype=torch.float64)
        return cls(
            labels=tuple(payload["labels"]),
            bestfit=as_tensor(payload["bestfit"]),
            uncertainty=as_tensor(_nan_for_none(payload["uncertainty"])),
            corr_mat=as_tensor(_nan_for_none(payload["corr_mat"])),
            twice_nll=as_tensor(payload["twice_nll"]),
            minos={name: (lo, hi) for name, (lo, hi) in payload.get("minos", {}).items()},
            converged=bool(payload.get("converged", True)),
            at_bound=tuple(bool(b) for b in payload.get("at_bound", ())),
        )


@dataclass(frozen=True, eq=False)
class NewtonResult:
    """Result of :func:`newton_minimize` for a batch of shape ``(...)`` and P parameters.

    ``x`` (..., P) the final points; ``fun`` (...) the objective there; ``converged`` (...) bool;
    ``n_iter`` (...) int64, Newton steps taken by each element; ``hessian`` (..., P, P) the
    autograd Hessian of the objective at ``x`` (all parameters, fixed ones included);
    ``active`` (..., P) bool, parameters held on a bound by the minimisation (on the bound, with
    the gradient pushing outwards).
    """

    x: torch.Tensor
    fun: torch.Tensor
    converged: torch.Tensor
    n_iter: torch.Tensor
    hessian: torch.Tensor
    active: torch.Tensor


# --------------------------------------------------------------------------------------------
# Derivatives
# --------------------------------------------------------------------------------------------


def value_grad_hessian(
    twice_nll: Objective, x: torch.Tensor, *, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value (...), gradient (..., P) and Hessian (..., P, P) of a batched objective at ``x``.

    Batch elements are independent, so the gradient of ``sum(f)`` holds every element's
    gradient, and the Hessian rows are the gradients of ``sum(g[..., i])``: no per-element
    loop (see :func:`_hessian_of_grad`). With ``create_graph`` the results stay
    differentiable, in ``x`` if it requires grad and in whatever else the objective uses.

    An objective with a ``value_grad_hessian(x)`` method of its own (a likelihood model's
    :class:`~analysis.likelihood.model.TwiceNLL`, exact from the model's structure, about 50
    times faster than autograd on published likelihoods) is asked for its detached derivatives
    instead, unless ``create_graph``.
    """
    exact = getattr(twice_nll, "value_grad_hessian", None)
    if exact is not None and not create_graph:
        return exact(x.detach())
    with torch.enable_grad():
        if not (create_graph and x.requires_grad):
            x = x.detach().requires_grad_(True)
        value = twice_nll(x)
        if value.shape != x.shape[:-1]:
            raise ValueError(
                f"twice_nll returned shape {tuple(value.shape)} for pars of shape "
                f"{tuple(x.shape)}; shape {tuple(x.shape[:-1])} was expected"
            )
        (grad,) = torch.autograd.grad(value.sum(), x, create_graph=True)
        hessian = _hessian_of_grad(grad, x, create_graph=create_graph)
    if not create_graph:
        return value.detach(), grad.detach(), hessian.detach()
    return value, grad, hessian


# Up to this many Hessian elements (batch size x P^2) the P backward passes run as one
# vmapped pass (is_grads_batched): ~10-20x faster for single fits of 50-300 parameters; above
# it the loop over P reverse passes of the whole batch is faster (2x at 10,000 x 10 on CPU).
_VMAP_HESSIAN_ELEMENTS = 500_000


def _hessian_of_grad(grad: torch.Tensor, x: torch.Tensor, *, create_graph: bool) -> torch.Tensor:
    """Symmetrised d grad / d x (..., P, P) from a gradient built with ``create_graph=True``."""
    n_par = x.shape[-1]
    if not grad.requires_grad:  # the objective is linear in x
        return x.new_zeros((*x.shape, n_par))
    if x.numel() * n_par <= _VMAP_HESSIAN_ELEMENTS:
        eye = torch.eye(n_par, dtype=x.dtype, device=x.device)
        seeds = eye.reshape(n_par, *([1] * (x.ndim - 1)), n_par).expand(n_par, *x.shape)
        try:
            with warnings.catch_warnings():  # ops without a batching rule: slower, still right
                warnings.filterwarnings("ignore", message="There is a performance drop")
                (rows,) = torch.autograd.grad(
                    grad,
                    x,
                    grad_outputs=seeds,
                    retain_graph=True,
                    create_graph=create_graph,
                    is_grads_batched=True,
                    allow_unused=True,
                )
        except RuntimeError:  # an op (e.g. a custom autograd.Function) that vmap cannot batch
            rows = None
        else:
            hessian = x.new_zeros((*x.shape, n_par)) if rows is None else rows.movedim(0, -2)
            return 0.5 * (hessian + hessian.transpose(-1, -2))
    rows_list = []
    for i in range(n_par):
        (row,) = torch.autograd.grad(
            grad[..., i].sum(), x, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        rows_list.append(torch.zeros_like(x) if row is None else row)
    hessian = torch.stack(rows_list, dim=-2)
    return 0.5 * (hessian + hessian.transpose(-1, -2))


# --------------------------------------------------------------------------------------------
# Newton
# --------------------------------------------------------------------------------------------


def _tensor(value: Any, **kwargs: Any) -> torch.Tensor:
    """torch.as_tensor that copies read-only numpy arrays (np.broadcast_to) instead of warning."""
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = value.copy()
    return torch.as_tensor(value, **kwargs)


def _as_bounds(bounds: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = _tensor(bounds, dtype=like.dtype, device=like.device)
    if b.ndim < 2 or b.shape[-1] != 2 or b.shape[-2] != like.shape[-1]:
        raise ValueError(
            f"bounds has shape {tuple(b.shape)}; ({like.shape[-1]}, 2) (or a batch of those) "
            "was expected"
        )
    lo, hi = b[..., 0].expand_as(like), b[..., 1].expand_as(like)
    if bool((lo > hi).any()):
        raise ValueError("bounds has a lower bound above its upper bound")
    return lo, hi


def _as_fixed(fixed: Any, like: torch.Tensor) -> torch.Tensor:
    if fixed is None:
        return torch.zeros_like(like, dtype=torch.bool)
    f = _tensor(fixed, dtype=torch.bool, device=like.device)
    try:
        return f.expand_as(like)
    except RuntimeError:
        raise ValueError(
            f"fixed has shape {tuple(f.shape)}; ({like.shape[-1]},) was expected"
        ) from None


def _as_init(init: Any) -> torch.Tensor:
    x = _tensor(init)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    x = x.detach().to(torch.float64)  # fits always run in float64
    if x.ndim < 1:
        raise ValueError("init must have shape (..., P), got a scalar")
    return x


def _describe_point(x: torch.Tensor, labels: Sequence[str] | None, limit: int = 12) -> str:
    names = labels if labels is not None else [f"x{i}" for i in range(x.shape[-1])]
    parts = [f"{name}={float(v):.6g}" for name, v in zip(names, x.tolist(), strict=False)]
    more = f", ... ({len(parts) - limit} more)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _check_start(
    value: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, labels: Sequence[str] | None
) -> None:
    """FitError naming the first batch element whose objective or gradient is not finite."""
    bad = ~torch.isfinite(value) | ~torch.isfinite(grad).all(-1)
    if not bool(bad.any()):
        return
    index = tuple(int(i) for i in torch.nonzero(bad)[0])
    names = labels if labels is not None else [f"x{i}" for i in range(x.shape[-1])]
    where = f" (batch element {index})" if index else ""
    g = grad[index]
    culprits = [names[i] for i in torch.nonzero(~torch.isfinite(g)).flatten().tolist()]
    blame = f"; non-finite gradient in {', '.join(culprits)}" if culprits else ""
    raise FitError(
        f"twice_nll is {float(value[index])} at the start point{where}{blame}; "
        f"parameters: {_describe_point(x[index], labels)}"
    )


def _damped_direction(
    hessian: torch.Tensor, grad: torch.Tensor, free: torch.Tensor, damping: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton direction on the free parameters; whether ``H_FF + damping I`` is positive definite.

    Solves ``(H_FF + damping I) d_F = -g_F`` by Cholesky; elements whose matrix is not positive
    definite fall back to the eigen-decomposition with eigenvalues replaced by
    ``max(|e|, EIGENVALUE_FLOOR max|e|) + damping`` (the saddle-free Newton step, a descent
    direction; :data:`~analysis.numpy_backend.fit.EIGENVALUE_FLOOR`).
    Parameters outside F get ``d = 0``.
    """
    pair = free.unsqueeze(-1) & free.unsqueeze(-2)
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
    h_free = torch.where(pair, hessian, 0.0)
    matrix = h_free + eye * torch.where(free, damping.unsqueeze(-1), 1.0).unsqueeze(-1)
    g = torch.where(free, grad, 0.0)
    chol, info = torch.linalg.cholesky_ex(matrix)
    direction = -torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
    positive = info == 0
    if not bool(positive.all()):
        bad = ~positive
        evals, evecs = torch.linalg.eigh(matrix[bad])
        scale = evals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(evals.dtype).tiny)
        d = damping[bad].unsqueeze(-1)
        floored = torch.maximum((evals - d).abs(), EIGENVALUE_FLOOR * scale) + d
        coef = (evecs.transpose(-1, -2) @ g[bad].unsqueeze(-1)).squeeze(-1) / floored
        direction[bad] = -(evecs @ coef.unsqueeze(-1)).squeeze(-1)
    direction = torch.where(free & torch.isfinite(direction), direction, 0.0)
    return direction, positive


def newton_minimize(
    twice_nll: Objective,
    init: Any,
    *,
    bounds: Any,
    fixed: Any = None,
    max_iter: int = MAX_ITERATIONS,
    tol: float = 1e-10,
    labels: Sequence[str] | None = None,
) -> NewtonResult:
    """Minimise a batched objective by projected Newton steps with a backtracking line search.

    Each batch element of ``init`` (shape ``(..., P)``) is an independent problem; ``bounds``
    is ``(P, 2)`` (or broadcastable to ``(..., P, 2)``, infinities allowed) and ``fixed`` a
    ``(P,)`` (or ``(..., P)``) bool mask of parameters kept at their ``init`` values (they may
    lie outside the bounds). Iteration k, for every element at once:

    1. value, gradient g and Hessian H by autograd (:func:`value_grad_hessian`);
    2. active set A: parameters on (within 1e-10 relative of) a bound with the gradient pushing
       outwards; the free set F excludes A and the fixed parameters;
    3. convergence when H_FF is positive definite, the Newton decrement
       ``edm = g_F^T H_FF^-1 g_F / 2`` (Minuit's "estimated distance to minimum") is at most
       ``tol``, and the last accepted step changed the objective by at most
       ``tol * max(1, |f|)``, or was a full undamped Newton step that decreased it by its
       predicted ``edm`` to within half (the quadratic model holds: the point is in the basin
       of quadratic convergence), or the last line search found no decrease at all (the point
       cannot be improved at this precision); a converged element takes one last Newton step
       (quadratic convergence: its edm drops to ~tol^2) and is then frozen;
    4. direction ``d_F = -H_FF^-1 g_F`` by Cholesky, with the saddle-free eigenvalue floor
       ``max(|e|, EIGENVALUE_FLOOR max|e|)`` where H_FF is not positive definite and a
       Levenberg term ``lambda max(diag H) I`` after failed line searches; ``d_A`` snaps active
       parameters onto their bound;
    5. step ``x + alpha d`` projected onto the box, ``alpha = 1, 1/2, 1/4, ...`` until the Armijo
       condition holds (with a rounding allowance of a few ulp of ``f``; a full step from a point
       with ``edm <= tol`` is accepted as it is, its decrease being below the rounding of ``f``
       for any realistic objective); an element whose line
       search fails keeps its point and raises ``lambda`` tenfold (from 1e-3; it falls tenfold
       after each success and is dropped below 1e-6), so it tends to a short gradient step.

    Why this design: the objectives are smooth, low-dimensional (10-300 parameters) and cheap
    per element, so the exact autograd Hessian is affordable and gives quadratic convergence
    (3-6 iterations from the suggested init) where quasi-Newton needs tens; bounds matter
    mostly for a POI at 0 (q~_mu), where the minimum lies on the bound and the projected
    Newton / active-set treatment (Bertsekas 1982, "Projected Newton methods for optimization
    problems with simple constraints") lands exactly on it, whereas a smooth reparametrisation
    can only approach it. A trust region would need a per-element subproblem solve; the damped
    line search is a few batched evaluations and is what makes the batched loop cheap.

    The edm criterion is invariant under rescaling of parameters (a gradient norm is not) and
    ``edm <= 1e-10`` means the point is within ~1e-5 standard deviations of the minimum; in
    practice the quadratic convergence puts it much closer. Non-convergence after ``max_iter``
    steps is reported in ``converged``, never hidden. A non-finite objective or gradient at the
    start raises :class:`FitError`; non-finite trial points are rejected by the line search.
    """
    x = _as_init(init)
    lo, hi = _as_bounds(bounds, x)
    fixed_mask = _as_fixed(fixed, x)
    outside = ~fixed_mask & ((x < lo) | (x > hi))
    if bool(outside.any()):
        i = int(torch.nonzero(outside)[0, -1])
        name = labels[i] if labels is not None else f"x{i}"
        raise ValueError(f"init of free parameter {name} lies outside its bounds")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")

    batch = x.shape[:-1]
    eps = torch.finfo(x.dtype).eps
    snap_lo = lo + 1e-10 * (1.0 + lo.abs())
    snap_hi = hi - 1e-10 * (1.0 + hi.abs())

    value, grad, hess = value_grad_hessian(twice_nll, x)
    _check_start(value, grad, x, labels)
    done = torch.zeros(batch, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=x.device)
    damping = torch.zeros(batch, dtype=x.dtype, device=x.device)
    delta_f = torch.full(batch, math.inf, dtype=x.dtype, device=x.device)
    stalled = torch.zeros_like(done)
    quadratic_step = torch.zeros_like(done)  # the last step decreased f as the model predicted

    for k in range(max_iter + 1):
        active = ~fixed_mask & (((x <= snap_lo) & (grad > 0)) | ((x >= snap_hi) & (grad < 0)))
        free = ~fixed_mask & ~active
        newton, positive = _damped_direction(hess, grad, free, torch.zeros_like(damping))
        edm = -0.5 * (torch.where(free, grad, 0.0) * newton).sum(-1)
        small = delta_f.abs() <= tol * value.abs().clamp_min(1.0)
        settled = stalled | small | quadratic_step
        newly = ~done & positive & (edm <= tol) & settled
        done = done | newly
        # an element that has just converged takes one more (polishing) Newton step: the
        # quadratic convergence takes it from edm <= tol to ~tol^2 for the price of one
        # evaluation, which is what finite-difference checks of fitted parameters need
        pending = ~done | newly
        if k == max_iter or not bool(pending.any()):
            break

        direction = newton
        damped = ~done & (damping > 0)
        if bool(damped.any()):
            scale = hess.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
            direction = direction.clone()
            direction[damped], _ = _damped_direction(
                hess[damped], grad[damped], free[damped], (damping * scale)[damped]
            )
        # snap active parameters onto their bound, Newton step on the free ones
        target = torch.where(active & (grad > 0), lo, torch.where(active, hi, x))
        step = torch.where(active, target - x, direction)
        accepted = torch.zeros_like(done)
        full = torch.zeros_like(done)  # accepted with alpha = 1
        new_x, new_value = x.clone(), value.clone()
        alpha = 1.0
        newton_step = positive & (damping == 0)  # the undamped Newton direction, predicting edm
        quadratic = newton_step & (edm <= tol)
        allowance = 8 * eps * value.abs().clamp_min(1.0)
        for _ in range(40):
            trial = torch.where(fixed_mask, x, torch.clamp(x + alpha * step, lo, hi))
            with torch.no_grad():
                trial_value = twice_nll(trial)
            decrease = (grad * (trial - x)).sum(-1)
            sufficient = trial_value <= value + 1e-4 * decrease + allowance
            if alpha == 1.0:  # within tol of the minimum a full step is trusted: its decrease
                sufficient = sufficient | quadratic  # may be below the rounding of f
            ok = pending & ~accepted & torch.isfinite(trial_value) & sufficient
            new_x = torch.where(ok.unsqueeze(-1), trial, new_x)
            new_value = torch.where(ok, trial_value, new_value)
            accepted = accepted | ok
            full = full | (ok & (alpha == 1.0))
            if bool((accepted | ~pending).all()):
                break
            alpha *= 0.5
        failed = pending & ~accepted
        damping = torch.where(
            failed,
            (10 * damping).clamp_min(1e-3),
            torch.where(damping >= 1e-6, damping / 10, 0.0),
        )
        # an undamped full Newton step is predicted to decrease f by edm (the quadratic model);
        # a decrease within half of that confirms the model (see step 3 of the docstring)
        agrees = ((value - new_value) - edm).abs() <= 0.5 * edm
        quadratic_step = accepted & full & newton_step & agrees
        delta_f = torch.where(accepted, new_value - value, delta_f)
        stalled = failed
        n_iter = n_iter + pending.long()
        x = new_x
        value, grad, hess = value_grad_hessian(twice_nll, x)

    return NewtonResult(x=x, fun=value, converged=done, n_iter=n_iter, hessian=hess, active=active)


# --------------------------------------------------------------------------------------------
# Covariance
# --------------------------------------------------------------------------------------------


def _degenerate_parameters(hessian: torch.Tensor) -> tuple[list[int], float]:
    """Indices of parameters in (near-)null directions of a Hessian, and its worst eigenvalue.

    The Hessian is scaled to unit diagonal first (so parameters in different units compare);
    a parameter with a non-positive diagonal (it does not change the objective) is degenerate
    by itself.
    """
    diag = hessian.diagonal()
    scale = diag.abs().amax().clamp_min(torch.finfo(hessian.dtype).tiny)
    flat = diag <= 1e-14 * scale
    d = torch.where(flat, 1.0, diag).rsqrt()
    scaled = hessian * d.unsqueeze(0) * d.unsqueeze(1)
    scaled = torch.where(flat.unsqueeze(0) | flat.unsqueeze(1), 0.0, scaled)
    scaled = scaled + torch.diag(flat.to(hessian.dtype))
    evals, evecs = torch.linalg.eigh(scaled)
    null = evals <= _SINGULAR_EIGENVALUE
    members = flat.clone()
    if bool(null.any()):
        members |= (evecs[:, null].abs() >= _NULL_COMPONENT).any(-1)
    worst = float(evals.min()) if not bool(flat.any()) else 0.0
    return torch.nonzero(members).flatten().tolist(), worst


def _covariance(hessian: torch.Tensor, free: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """``2 H_FF^-1`` embedded in a (P, P) matrix with zeros for non-free parameters."""
    index = torch.nonzero(free).flatten()
    n_par = hessian.shape[-1]
    cov = hessian.new_zeros((n_par, n_par))
    if index.numel() == 0:
        return cov
    h_free = hessian[index][:, index]
    members, worst = _degenerate_parameters(h_free)
    if members:
        names = ", ".join(labels[int(index[i])] for i in members)
        kind = "indefinite" if worst < -_SINGULAR_EIGENVALUE else "singular"
        log.warning(
            "the Hessian of twice_nll at the best fit is %s (smallest eigenvalue of the "
            "unit-diagonal Hessian %.3g): no uncertainty for the degenerate parameters %s; the "
            "others are conditional on them",
            kind,
            worst,
            names,
        )
        keep = torch.ones(index.numel(), dtype=torch.bool, device=index.device)
        keep[members] = False
        cov[index[members].unsqueeze(-1), index] = math.nan
        cov[index.unsqueeze(-1), index[members]] = math.nan
        index, h_free = index[keep], h_free[keep][:, keep]
    if index.numel():
        cov[index.unsqueeze(-1), index] = 2.0 * torch.linalg.inv(h_free)
    return 0.5 * (cov + cov.T)


def _correlation(cov: torch.Tensor) -> torch.Tensor:
    sigma = cov.diagonal().clamp_min(0.0).sqrt()
    # iminuit's convention: a zero-variance row (a fixed parameter) is all zeros
    return cov / (torch.outer(sigma, sigma) + 1e-100)


def _nan_for_none(values: Any) -> Any:
    """JSON ``null`` (an uncertainty that could not be computed) back to NaN, nested lists."""
    if isinstance(values, list):
        return [_nan_for_none(v) for v in values]
    return math.nan if values is None else values


# --------------------------------------------------------------------------------------------
# Single fits
# --------------------------------------------------------------------------------------------


def fit(
    twice_nll: Objective,
    init: Any,
    *,
    bounds: Any,
    fixed: Any = None,
    labels: Sequence[str] | None = None,
    minos: Sequence[str] = (),
    poi: str | None = None,
    method: Literal["minuit", "newton"] = "minuit",
    strategy: int = 1,
    tolerance: float = 0.01,
    max_iter: int = MAX_ITERATIONS,
    tol: float = 1e-10,
) -> FitResult:
    """One maximum-likelihood fit of ``twice_nll`` from ``init`` (shape (P,)).

    ``method="minuit"``: iminuit's MIGRAD then HESSE, MINOS for each name in ``minos``. The
    torch gradient is handed to Minuit (``grad=``); ``errordef = 1`` (the objective is twice the
    NLL); limits from ``bounds`` (none for fixed parameters, which may sit outside them);
    ``strategy`` and ``tolerance`` default to cabinetry's own iminuit fit (strategy 1,
    ``tol = 0.1 / 10``: MIGRAD stops at EDM < 0.002 * tol = 2e-5). On cabinetry's example
    workspace these reproduce its reference numbers (made through pyhf's numpy backend:
    strategy 1, tol 0.1, no gradient) to 1.5e-6 relative in the best fit and 1.2e-6 absolute
    in the uncertainties. pyhf's rule "strategy 0 when a gradient is supplied" moves HESSE's
    uncertainties by up to 2.5e-3 there, beyond cabinetry's 1e-4, so it is not followed.
    MIGRAD's result is only as close to the minimum as its EDM goal (~1e-4 of a standard
    deviation here), and HESSE's errors for limited parameters go through Minuit's limit
    transformation, which biases them (Signal_norm in cabinetry's example: 0.9389 against
    0.9492 from the exact Hessian at the same point; cabinetry's numbers carry this bias).
    ``method="newton"`` gives the exact minimum and the exact-Hessian errors instead.

    ``method="newton"``: :func:`newton_minimize` (``max_iter``, ``tol``), the covariance
    ``2 H^-1`` from the exact autograd Hessian of the free parameters (a parameter on a bound
    keeps its curvature error, like HESSE), MINOS by root finding on the profile
    (``twice_nll`` profiled over the other parameters rises by 1; Brent's method on conditional
    Newton fits).

    Both: ``converged`` is False (and a warning is logged) when the minimiser did not converge.
    Bounds are handled as MINUIT reports them, but exactly: parameters held on a bound by the
    minimum are flagged in ``at_bound`` (after MIGRAD a projected Newton step from its point
    puts them on the bound, which Minuit's limit transformation never reaches), the covariance
    is that of the other free parameters, a parameter on a bound has no parabolic error (NaN),
    and the POI (``poi``, a label) on a bound gets the one-sided profile-likelihood error (see
    :func:`_newton_result`). A singular or indefinite Hessian is a warning naming the
    degenerate parameters, whose uncertainties and correlations are NaN; a non-finite objective
    at ``init`` raises :class:`FitError`.
    """
    x0 = _as_init(init)
    if x0.ndim != 1:
        raise ValueError(f"init has shape {tuple(x0.shape)}; (P,) was expected for fit()")
    n_par = x0.shape[0]
    labels = tuple(labels) if labels is not None else tuple(f"x{i}" for i in range(n_par))
    if len(labels) != n_par:
        raise ValueError(f"labels has {len(labels)} names but {n_par} were expected")
    lo, hi = _as_bounds(bounds, x0)
    fixed_mask = _as_fixed(fixed, x0)
    for name in minos:
        if name not in labels:
            raise KeyError(f"MINOS parameter {name!r} is not a parameter; parameters: {labels}")
        if bool(fixed_mask[labels.index(name)]):
            raise ValueError(f"MINOS parameter {name!r} is fixed")
    if method == "minuit":
        return _fit_minuit(
            twice_nll, x0, lo, hi, fixed_mask, labels, tuple(minos), poi, strategy, tolerance
        )
    if method == "newton":
        return _fit_newton(
            twice_nll, x0, lo, hi, fixed_mask, labels, tuple(minos), poi, max_iter, tol
        )
    raise ValueError(f"method must be 'minuit' or 'newton', got {method!r}")


def _fit_minuit(
    twice_nll: Objective,
    x0: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    fixed: torch.Tensor,
    labels: tuple[str, ...],
    minos: tuple[str, ...],
    poi: str | None,
    strategy: int,
    tolerance: float,
) -> FitResult:
    import iminuit

    value, grad, _ = value_grad_hessian(twice_nll, x0)
    _check_start(value, grad, x0, labels)
    device, dtype = x0.device, x0.dtype

    def fcn(pars: np.ndarray) -> float:
        with torch.no_grad():
            return float(twice_nll(torch.as_tensor(pars, dtype=dtype, device=device)))

    def gradient(pars: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(pars, dtype=dtype, device=device).requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(twice_nll(x), x)
        return g.detach().cpu().numpy()

    m = iminuit.Minuit(fcn, x0.cpu().numpy(), grad=gradient, name=labels)
    m.errordef = iminuit.Minuit.LEAST_SQUARES  # 1: the objective is twice the NLL
    fixed_list = fixed.tolist()
    m.limits = [
        (-math.inf, math.inf) if is_fixed else (a, b)
        for is_fixed, a, b in zip(fixed_list, lo.tolist(), hi.tolist(), strict=True)
    ]
    m.fixed = fixed_list
    m.strategy = strategy
    m.tol = tolerance
    m.migrad()
    m.hesse()
    converged = bool(m.valid)
    if not converged:
        log.warning("MIGRAD did not converge:\n%s", m.fmin)

    bestfit = torch.tensor(list(m.values), dtype=dtype, device=device)
    # m.errors, not sqrt(diag(covariance)): for a limited parameter Minuit maps the +-1 sigma
    # internal interval through the limit transformation (pyhf and cabinetry report m.errors)
    errors = torch.tensor(list(m.errors), dtype=dtype, device=device)
    near = ~fixed & ((bestfit - lo < 0.5 * errors) | (hi - bestfit < 0.5 * errors))
    if bool(near.any()):
        # Minuit's limit transformation never reaches a bound: a projected Newton step from
        # its point does, and holds the parameters that sit on one (the active set)
        polish = newton_minimize(
            twice_nll, bestfit, bounds=torch.stack([lo, hi], -1), fixed=fixed, labels=labels
        )
        if bool(polish.active.any()) and float(polish.fun) <= m.fval + 1e-6:
            log.info("parameters on a bound after MIGRAD: %s", _names(polish.active, labels))
            result = _newton_result(twice_nll, polish, lo, hi, fixed, labels, minos, poi)
            return replace(result, converged=converged and result.converged)

    _, _, hessian = value_grad_hessian(twice_nll, bestfit)
    exact_cov = _covariance(hessian, ~fixed, labels)
    if m.covariance is None:  # HESSE failed outright: fall back on the autograd Hessian
        log.warning("HESSE failed; uncertainties from the autograd Hessian")
        cov = exact_cov
    else:
        if not m.fmin.has_accurate_covar:
            log.warning("HESSE covariance is not accurate:\n%s", m.fmin)
        cov = torch.as_tensor(np.asarray(m.covariance), dtype=dtype, device=device)
        cov = torch.where(exact_cov.isnan(), math.nan, cov)  # degenerate: no number
    hesse = errors if m.covariance is not None else exact_cov.diagonal().clamp_min(0.0).sqrt()
    hesse = torch.where(exact_cov.diagonal().isnan(), math.nan, hesse)
    uncertainty = torch.where(fixed, 0.0, hesse)
    minos_errors: dict[str, tuple[float, float]] = {}
    for name in minos:
        m.minos(name)
        merror = m.merrors[name]
        if not merror.is_valid:
            log.warning("MINOS for %s is not valid:\n%s", name, merror)
        minos_errors[name] = (float(merror.lower), float(merror.upper))
    return FitResult(
        labels=labels,
        bestfit=bestfit,
        uncertainty=uncertainty,
        corr_mat=_correlation(cov),
        twice_nll=torch.tensor(m.fval, dtype=dtype, device=device),
        minos=minos_errors,
        converged=converged,
        at_bound=(False,) * len(labels),
    )


def _fit_newton(
    twice_nll: Objective,
    x0: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    fixed: torch.Tensor,
    labels: tuple[str, ...],
    minos: tuple[str, ...],
    poi: str | None,
    max_iter: int,
    tol: float,
) -> FitResult:
    bounds = torch.stack([lo, hi], dim=-1)
    result = newton_minimize(
        twice_nll, x0, bounds=bounds, fixed=fixed, max_iter=max_iter, tol=tol, labels=labels
    )
    if not bool(result.converged):
        log.warning(
            "Newton fit did not converge in %d iterations (twice_nll = %.10g at %s)",
            int(result.n_iter),
            float(result.fun),
            _describe_point(result.x, labels),
        )
    return _newton_result(twice_nll, result, lo, hi, fixed, labels, minos, poi, max_iter, tol)


def _names(mask: torch.Tensor, labels: Sequence[str]) -> str:
    return ", ".join(labels[i] for i in torch.nonzero(mask).flatten().tolist())


def _newton_result(
    twice_nll: Objective,
    result: NewtonResult,
    lo: torch.Tensor,
    hi: torch.Tensor,
    fixed: torch.Tensor,
    labels: tuple[str, ...],
    minos: tuple[str, ...],
    poi: str | None,
    max_iter: int = MAX_ITERATIONS,
    tol: float = 1e-10,
) -> FitResult:
    """A :class:`FitResult` from a projected-Newton minimum, with bounds handled as MINUIT
    reports them: parameters held on a bound (``result.active``) are flagged ``at_bound``; the
    covariance ``2 H^-1`` is that of the other free parameters (a bound removes a direction,
    and the Hessian of the full space may be indefinite there, e.g. a signal-only bin at
    mu = 0); a parameter on a bound has no parabolic error (NaN), except the POI, whose
    uncertainty is then one-sided from the profile likelihood: the distance from the bound to
    where the profiled twice NLL has risen by 1 (MINOS-like, :func:`_profile_interval`)."""
    bounds = torch.stack([lo, hi], dim=-1)
    at_bound = result.active & ~fixed
    cov = _covariance(result.hessian, ~fixed & ~at_bound, labels)
    cov = torch.where(at_bound.unsqueeze(0) | at_bound.unsqueeze(1), math.nan, cov)
    cov.diagonal()[fixed] = 0.0
    uncertainty = cov.diagonal().clamp_min(0.0).sqrt()  # NaN (no error) stays NaN

    def interval(index: int, name: str) -> tuple[float, float]:
        return _profile_interval(
            twice_nll, result, index, bounds, fixed, result.hessian, max_iter, tol, name
        )

    minos_errors = {name: interval(labels.index(name), name) for name in minos}
    if poi is not None and bool(at_bound[labels.index(poi)]):
        index = labels.index(poi)
        low, high = minos_errors.get(poi) or interval(index, poi)
        uncertainty = uncertainty.clone()
        uncertainty[index] = high if float(result.x[index]) <= float(lo[index]) else -low
        log.warning(
            "%s is on its bound %.6g: its uncertainty %.6g is one-sided, from the profile "
            "likelihood",
            poi,
            float(result.x[index]),
            float(uncertainty[index]),
        )
    if bool(at_bound.any()):
        log.info("on a bound (no parabolic uncertainty): %s", _names(at_bound, labels))
    return FitResult(
        labels=labels,
        bestfit=result.x,
        uncertainty=uncertainty,
        corr_mat=_correlation(cov),
        twice_nll=result.fun,
        minos=minos_errors,
        converged=bool(result.converged),
        at_bound=tuple(bool(b) for b in at_bound.tolist()),
    )


def _profile_interval(
    twice_nll: Objective,
    best: NewtonResult,
    index: int,
    bounds: torch.Tensor,
    fixed: torch.Tensor,
    hessian: torch.Tensor,
    max_iter: int,
    tol: float,
    name: str,
) -> tuple[float, float]:
    """MINOS-like errors: where the profiled twice_nll exceeds its minimum by 1, each side.

    Brackets by doubling steps of the conditional parabolic error ``sqrt(2 / H_ii)`` from the
    best fit, then Brent's method (``scipy.optimize.brentq``, xtol 1e-10 sigma) on conditional
    Newton fits warm-started from the best fit. If a bound is reached first, the error stops
    there (as MINOS reports ``at_lower_limit``/``at_upper_limit``) and a warning is logged; a
    best fit on the bound has error 0 on that side.
    """
    import scipy.optimize

    x_hat = best.x
    center = float(x_hat[index])
    curvature = float(hessian[index, index])
    sigma = math.sqrt(2.0 / curvature) if math.isfinite(curvature) and curvature > 0 else 1.0
    cond_fixed = fixed.clone()
    cond_fixed[index] = True
    start = x_hat.clone()
    lo, hi = float(bounds[index, 0]), float(bounds[index, 1])

    def excess(t: float) -> float:
        start[index] = t
        res = newton_minimize(
            twice_nll, start, bounds=bounds, fixed=cond_fixed, max_iter=max_iter, tol=tol
        )
        if not bool(res.converged):
            log.warning("conditional fit at %s = %.6g did not converge", name, t)
        return float(res.fun - best.fun) - 1.0

    errors = []
    for sign, limit in ((-1.0, lo), (1.0, hi)):
        if center == limit:
            errors.append(0.0)
            continue
        inner, step = center, sigma
        outer = center + sign * step
        while True:
            outer = max(outer, limit) if sign < 0 else min(outer, limit)
            if excess(outer) >= 0.0:
                root = scipy.optimize.brentq(excess, inner, outer, xtol=1e-10 * sigma, rtol=1e-14)
                errors.append(root - center)
                break
            if outer == limit:
                log.warning("MINOS interval of %s reaches its bound %.6g", name, limit)
                errors.append(limit - center)
                break
            inner, step = outer, 2 * step
            outer = center + sign * step
            if abs(step) > 1e6 * sigma:
                raise FitError(f"the profile of {name} does not rise by 1 within 1e6 sigma")
    return errors[0], errors[1]


def fit_model(
    model: Any,
    data: Any,
    *,
    init: Any = None,
    bounds: Any = None,
    fixed: Any = None,
    minos: Sequence[str] = (),
    method: Literal["minuit", "newton"] = "minuit",
    **options: Any,
) -> FitResult:
    """:func:`fit` of a likelihood model to ``data``, with the model's suggested settings.

    Uses only ``model.twice_nll(pars, data)``, ``model.suggested_init()``,
    ``model.suggested_bounds()``, ``model.suggested_fixed()``, ``model.par_names`` and, when
    the model has one, ``model.poi_name`` (the ``poi`` of :func:`fit`: its uncertainty on a
    bound is one-sided from the profile); ``init``, ``bounds`` and ``fixed`` override the
    suggestions. ``options`` go to :func:`fit`.
    """
    init = model.suggested_init() if init is None else init
    bounds = model.suggested_bounds() if bounds is None else bounds
    fixed = model.suggested_fixed() if fixed is None else fixed
    from analysis.likelihood.model import TwiceNLL

    return fit(
        TwiceNLL(model, data),
        init,
        bounds=bounds,
        fixed=fixed,
        labels=tuple(model.par_names),
        minos=minos,
        method=method,
        **{"poi": getattr(model, "poi_name", None), **options},
    )


# --------------------------------------------------------------------------------------------
# Implicit differentiation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ArgminSpec:
    twice_nll_of: Callable[..., torch.Tensor]
    bounds: Any
    fixed: Any
    max_iter: int
    tol: float
    strict: bool
    labels: Sequence[str] | None


class _ImplicitArgmin(torch.autograd.Function):
    """theta_hat(phi) = argmin_theta f(theta, phi); backward by the implicit function theorem."""

    @staticmethod
    def forward(ctx: Any, spec: _ArgminSpec, init: torch.Tensor, *params: torch.Tensor) -> Any:
        detached = [p.detach() for p in params]
        result = newton_minimize(
            lambda x: spec.twice_nll_of(x, *detached),
            init,
            bounds=spec.bounds,
            fixed=spec.fixed,
            max_iter=spec.max_iter,
            tol=spec.tol,
            labels=spec.labels,
        )
        if not bool(result.converged.all()):
            n_bad = int((~result.converged).sum())
            message = (
                f"{n_bad} of {result.converged.numel()} fits did not converge in "
                f"{spec.max_iter} Newton iterations; their implicit derivatives are meaningless"
            )
            if spec.strict:
                raise FitError(message)
            log.warning(message)
        fixed_mask = _as_fixed(spec.fixed, result.x)
        ctx.spec = spec
        ctx.init_shape = init.shape
        ctx.save_for_backward(result.x, fixed_mask, ~fixed_mask & ~result.active, *params)
        return result.x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        spec: _ArgminSpec = ctx.spec
        x, fixed, free, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            leaves = [
                p.detach().requires_grad_(need) for p, need in zip(params, needs, strict=True)
            ]
            value = spec.twice_nll_of(x, *leaves)
            (grad,) = torch.autograd.grad(value.sum(), x, create_graph=True)
            hess = _hessian_of_grad(grad, x, create_graph=False)
            pair = free.unsqueeze(-1) & free.unsqueeze(-2)
            eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
            matrix = torch.where(pair, hess, 0.0) + eye * (~free).unsqueeze(-1)
            chol, info = torch.linalg.cholesky_ex(matrix)
            if bool((info != 0).any()):
                flat = matrix.reshape(-1, *matrix.shape[-2:])
                element = int(torch.nonzero(info.reshape(-1) != 0)[0])
                members, _ = _degenerate_parameters(flat[element])
                labels = spec.labels or [f"x{i}" for i in range(x.shape[-1])]
                names = ", ".join(labels[i] for i in members) or "none identified"
                raise FitError(
                    "the Hessian at the fitted point is not positive definite in the free "
                    f"parameters; implicit derivative undefined (degenerate: {names})"
                )
            rhs = torch.where(free, grad_out, 0.0).unsqueeze(-1)
            v = torch.where(free, torch.cholesky_solve(rhs, chol).squeeze(-1), 0.0)
            wanted = [leaf for leaf, need in zip(leaves, needs, strict=True) if need]
            grads = iter(
                torch.autograd.grad(grad, wanted, grad_outputs=-v, allow_unused=True)
                if wanted
                else ()
            )
        out = []
        for leaf, need in zip(leaves, needs, strict=True):
            g = next(grads) if need else None
            out.append(torch.zeros_like(leaf) if need and g is None else g)
        grad_init = None
        if ctx.needs_input_grad[1]:
            # a fixed value x_j moves the free parameters by -H_FF^-1 H_Fj and itself by 1
            coupled = (hess @ v.unsqueeze(-1)).squeeze(-1)
            grad_init = torch.where(fixed, grad_out - coupled, 0.0)
            grad_init = grad_init.sum_to_size(ctx.init_shape)
        return (None, grad_init, *out)


def with_implicit_gradient(
    twice_nll: Objective,
    x: torch.Tensor,
    *,
    bounds: Any,
    fixed: Any = None,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """A minimum ``x`` (..., P) of ``twice_nll`` made differentiable in what the objective uses.

    For objectives that close over tensors requiring grad (a likelihood model built from
    yields that carry gradients), where :func:`fitted_parameters` cannot rebuild the objective
    from explicit inputs. Returns one Newton step from the minimum,

        x* = x - H_FF^-1 g_F(x, phi),        g = grad_theta f,  H = d^2 f / d theta^2,

    with ``x`` and ``H`` detached and ``g`` kept in the graph. At the minimum ``g = 0``, so
    ``x*`` equals ``x`` (to rounding), and its derivative is the implicit function theorem's
    ``d theta_hat / d phi = -H^-1 d(grad_theta f)/d phi``. Fixed parameters and parameters on a
    bound (within 1e-10 relative) keep their value and get no derivative through the fit.
    Outside grad mode, or when the objective at ``x`` needs no gradient, ``x`` is returned
    detached. ``hessian``: ``H`` at ``x`` when the caller has it (:class:`NewtonResult`'s, the
    same numbers), else computed here.
    """
    if not torch.is_grad_enabled():
        return x
    x = x.detach()
    if not twice_nll(x).requires_grad:  # the objective depends on nothing that needs a gradient
        return x
    low, high = _as_bounds(bounds, x)
    fixed_mask = _as_fixed(fixed, x)
    scale = 1e-10 * torch.clamp(x.abs(), min=1.0)
    on_bound = ((x - low).abs() <= scale) | ((high - x).abs() <= scale)
    free = ~fixed_mask & ~on_bound
    with torch.enable_grad():
        point = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(twice_nll(point).sum(), point, create_graph=True)
    if hessian is None:
        _, _, hessian = value_grad_hessian(twice_nll, x)
    pair = free.unsqueeze(-1) & free.unsqueeze(-2)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    matrix = torch.where(pair, hessian, 0.0) + eye * (~free).unsqueeze(-1)
    step = torch.linalg.solve(matrix, torch.where(free, grad, 0.0).unsqueeze(-1)).squeeze(-1)
    return x - torch.where(free, step, 0.0)


def fitted_parameters(
    twice_nll_of: Callable[..., torch.Tensor],
    init: Any,
    params: Sequence[torch.Tensor],
    *,
    bounds: Any,
    fixed: Any = None,
    max_iter: int = MAX_ITERATIONS,
    tol: float = 1e-10,
    strict: bool = True,
    labels: Sequence[str] | None = None,
) -> torch.Tensor:
    """Best-fit parameters ``theta_hat(phi)`` (shape of ``init``), differentiable in ``params``.

    ``twice_nll_of(pars, *params)`` is a batched objective (see :func:`newton_minimize`) that
    depends on external tensors ``params`` (yields, templates, ... requiring grad). The forward
    pass runs :func:`newton_minimize` with ``params`` detached; the backward pass applies the
    implicit function theorem (module docstring): with ``v = H_FF^-1 (dL/d theta_hat)_F``,
    ``dL/d phi = -v^T d(grad_theta f)/d phi`` (one Cholesky solve and one vector-Jacobian
    product). Parameters on an active bound get zero derivative. Batched: ``init`` may be
    ``(..., P)`` with ``params`` carrying matching or broadcast batch dimensions. The backward
    pass is itself not differentiable (no second derivatives through the fit).

    ``init`` (a float64 tensor that may require grad) gets a gradient through its *fixed*
    entries only: a conditional fit at a fixed value mu moves the free parameters by
    ``d theta_hat_F / d mu = -H_FF^-1 H_F,mu`` (what a limit found by root finding in mu
    needs); the starting values of free parameters do not change the minimum.

    A batch element that does not converge raises :class:`FitError` (``strict=True``) or logs
    a warning (``strict=False``): its derivative would be meaningless.
    """
    spec = _ArgminSpec(twice_nll_of, bounds, fixed, max_iter, tol, strict, labels)
    if isinstance(init, torch.Tensor) and init.dtype == torch.float64:
        start = init  # keeps its graph: fixed entries get gradients
    else:
        start = _as_init(init)
    return _ImplicitArgmin.apply(spec, start, *params)
