"""Profile-likelihood test statistics from the fits (pyhf's ``infer.test_statistics``).

Cowan, Cranmer, Gross, Vitells, arXiv:1007.1727. With
``t_mu = max(0, 2 NLL(mu, theta_hat_hat) - 2 NLL(mu_hat, theta_hat))``:
``q_mu = t_mu if mu_hat <= mu else 0`` (eq. 14), ``q~_mu`` the same with the POI bounded below
at 0 (eq. 16; pyhf fits within the model's bounds for both), ``q0 = t_0 if mu_hat >= 0 else
0`` (eq. 12).
"""

from __future__ import annotations

from typing import Literal

import torch

from analysis.errors import ConfigError
from analysis.inference.mle import fixed_poi_fit, free_fit
from analysis.inference.utils import require_poi

TestStat = Literal["q", "qtilde", "q0"]


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
    the fixed-POI fits start from it. Differentiable through the minimum values (the envelope
    theorem: no derivatives of the fitted parameters are formed, :func:`~.mle.minimize`).
    """
    poi = require_poi(model)
    if free is None:
        free = free_fit(
            model, data, init=init, bounds=bounds, fixed=fixed, parameters_gradient=False
        )
    x_free, nll_free = free
    poi_value = torch.as_tensor(poi_value, dtype=x_free.dtype, device=x_free.device)
    _, nll_fixed = fixed_poi_fit(
        model,
        data,
        poi_value,
        init=x_free.detach(),
        bounds=bounds,
        fixed=fixed,
        parameters_gradient=False,
    )
    return statistic_from_fits(nll_fixed, nll_free, x_free[..., poi], poi_value, test_stat)
