"""Batched maximum-likelihood fits: free fits and fits with the POI fixed (pyhf's ``infer.mle``).

All fits of :mod:`analysis.inference` are the batched torch Newton fits of :mod:`analysis.fit`:
the many fits that a hypotest, a limit, a scan or a set of toys needs run as one batched call,
each element with its own start and, where batched, its own data, bounds and fixed mask.
Everything stays in torch on the model's device. A batch runs in two passes (all elements with a
short iteration cap, then only the stragglers), and a model with kinked parameters is fitted
from three starts, keeping the lowest converged minimum (:func:`minimize`).

A model made by :meth:`~analysis.likelihood.Model.with_numpy_fits` (small, smooth, on the CPU:
what the optimizer's pipeline builds) finds its minima with the numpy backend's Newton fits, the
same algorithm without torch's per-operation cost; values and gradients are still the torch
model's. A fit that the numpy backend cannot bring to a converged minimum is done here instead.
"""

from __future__ import annotations

import logging

import torch

from analysis.fit import FitError, newton_minimize, with_implicit_gradient
from analysis.inference.utils import _settings, require_poi
from analysis.likelihood._tensors import broadcast_shapes
from analysis.likelihood.model import TwiceNLL
from analysis.numpy_backend import Unsupported
from analysis.numpy_backend.fit import KINK_STARTS  # one definition for both engines
from analysis.numpy_backend.fit import minimize as numpy_minimize

log = logging.getLogger(__name__)

#: Newton iterations of the first, whole-batch pass (most fits converge in 3-7)
FIRST_PASS_ITERATIONS = 12


def minimize(model, data, start, *, bounds, fixed, what: str = "fit", parameters_gradient=True):
    """Batched Newton fits of ``model`` to ``data`` from ``start`` (..., P).

    Parameters with a kink at 0 (histosys code0, normsys code1; see
    :meth:`~analysis.likelihood.Model.kinked_parameters`) make the likelihood piecewise smooth
    with possibly one local minimum on each side of the kink, and a Newton fit (or MIGRAD) from
    0 stops in whichever it walks into. Such models are fitted from the given start and from
    the start shifted by +0.5 and -0.5 on all kinked parameters, in one batched call, and the
    lowest converged minimum is kept. Smooth models (code4/code4p, pyhf's defaults) are fitted
    once. Returns (parameters (..., P), twice_nll (...)).

    In grad mode the results are differentiable in whatever the model and the data were built
    from: the minimum value by the envelope theorem, ``d f(theta_hat(phi), phi) / d phi =
    df/dphi`` at the fixed ``theta_hat`` (``df/dtheta = 0`` at the minimum in the free
    parameters; fixed ones and ones held on a bound do not move), and the parameters by the
    implicit function theorem (:func:`~analysis.fit.with_implicit_gradient`), unless
    ``parameters_gradient=False`` (a caller that uses only the minimum value: it saves a
    second-order graph, built here and traversed by every backward pass through the value).
    """
    objective = TwiceNLL(model, data)
    x, fun, hessian = _best_minimum(model, objective, start, bounds, fixed, what)
    if not torch.is_grad_enabled():
        return x, fun
    fun = objective(x)  # the envelope theorem: x without a graph
    if parameters_gradient:
        x = with_implicit_gradient(objective, x, bounds=bounds, fixed=fixed, hessian=hessian)
    return x, fun


def _best_minimum(model, objective, start, bounds, fixed, what):
    """``(x, twice_nll, Hessian)`` at the best converged minimum (:func:`minimize`): by the
    numpy backend for a model :meth:`~analysis.likelihood.Model.with_numpy_fits` (one fit or
    a row of fits, bounds for all) where it converges, else here."""
    data = objective.data
    batch = start.shape[:-1]
    if (
        model.numpy_fits is not None
        and len(batch) <= 1
        and data.shape[:-1] in ((), batch)
        and fixed.shape[:-1] in ((), batch)
        and bounds.dim() == 2
    ):
        try:
            return _numpy_minimum(model.numpy_fits, data, start, bounds, fixed, what)
        except Unsupported:  # not finite at a start, or not converged: torch's fits report
            pass
    kinked = model.kinked_parameters() & ~fixed
    if not bool(kinked.any()):
        x, fun, converged, hessian = _newton(model, data, start, bounds, fixed)
        _report_unconverged(model, converged, what)
        return x, fun, hessian
    offsets = [torch.zeros_like(start)] + [
        torch.where(kinked, d, 0.0).expand_as(start) for d in KINK_STARTS
    ]
    starts = torch.stack([start + o for o in offsets])
    starts = torch.minimum(torch.maximum(starts, bounds[:, 0]), bounds[:, 1])
    starts = torch.where(fixed, start, starts)
    x, fun, converged, hessian = _newton(model, data, starts, bounds, fixed)
    best = torch.where(converged, fun, torch.inf).argmin(0)
    x = torch.take_along_dim(x, best[None, ..., None], dim=0)[0]
    hessian = torch.take_along_dim(hessian, best[None, ..., None, None], dim=0)[0]
    _report_unconverged(model, converged.any(0), what)
    return x, torch.take_along_dim(fun, best[None], dim=0)[0], hessian


