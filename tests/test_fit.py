"""Fits (analysis/fit.py) against independent references: scipy, finite differences, scans.

The test model is a four-bin Poisson counting experiment written here twice, in torch (what the
fitter sees) and in numpy with its hand-derived gradient (what scipy sees):

    lam_i = mu s_i + beta gamma_i b_i
    twice_nll = 2 sum_i [lam_i - n_i log lam_i + lgamma(n_i + 1)]
                + ((beta - 1) / 0.1)^2 + sum_i ((gamma_i - 1) / sigma_i)^2

with the signal strength mu, a background normalisation beta and one gamma factor per bin
(Gaussian constraints, as pyhf's staterror).
"""

from __future__ import annotations

import json
import logging
import math
import pickle

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import torch

import analysis.fit as fit_module
from analysis.fit import (
    FitError,
    fit,
    fit_model,
    fitted_parameters,
    newton_minimize,
    value_grad_hessian,
)

SIGNAL = np.array([4.0, 9.0, 16.0, 10.0])
BACKGROUND = np.array([110.0, 75.0, 42.0, 28.0])
GAMMA_SIGMA = np.array([0.04, 0.06, 0.09, 0.12])
BETA_SIGMA = 0.1
OBSERVED = np.array([118.0, 92.0, 66.0, 40.0])
DEFICIT = np.array([90.0, 56.0, 30.0, 19.0])  # below the background: mu_hat < 0
LABELS = ("mu", "bkg_norm", "gamma[0]", "gamma[1]", "gamma[2]", "gamma[3]")
INIT = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
BOUNDS = np.array([(-2.0, 50.0), (0.0, 10.0)] + [(1e-10, 10.0)] * 4)
POI_BOUNDS = BOUNDS.copy()
POI_BOUNDS[0] = (0.0, 50.0)


def t64(a: object) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def twice_nll_of(
    pars: torch.Tensor, signal: torch.Tensor, background: torch.Tensor, observed: torch.Tensor
) -> torch.Tensor:
    """Batched torch objective: pars (..., 6), yields (4,) or batched, observed (..., 4)."""
    mu, beta, gamma = pars[..., :1], pars[..., 1:2], pars[..., 2:]
    lam = mu * signal + beta * gamma * background
    poisson = 2 * (lam - observed * torch.log(lam) + torch.lgamma(observed + 1)).sum(-1)
    sigma = t64(GAMMA_SIGMA).to(pars.device)
    constraint = ((beta[..., 0] - 1) / BETA_SIGMA) ** 2 + (((gamma - 1) / sigma) ** 2).sum(-1)
    return poisson + constraint


def objective(observed: np.ndarray = OBSERVED):
    s, b, n = t64(SIGNAL), t64(BACKGROUND), t64(observed)
    return lambda pars: twice_nll_of(pars, s, b, n)


def np_twice_nll(x: np.ndarray, n: np.ndarray = OBSERVED) -> float:
    mu, beta, gamma = x[0], x[1], x[2:]
    lam = mu * SIGNAL + beta * gamma * BACKGROUND
    poisson = 2 * np.sum(lam - n * np.log(lam) + scipy.special.gammaln(n + 1))
    return poisson + ((beta - 1) / BETA_SIGMA) ** 2 + np.sum(((gamma - 1) / GAMMA_SIGMA) ** 2)


def np_gradient(x: np.ndarray, n: np.ndarray = OBSERVED) -> np.ndarray:
    mu, beta, gamma = x[0], x[1], x[2:]
    lam = mu * SIGNAL + beta * gamma * BACKGROUND
    r = 2 * (1 - n / lam)
    return np.concatenate(
        [
            [np.sum(r * SIGNAL)],
            [np.sum(r * gamma * BACKGROUND) + 2 * (beta - 1) / BETA_SIGMA**2],
            r * beta * BACKGROUND + 2 * (gamma - 1) / GAMMA_SIGMA**2,
        ]
    )


def scipy_fit(
    n: np.ndarray = OBSERVED,
    bounds: np.ndarray = BOUNDS,
    fixed: dict[int, float] | None = None,
    init: np.ndarray = INIT,
) -> tuple[np.ndarray, float]:
    """L-BFGS-B with the hand-written gradient; fixed parameters removed from the problem.

    L-BFGS-B stops at gradients of ~1e-6 (its line search hits the rounding of f), so its
    answer is polished by solving grad = 0 in the parameters off their bounds with MINPACK's
    hybrd (scipy.optimize.root), and the polished gradient is checked.
    """
    fixed = fixed or {}
    free = [i for i in range(len(init)) if i not in fixed]

    def full(z: np.ndarray) -> np.ndarray:
        x = np.array(init, dtype=float)
        x[free] = z
        for i, v in fixed.items():
            x[i] = v
        return x

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        x = full(z)
        with np.errstate(invalid="ignore", divide="ignore"):  # lam <= 0: scipy backs off
            value, grad = np_twice_nll(x, n), np_gradient(x, n)[free]
        return (value, grad) if np.isfinite(value) else (np.inf, grad)

    z0 = np.array(init, dtype=float)[free]
    opts = {"ftol": 1e-16, "gtol": 1e-11, "maxiter": 10_000, "maxcor": 30}
    res = scipy.optimize.minimize(
        fun, z0, jac=True, method="L-BFGS-B", bounds=bounds[free], options=opts
    )
    z = res.x
    inner = ~_at_bound(z, bounds[free])

    def grad_inner(y: np.ndarray) -> np.ndarray:
        w = z.copy()
        w[inner] = y
        return fun(w)[1][inner]

    root = scipy.optimize.root(grad_inner, z[inner], method="hybr", options={"xtol": 1e-15})
    z = z.copy()
    z[inner] = root.x
    assert np.max(np.abs(fun(z)[1][inner])) < 1e-9
    return full(z), float(fun(z)[0])