def _numpy_minimum(twin, data, start, bounds, fixed, what):
    """:func:`_best_minimum` by :func:`analysis.numpy_backend.fit.minimize` on ``twin``, the
    :class:`~analysis.numpy_backend.model.NumpyModel` of the same numbers, as tensors like
    ``start``; raises :class:`~analysis.numpy_backend.Unsupported` where it cannot fit or a
    fit does not converge."""
    rows = start.reshape(-1, start.shape[-1])
    result = numpy_minimize(
        twin,
        data.detach().cpu().numpy(),
        rows.detach().cpu().numpy(),
        bounds.detach().cpu().numpy(),
        fixed.expand_as(rows).cpu().numpy(),
    )
    if not result.converged.all():
        raise Unsupported(f"{int((~result.converged).sum())} {what}(s) did not converge")
    x = torch.from_numpy(result.x).to(start).reshape(start.shape)
    fun = torch.from_numpy(result.fun).to(start).reshape(start.shape[:-1])
    hessian = torch.from_numpy(result.hessian).to(start)
    return x, fun, hessian.reshape(*start.shape, start.shape[-1])


def _newton(model, data, start, bounds, fixed):
    """Batched Newton fits in two passes: all elements with a short iteration cap, then only
    the ones that have not converged, on their own slice of the data (a few stragglers would
    otherwise keep the whole batch iterating). Returns ``(x, twice_nll, converged, Hessian)``
    (the Hessian at ``x``, for :func:`~analysis.fit.with_implicit_gradient`)."""
    result = newton_minimize(
        TwiceNLL(model, data),
        start,
        bounds=bounds,
        fixed=fixed,
        max_iter=FIRST_PASS_ITERATIONS,
    )
    x, fun, converged, hessian = result.x, result.fun, result.converged, result.hessian
    if bool(converged.all()) or start.dim() == 1:
        if not bool(converged.all()):  # a single fit: just keep going
            more = newton_minimize(TwiceNLL(model, data), x, bounds=bounds, fixed=fixed)
            return more.x, more.fun, more.converged, more.hessian
        return x, fun, converged, hessian
    # the stragglers' own rows of everything that may be batched: data, bounds, fixed masks
    todo, batch = ~converged, start.shape[:-1]
    rest = data.expand(*batch, data.shape[-1])[todo]
    more = newton_minimize(
        TwiceNLL(model, rest),
        x[todo],
        bounds=bounds.expand(*batch, *bounds.shape[-2:])[todo],
        fixed=fixed.expand(*batch, fixed.shape[-1])[todo],
    )
    x, fun, converged, hessian = x.clone(), fun.clone(), converged.clone(), hessian.clone()
    x[todo], fun[todo], converged[todo] = more.x, more.fun, more.converged
    hessian[todo] = more.hessian
    return x, fun, converged, hessian


def _report_unconverged(model, converged: torch.Tensor, what: str) -> None:
    """Warn about the fits that did not converge, or raise FitError for a model
    :meth:`~analysis.likelihood.Model.with_strict_fits`."""
    failed = int((~converged).sum())
    if not failed:
        return
    message = f"{failed} of {converged.numel()} {what}(s) did not converge"
    if model.strict_fits:
        raise FitError(message)
    log.warning("%s", message)


def free_fit(model, data, *, init=None, bounds=None, fixed=None, parameters_gradient=True):
    """Batched unconditional fits: returns (parameters (..., P), twice_nll (...));
    ``parameters_gradient``: see :func:`minimize`."""
    init, bounds, fixed = _settings(model, init, bounds, fixed)
    start = init.expand(*data.shape[:-1], init.shape[-1]).clone()
    return minimize(
        model,
        data,
        start,
        bounds=bounds,
        fixed=fixed,
        what="free fit",
        parameters_gradient=parameters_gradient,
    )


def fixed_poi_fit(
    model, data, poi_value, *, init=None, bounds=None, fixed=None, parameters_gradient=True
):
    """Batched fits with the POI fixed at ``poi_value`` (broadcast against the data's batch);
    ``parameters_gradient``: see :func:`minimize`."""
    init, bounds, fixed = _settings(model, init, bounds, fixed)
    poi = require_poi(model)
    poi_value = torch.as_tensor(poi_value, dtype=init.dtype, device=init.device)
    batch = broadcast_shapes(data.shape[:-1], poi_value.shape)
    start = init.expand(*batch, init.shape[-1]).clone()
    start[..., poi] = poi_value
    fixed = fixed.clone()
    fixed[poi] = True
    x, fun = minimize(
        model,
        data,
        start,
        bounds=bounds,
        fixed=fixed,
        what="fixed-POI fit",
        parameters_gradient=parameters_gradient,
    )
    if poi_value.requires_grad:  # the POI column carries the tested value's gradient
        is_poi = torch.arange(x.shape[-1], device=x.device) == poi
        x = torch.where(is_poi, poi_value.unsqueeze(-1), x)
        fun = model.twice_nll(x, data)
    return x, fun