def _at_bound(z: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    return (z <= bounds[:, 0] + 1e-12) | (z >= bounds[:, 1] - 1e-12)


def fd_covariance(x: np.ndarray, free: list[int], n: np.ndarray = OBSERVED) -> np.ndarray:
    """2 H^-1 from a central finite-difference Hessian of np_twice_nll (free parameters)."""
    h = 1e-4 * np.maximum(1.0, np.abs(x))
    k = len(free)
    hess = np.empty((k, k))
    for a, i in enumerate(free):
        for c, j in enumerate(free):
            total = 0.0
            for si, sj, sign in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
                y = x.copy()
                y[i] += si * h[i]
                y[j] += sj * h[j]
                total += sign * np_twice_nll(y, n)
            hess[a, c] = total / (4 * h[i] * h[j])
    return 2 * np.linalg.inv(hess)


# MIGRAD's default goal (cabinetry's settings, EDM < 2e-5) leaves the best fit ~1e-4 from the
# minimum; the 1e-6 comparisons run Minuit with a tight goal, the defaults are tested separately.
TIGHT = {
    "newton": {"method": "newton"},
    "minuit": {"method": "minuit", "strategy": 2, "tolerance": 1e-6},
}


# --------------------------------------------------------------------------------------------
# fit(): best fit, uncertainties, bounds, fixed parameters
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_fit() -> tuple[np.ndarray, float, np.ndarray]:
    x, fun = scipy_fit()
    cov = fd_covariance(x, list(range(6)))
    return x, fun, cov


@pytest.mark.parametrize("method", ["newton", "minuit"])
def test_fit_matches_scipy_and_finite_difference_hessian(method, reference_fit):
    x_ref, fun_ref, cov_ref = reference_fit
    result = fit(objective(), INIT, bounds=BOUNDS, labels=LABELS, **TIGHT[method])
    assert result.converged
    assert result.labels == LABELS
    np.testing.assert_allclose(result.bestfit.numpy(), x_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(result.twice_nll), fun_ref, rtol=1e-12, atol=1e-9)
    sigma_ref = np.sqrt(np.diag(cov_ref))
    corr_ref = cov_ref / np.outer(sigma_ref, sigma_ref)
    # HESSE propagates errors through Minuit's sin/sqrt transformation of limited parameters,
    # which biases them by ~3e-4 here (cabinetry's reference numbers carry the same bias)
    rtol = 1e-4 if method == "newton" else 1e-3
    np.testing.assert_allclose(result.uncertainty.numpy(), sigma_ref, rtol=rtol)
    np.testing.assert_allclose(result.corr_mat.numpy(), corr_ref, rtol=0, atol=rtol)


def test_minuit_hesse_without_limits_matches_finite_difference_hessian(reference_fit):
    x_ref, fun_ref, cov_ref = reference_fit
    unlimited = np.array([(-np.inf, np.inf)] * 6)
    result = fit(objective(), INIT, bounds=unlimited, labels=LABELS, **TIGHT["minuit"])
    assert result.converged
    np.testing.assert_allclose(result.bestfit.numpy(), x_ref, rtol=0, atol=1e-6)
    sigma_ref = np.sqrt(np.diag(cov_ref))
    np.testing.assert_allclose(result.uncertainty.numpy(), sigma_ref, rtol=1e-4)
    corr_ref = cov_ref / np.outer(sigma_ref, sigma_ref)
    np.testing.assert_allclose(result.corr_mat.numpy(), corr_ref, rtol=0, atol=1e-4)


def test_minuit_default_settings_reach_their_edm_goal(reference_fit):
    """strategy 1, tol 0.01 (cabinetry): twice_nll within the EDM goal 0.002 * tol = 2e-5."""
    x_ref, fun_ref, cov_ref = reference_fit
    result = fit(objective(), INIT, bounds=BOUNDS, labels=LABELS, method="minuit")
    assert result.converged
    assert 0 <= float(result.twice_nll) - fun_ref < 2e-5
    sigma_ref = np.sqrt(np.diag(cov_ref))
    # a rise of 2e-5 in twice_nll is a displacement of at most sqrt(2e-5) standard deviations
    assert np.all(np.abs(result.bestfit.numpy() - x_ref) < math.sqrt(2e-5) * sigma_ref)
    np.testing.assert_allclose(result.uncertainty.numpy(), sigma_ref, rtol=1e-3)


def test_fit_result_to_dict_is_json_ready(reference_fit):
    result = fit(objective(), INIT, bounds=BOUNDS, labels=LABELS, minos=["mu"], method="newton")
    assert pickle.loads(pickle.dumps(result)).minos == result.minos  # workflows pickle results
    out = json.loads(json.dumps(result.to_dict()))
    assert set(out) == {
        "labels",
        "bestfit",
        "uncertainty",
        "corr_mat",
        "twice_nll",
        "minos",
        "converged",
        "at_bound",
    }
    assert out["labels"] == list(LABELS)
    assert out["bestfit"] == pytest.approx(reference_fit[0].tolist(), abs=1e-6)
    assert len(out["corr_mat"]) == 6 and len(out["corr_mat"][0]) == 6
    assert list(out["minos"]) == ["mu"] and out["minos"]["mu"][0] < 0 < out["minos"]["mu"][1]
    assert out["converged"] is True


@pytest.mark.parametrize("method", ["newton", "minuit"])
def test_poi_bound_gives_the_constrained_minimum(method):
    x_free, _ = scipy_fit(DEFICIT, bounds=BOUNDS)
    assert x_free[0] < -0.5  # the unconstrained minimum is at mu < 0
    x_ref, fun_ref = scipy_fit(DEFICIT, bounds=BOUNDS, fixed={0: 0.0})  # conditional at mu = 0
    result = fit(objective(DEFICIT), INIT, bounds=POI_BOUNDS, labels=LABELS, **TIGHT[method])
    assert result.converged
    assert float(result.bestfit[0]) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(result.bestfit.numpy(), x_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(result.twice_nll), fun_ref, rtol=1e-12, atol=1e-9)
    if method == "newton":  # exactly on the bound, not approaching it
        assert float(result.bestfit[0]) == 0.0


def test_newton_reports_active_bound():
    result = newton_minimize(objective(DEFICIT), INIT, bounds=POI_BOUNDS)
    assert bool(result.converged)
    assert result.active.tolist() == [True] + [False] * 5


@pytest.mark.parametrize("method", ["newton", "minuit"])
def test_fixed_parameters_stay_fixed_with_zero_uncertainty(method):
    fixed = np.array([False, True, False, True, False, False])
    init = INIT.copy()
    init[1], init[3] = 1.07, 0.95
    result = fit(objective(), init, bounds=BOUNDS, fixed=fixed, labels=LABELS, **TIGHT[method])
    x_ref, fun_ref = scipy_fit(fixed={1: 1.07, 3: 0.95})
    assert result.converged
    assert result.bestfit[1].item() == 1.07 and result.bestfit[3].item() == 0.95
    np.testing.assert_allclose(result.bestfit.numpy(), x_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(result.twice_nll), fun_ref, rtol=1e-12, atol=1e-9)
    assert result.uncertainty[1].item() == 0.0 and result.uncertainty[3].item() == 0.0
    free = [0, 2, 4, 5]
    sigma_ref = np.sqrt(np.diag(fd_covariance(x_ref, free)))
    rtol = 1e-4 if method == "newton" else 1e-3  # Minuit: see the limit-transformation note
    np.testing.assert_allclose(result.uncertainty.numpy()[free], sigma_ref, rtol=rtol)
    # cabinetry (iminuit's correlation()) reports all-zero rows for fixed parameters
    for i in (1, 3):
        assert torch.all(result.corr_mat[i] == 0) and torch.all(result.corr_mat[:, i] == 0)
    np.testing.assert_allclose(result.corr_mat.diagonal()[free].numpy(), 1.0, atol=1e-12)


def test_fixed_parameter_may_sit_outside_its_bounds():
    bounds = BOUNDS.copy()
    bounds[2] = (0.5, 1.0)
    init = INIT.copy()
    init[2] = 1.02  # above its bound, but fixed (a --fix outside the suggested range)
    fixed = [False, False, True, False, False, False]
    x_ref, _ = scipy_fit(bounds=bounds, fixed={2: 1.02})
    for method in ("newton", "minuit"):
        result = fit(objective(), init, bounds=bounds, fixed=fixed, **TIGHT[method])
        assert result.converged
        assert result.bestfit[2].item() == 1.02
        np.testing.assert_allclose(result.bestfit.numpy(), x_ref, rtol=0, atol=1e-6)


def test_fit_model_uses_the_model_interface(reference_fit):
    class CountingModel:
        par_names = LABELS
        poi_index = 0

        def twice_nll(self, pars, data):
            return twice_nll_of(pars, t64(SIGNAL), t64(BACKGROUND), data)

        def suggested_init(self):
            return t64(INIT)

        def suggested_bounds(self):
            return t64(BOUNDS)

        def suggested_fixed(self):
            return torch.zeros(6, dtype=torch.bool)

    result = fit_model(CountingModel(), t64(OBSERVED), method="newton")
    assert result.labels == LABELS
    np.testing.assert_allclose(result.bestfit.numpy(), reference_fit[0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Batched Newton
# --------------------------------------------------------------------------------------------


def test_batched_newton_equals_scipy_and_single_fits():
    rng = np.random.default_rng(11)
    expected = SIGNAL + BACKGROUND
    data = rng.poisson(expected, size=(1000, 4)).astype(float)
    init = np.broadcast_to(INIT, (1000, 6))
    batched = newton_minimize(objective(data), init, bounds=BOUNDS)
    assert batched.x.shape == (1000, 6) and batched.fun.shape == (1000,)
    assert bool(batched.converged.all())
    assert int(batched.n_iter.max()) <= 10
    for i in rng.choice(1000, size=20, replace=False):
        x_ref, fun_ref = scipy_fit(data[i])
        np.testing.assert_allclose(batched.x[i].numpy(), x_ref, rtol=0, atol=1e-6)
        assert float(batched.fun[i]) == pytest.approx(fun_ref, rel=1e-12, abs=1e-9)
    for i in range(0, 1000, 10):  # single-problem Newton fits (batch shape ())
        single = newton_minimize(objective(data[i]), INIT, bounds=BOUNDS)
        assert bool(single.converged)
        np.testing.assert_allclose(single.x.numpy(), batched.x[i].numpy(), rtol=0, atol=1e-9)


def test_batched_newton_over_two_leading_dimensions_and_per_element_fixing():
    """A (3, 4) batch: conditional fits at 4 mu values for 3 datasets (mu fixed per element)."""
    data = np.stack([OBSERVED, DEFICIT, OBSERVED + 5])
    mu_values = np.array([0.0, 0.5, 1.0, 2.0])
    init = np.broadcast_to(INIT, (3, 4, 6)).copy()
    init[..., 0] = mu_values
    obj = objective(data[:, None, :])
    result = newton_minimize(obj, init, bounds=BOUNDS, fixed=[True] + [False] * 5)
    assert result.x.shape == (3, 4, 6) and bool(result.converged.all())
    for d in range(3):
        for m in (0, 3):
            x_ref, fun_ref = scipy_fit(data[d], fixed={0: mu_values[m]})
            np.testing.assert_allclose(result.x[d, m].numpy(), x_ref, rtol=0, atol=1e-6)
            assert float(result.fun[d, m]) == pytest.approx(fun_ref, rel=1e-12)


# --------------------------------------------------------------------------------------------
# MINOS
# --------------------------------------------------------------------------------------------


def scan_interval(index: int, n: np.ndarray = OBSERVED) -> tuple[float, float]:
    """Where the profiled twice_nll (scipy fits) exceeds its minimum by 1, by brentq."""
    x_hat, fun_hat = scipy_fit(n)

    def excess(value: float) -> float:
        init = x_hat.copy()
        init[index] = value
        return scipy_fit(n, fixed={index: value}, init=init)[1] - fun_hat - 1.0

    center = x_hat[index]
    lower = scipy.optimize.brentq(excess, center - 3.0, center, xtol=1e-10)
    upper = scipy.optimize.brentq(excess, center, center + 3.0, xtol=1e-10)
    return lower - center, upper - center


@pytest.mark.parametrize("method", ["newton", "minuit"])
def test_minos_matches_profile_likelihood_scan(method):
    reference = scan_interval(0)
    result = fit(objective(), INIT, bounds=BOUNDS, labels=LABELS, minos=["mu"], method=method)
    assert set(result.minos) == {"mu"}
    lower, upper = result.minos["mu"]
    assert lower < 0 < upper
    tolerance = 1e-6 if method == "newton" else 1e-3
    np.testing.assert_allclose([lower, upper], reference, rtol=tolerance)
    assert abs(lower) != pytest.approx(upper, rel=1e-3)  # the interval is asymmetric


def test_minos_unknown_name_lists_the_parameters():
    with pytest.raises(KeyError, match="not_a_parameter.*gamma"):
        fit(objective(), INIT, bounds=BOUNDS, labels=LABELS, minos=["not_a_parameter"])


# --------------------------------------------------------------------------------------------
# Gradients through fits
# --------------------------------------------------------------------------------------------


def _yields(requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        t64(SIGNAL).requires_grad_(requires_grad),
        t64(BACKGROUND).requires_grad_(requires_grad),
    )


def _theta_hat(signal, background, observed=OBSERVED, bounds=BOUNDS, fixed=None):
    n = t64(observed)
    return fitted_parameters(
        lambda pars, s, b: twice_nll_of(pars, s, b, n),
        INIT,
        (signal, background),
        bounds=bounds,
        fixed=fixed,
    )


def test_fitted_parameters_gradcheck():
    signal, background = _yields()
    assert torch.autograd.gradcheck(
        lambda s, b: _theta_hat(s, b), (signal, background), eps=1e-6, atol=1e-6, rtol=1e-4
    )


def _central_jacobian(func, inputs: tuple[torch.Tensor, ...], rel_step: float = 1e-5):
    """d func / d inputs by central differences, one column per input element."""
    columns = []
    for k, tensor in enumerate(inputs):
        for i in range(tensor.numel()):
            h = rel_step * abs(float(tensor.detach().reshape(-1)[i]))
            shifted = []
            for sign in (1.0, -1.0):
                args = [t.detach().clone() for t in inputs]
                args[k].reshape(-1)[i] += sign * h
                shifted.append(func(*args).detach())
            columns.append((shifted[0] - shifted[1]) / (2 * h))
    return torch.stack(columns, dim=-1)


def _autograd_jacobian(func, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = func(*inputs)
    rows = []
    for j in range(out.numel()):
        grads = torch.autograd.grad(out.reshape(-1)[j], inputs, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).reshape(*out.shape, -1)


@pytest.mark.parametrize("conditional", [False, True], ids=["free", "mu-fixed"])
def test_fitted_parameters_match_finite_differences(conditional):
    fixed = [True] + [False] * 5 if conditional else None  # conditional fit at mu = 1

    def func(s, b):
        return _theta_hat(s, b, fixed=fixed)

    inputs = _yields()
    analytic = _autograd_jacobian(func, inputs)
    numeric = _central_jacobian(func, inputs)
    assert analytic.shape == (6, 8)
    assert torch.all(analytic[0] == 0) == conditional
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-8)


def test_conditional_fit_is_differentiable_in_the_fixed_value():
    """d theta_hat / d mu at a conditional fit (mu fixed), as a limit by root finding needs."""
    n = t64(OBSERVED)
    fixed = [True] + [False] * 5

    def theta(mu, s):
        init = torch.cat([mu.reshape(1), t64(INIT[1:])])
        return fitted_parameters(
            lambda pars, s_: twice_nll_of(pars, s_, t64(BACKGROUND), n),
            init,
            (s,),
            bounds=BOUNDS,
            fixed=fixed,
        )

    inputs = (t64([0.7]).requires_grad_(True), t64(SIGNAL).requires_grad_(True))
    analytic = _autograd_jacobian(theta, inputs)
    numeric = _central_jacobian(theta, inputs)
    assert analytic[0, 0] == 1.0  # the fixed parameter itself
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-8)
    assert torch.autograd.gradcheck(theta, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_fitted_parameters_on_an_active_bound_do_not_move():
    def func(s, b):
        return _theta_hat(s, b, observed=DEFICIT, bounds=POI_BOUNDS)

    inputs = _yields()
    analytic = _autograd_jacobian(func, inputs)
    numeric = _central_jacobian(func, inputs)
    assert torch.all(analytic[0] == 0)  # mu stays on its bound
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-8)


def _sigma_mu(signal: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """sqrt(2 [H^-1]_mu,mu) at the best fit, differentiable through theta_hat and the yields."""
    n = t64(OBSERVED)
    theta_hat = _theta_hat(signal, background)
    _, _, hess = value_grad_hessian(
        lambda pars: twice_nll_of(pars, signal, background, n), theta_hat, create_graph=True
    )
    return torch.sqrt(2 * torch.linalg.inv(hess)[0, 0])


def test_sigma_mu_derivative_matches_finite_differences():
    inputs = _yields()
    sigma = _sigma_mu(*inputs)
    x_ref, _ = scipy_fit()
    sigma_ref = math.sqrt(fd_covariance(x_ref, list(range(6)))[0, 0])
    assert sigma.item() == pytest.approx(sigma_ref, rel=1e-4)
    analytic = torch.cat([g.reshape(-1) for g in torch.autograd.grad(sigma, inputs)])
    numeric = _central_jacobian(_sigma_mu, inputs)
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-9)


def test_profiled_value_by_envelope_theorem():
    """d/dphi of twice_nll(theta_hat.detach(), phi) is the total derivative of the profile."""
    n = t64(OBSERVED)

    def profiled(s, b):
        theta_hat = _theta_hat(s.detach(), b.detach()).detach()
        return twice_nll_of(theta_hat, s, b, n)

    inputs = _yields()
    analytic = torch.cat([g.reshape(-1) for g in torch.autograd.grad(profiled(*inputs), inputs)])
    numeric = _central_jacobian(profiled, inputs)
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-9)


def test_batched_fitted_parameters_sum_over_toys():
    """Shared yields, 8 datasets: the gradient of the summed best fits is the summed gradient."""
    rng = np.random.default_rng(3)
    data = t64(rng.poisson(SIGNAL + BACKGROUND, size=(8, 4)))
    signal, background = _yields()

    def theta(s, b):
        return fitted_parameters(
            lambda pars, s_, b_: twice_nll_of(pars, s_, b_, data),
            np.broadcast_to(INIT, (8, 6)),
            (s, b),
            bounds=BOUNDS,
        )

    batched = torch.autograd.grad(theta(signal, background)[:, 0].sum(), signal)[0]
    single = torch.zeros(4, dtype=torch.float64)
    for k in range(8):
        s = t64(SIGNAL).requires_grad_(True)
        mu_hat = fitted_parameters(
            lambda pars, s_, n=data[k]: twice_nll_of(pars, s_, t64(BACKGROUND), n),
            INIT,
            (s,),
            bounds=BOUNDS,
        )[0]
        single += torch.autograd.grad(mu_hat, s)[0]
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Failures are reported
# --------------------------------------------------------------------------------------------


def test_non_convergence_is_reported(caplog):
    result = newton_minimize(objective(), INIT, bounds=BOUNDS, max_iter=1)
    assert not bool(result.converged) and int(result.n_iter) == 1
    with caplog.at_level(logging.WARNING, logger="analysis.fit"):
        fitted = fit(objective(), INIT, bounds=BOUNDS, labels=LABELS, method="newton", max_iter=1)
    assert fitted.converged is False
    assert "did not converge" in caplog.text
    assert fitted.to_dict()["converged"] is False


def test_non_converged_implicit_fit_raises():
    with pytest.raises(FitError, match="did not converge"):
        fitted_parameters(
            lambda pars, s: twice_nll_of(pars, s, t64(BACKGROUND), t64(OBSERVED)),
            INIT,
            (t64(SIGNAL),),
            bounds=BOUNDS,
            max_iter=1,
        )


def _degenerate(pars: torch.Tensor) -> torch.Tensor:
    """a and b enter only as a + b: a flat direction in (a, b); c is well determined."""
    a, b, c = pars[..., 0], pars[..., 1], pars[..., 2]
    return ((a + b - 1.0) / 0.2) ** 2 + ((c - 2.0) / 0.5) ** 2 + 0.1 * (a + b) ** 4


@pytest.mark.parametrize("method", ["newton", "minuit"])
def test_singular_hessian_is_a_warning_naming_the_degenerate_parameters(method, caplog):
    """a + b is determined, a and b are not: a warning names them, their uncertainties and
    correlations are NaN, and c keeps its exact error 0.5 (twice_nll = ((c - 2) / 0.5)^2)."""
    bounds = [(-10.0, 10.0)] * 3
    result = fit(
        _degenerate, [0.3, 0.1, 1.0], bounds=bounds, labels=("alpha", "beta", "c"), method=method
    )
    import scipy.optimize

    assert "degenerate parameters alpha, beta" in caplog.text
    assert bool(result.uncertainty[:2].isnan().all())
    # HESSE's finite differences are good to 1e-3; the Newton path's Hessian is exact
    assert float(result.uncertainty[2]) == pytest.approx(
        0.5, rel=1e-6 if method == "newton" else 2e-3
    )
    # s = a + b minimises ((s - 1) / 0.2)^2 + 0.1 s^4: 50 (s - 1) + 0.4 s^3 = 0
    s_hat = scipy.optimize.brentq(lambda s: 50 * (s - 1) + 0.4 * s**3, 0.0, 2.0)
    assert float(result.bestfit[0] + result.bestfit[1]) == pytest.approx(s_hat, abs=1e-4)
    assert bool(result.corr_mat[0].isnan().all())
    assert float(result.corr_mat[2, 2]) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("method", ["newton", "minuit"])
def test_non_finite_start_names_the_parameters(method):
    init = INIT.copy()
    init[0] = -2.0  # lam < 0 in bin 2: log of a negative number
    init[4] = 0.5
    with pytest.raises(FitError, match=r"twice_nll is nan at the start point.*mu=-2"):
        fit(objective(), init, bounds=BOUNDS, labels=LABELS, method=method)


def test_non_finite_start_in_a_batch_names_the_element():
    init = np.broadcast_to(INIT, (5, 6)).copy()
    init[3, 0], init[3, 4] = -2.0, 0.5
    with pytest.raises(FitError, match=r"batch element \(3,\).*mu=-2"):
        newton_minimize(objective(), init, bounds=BOUNDS, labels=LABELS)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"bounds has shape \(5, 2\)"):
        newton_minimize(objective(), INIT, bounds=BOUNDS[:5])
    with pytest.raises(ValueError, match="returned shape"):
        newton_minimize(lambda p: p.sum(), np.stack([INIT, INIT]), bounds=BOUNDS)
    with pytest.raises(ValueError, match="outside its bounds"):
        newton_minimize(objective(), INIT * 100, bounds=BOUNDS, labels=LABELS)


@pytest.mark.parametrize("vmap_elements", [0, 500_000])
def test_batched_hessian_matches_finite_differences(monkeypatch, vmap_elements):
    """Both Hessian paths (a loop of reverse passes, one vmapped pass) on a (2, 3) batch."""
    monkeypatch.setattr(fit_module, "_VMAP_HESSIAN_ELEMENTS", vmap_elements)
    rng = np.random.default_rng(2)
    points = INIT + rng.normal(0, 0.05, size=(2, 3, 6))
    data = rng.poisson(SIGNAL + BACKGROUND, size=(2, 3, 4)).astype(float)
    value, grad, hess = value_grad_hessian(objective(data), t64(points))
    assert value.shape == (2, 3) and grad.shape == (2, 3, 6) and hess.shape == (2, 3, 6, 6)
    for i, j in ((0, 0), (1, 2)):
        assert value[i, j].item() == pytest.approx(np_twice_nll(points[i, j], data[i, j]), 1e-13)
        np.testing.assert_allclose(grad[i, j].numpy(), np_gradient(points[i, j], data[i, j]))
        fd_hess = 2 * np.linalg.inv(fd_covariance(points[i, j], list(range(6)), data[i, j]))
        np.testing.assert_allclose(hess[i, j].numpy(), fd_hess, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Non-convex starts and devices
# --------------------------------------------------------------------------------------------


def test_newton_leaves_regions_of_negative_curvature():
    """Double well (x^2 - 1)^2 + y^2 and Rosenbrock from classic starts, as one batch each."""

    def double_well(p):
        return (p[..., 0] ** 2 - 1) ** 2 + p[..., 1] ** 2

    starts = np.array([[0.1, 0.5], [-0.3, -1.0], [2.5, 3.0], [0.0, 1.0]])
    result = newton_minimize(double_well, starts, bounds=[(-5.0, 5.0)] * 2, max_iter=50)
    np.testing.assert_allclose(result.x[:3].numpy(), [[1, 0], [-1, 0], [1, 0]], atol=1e-12)
    # started on the ridge (x = 0, zero gradient, negative curvature): honestly not converged
    assert result.converged.tolist() == [True, True, True, False]

    def rosenbrock(p):
        return (1 - p[..., 0]) ** 2 + 100 * (p[..., 1] - p[..., 0] ** 2) ** 2

    starts = np.array([[-1.2, 1.0], [0.0, 0.0], [2.0, -1.0]])
    result = newton_minimize(rosenbrock, starts, bounds=[(-5.0, 5.0)] * 2, max_iter=100)
    assert bool(result.converged.all())
    np.testing.assert_allclose(result.x.numpy(), np.ones((3, 2)), atol=1e-10)


def test_float32_init_is_fitted_in_float64():
    result = newton_minimize(objective(), torch.ones(6, dtype=torch.float32), bounds=BOUNDS)
    assert result.x.dtype == torch.float64 and bool(result.converged)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_newton_on_cuda_equals_cpu():
    rng = np.random.default_rng(5)
    data = rng.poisson(SIGNAL + BACKGROUND, size=(4096, 4)).astype(float)
    cpu = newton_minimize(objective(data), np.broadcast_to(INIT, (4096, 6)), bounds=BOUNDS)
    device = torch.device("cuda")
    s, b, n = (t64(a).to(device) for a in (SIGNAL, BACKGROUND, data))
    gpu = newton_minimize(
        lambda p: twice_nll_of(p, s, b, n),
        t64(np.broadcast_to(INIT, (4096, 6))).to(device),
        bounds=t64(BOUNDS).to(device),
    )
    assert gpu.x.device.type == "cuda" and bool(gpu.converged.all())
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, rtol=0, atol=1e-9)
    signal = s.clone().requires_grad_(True)
    mu_hat = fitted_parameters(
        lambda p, s_: twice_nll_of(p, s_, b, n[0]), t64(INIT).to(device), (signal,), bounds=BOUNDS
    )[0]
    (grad,) = torch.autograd.grad(mu_hat, signal)
    assert grad.device.type == "cuda" and bool(torch.isfinite(grad).all())


def test_newton_stops_once_a_full_step_confirms_the_quadratic_model():
    """Convergence needs edm <= tol and a settled objective (step 3 of newton_minimize): a full
    Newton step whose decrease equals its predicted edm settles it. On a quadratic the first
    step lands on the minimum (decrease = edm exactly), so the fit ends after it and the
    polishing step: 2 steps, at the analytic minimum. A quartic (the prediction fails by far
    in the first steps) still converges to its minimum, 1e-10."""
    matrix = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    centre = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)

    def quadratic(p):
        d = p - centre
        return 7.0 + (d @ matrix * d).sum(-1)

    result = newton_minimize(quadratic, torch.zeros(3, dtype=torch.float64), bounds=[(-9, 9)] * 3)
    assert bool(result.converged) and int(result.n_iter) == 2
    np.testing.assert_allclose(result.x.numpy(), centre.numpy(), rtol=0, atol=1e-14)

    def quartic(p):
        d = p - centre
        return (d**4).sum(-1) + (d @ matrix * d).sum(-1)

    result = newton_minimize(
        quartic, torch.full((3,), 5.0, dtype=torch.float64), bounds=[(-9, 9)] * 3
    )
    assert bool(result.converged)
    np.testing.assert_allclose(result.x.numpy(), centre.numpy(), rtol=0, atol=1e-10)
