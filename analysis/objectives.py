"""Figures of merit of a HistFactory model, a registry by name (DESIGN.md, "objectives").

Each :class:`Objective` maps ``(model, data)`` to a scalar tensor that is differentiable in
whatever the model was built from (the pipeline's cut parameters): profiled values by the
envelope theorem, fitted parameters and limit roots by the implicit function theorem (see
:mod:`analysis.inference`). ``maximize`` says which way is better.

Expected quantities use Asimov data built from the model itself, not the observed ``data``
(which is accepted for a uniform signature and ignored): the model's expectation at its
suggested initial parameters (nuisance parameters at their nominal values) with the POI at 1
(signal hypothesis; :func:`asimov_signal`) for ``discovery_significance`` and
``poi_uncertainty``, and at 0 (background only; :func:`asimov_background`) for ``cls`` and
``upper_limit``. Asimov data depend on the cut parameters like the model does, and the
gradients include that dependence.

Reference for the asymptotic formulae: G. Cowan, K. Cranmer, E. Gross, O. Vitells, "Asymptotic
formulae for likelihood-based tests of new physics", Eur. Phys. J. C 71 (2011) 1554,
arXiv:1007.1727.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from analysis import inference
from analysis.errors import ConfigError

__all__ = [
    "OBJECTIVES",
    "Objective",
    "asimov_background",
    "asimov_signal",
    "asimov_z",
    "get_objective",
]


@dataclass(frozen=True)
class Objective:
    """A figure of merit: ``function(model, data) -> scalar tensor``; larger is better when
    ``maximize``. ``formula`` is one line with the math."""

    name: str
    function: Callable[..., torch.Tensor]
    maximize: bool
    formula: str

    def __call__(self, model, data) -> torch.Tensor:
        return self.function(model, data)

    def loss(self, model, data) -> torch.Tensor:
        """The value to minimise: ``-function`` when ``maximize``, else ``function``."""
        value = self.function(model, data)
        return -value if self.maximize else value


# ----------------------------------------------------------------------------- Asimov data
def _asimov(model, poi_value: float) -> torch.Tensor:
    pars = model.suggested_init()
    pars[inference.require_poi(model)] = poi_value
    return model.expected_data(pars)


def asimov_signal(model) -> torch.Tensor:
    """Expected data (main + auxiliary) at the suggested init with the POI at 1."""
    return _asimov(model, 1.0)


def asimov_background(model) -> torch.Tensor:
    """Expected data (main + auxiliary) at the suggested init with the POI at 0."""
    return _asimov(model, 0.0)


# ----------------------------------------------------------------------------- pure formulae
def asimov_z(s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Stat-only Asimov discovery significance, summed over bins.

    Math: ``Z_A = sqrt(sum_b 2 ((s_b + b_b) ln(1 + s_b / b_b) - s_b))``, the median discovery
    significance of a counting experiment with known background (Cowan et al.,
    arXiv:1007.1727, eq. 97), bins combined by adding ``Z_A^2`` (independent Poisson bins). For
    ``s << b`` it tends to ``sqrt(sum s^2 / b)``.

    Requires ``b > 0`` (the pipeline floors yields) and ``s > -b``. The sum is clamped at 0
    before the square root (it is ``>= 0`` mathematically; rounding can make it ``-1e-17``);
    at ``Z_A = 0`` the gradient is infinite. Last dimension = bins; leading dimensions batch.
    """
    terms = 2.0 * ((s + b) * torch.log1p(s / b) - s)
    return torch.sqrt(torch.clamp(terms.sum(-1), min=0.0))


# ----------------------------------------------------------------------------- objectives
def discovery_significance(model, data=None) -> torch.Tensor:
    """Expected discovery significance ``Z0 = sqrt(q0)`` on the mu=1 Asimov data, profiled.

    ``q0 = 2 NLL(mu=0, theta_hat_hat) - 2 NLL(mu_hat, theta_hat)`` (arXiv:1007.1727 eq. 12). On
    its own Asimov data the free fit is known exactly, ``(mu_hat, theta_hat)`` = the Asimov
    parameters (for every cut value, so it carries no gradient), so only the ``mu = 0`` fit is
    done: the result equals ``sqrt(inference.hypotest(model, asimov, 0, "q0").teststat)`` at a
    quarter of the fits. ``q0`` is clamped at 1e-300 before the square root (gradient 0 there).
    """
    asimov = asimov_signal(model)
    x_free = model.suggested_init()
    x_free[inference.require_poi(model)] = 1.0
    free = (x_free, model.twice_nll(x_free, asimov))
    q0 = inference.test_statistic(model, asimov, 0.0, "q0", free=free)
    return torch.sqrt(torch.clamp(q0, min=1e-300))


def expected_cls(model, data=None) -> torch.Tensor:
    """Median expected CLs at mu = 1: ``hypotest(model, asimov_b, 1, "qtilde").cls_obs``.

    On the background-only Asimov data the observed ``q~_1`` equals its Asimov value, so the
    "observed" CLs is the median expected one, ``CLs = Phi(-sqrt(q~_A)) / (1/2)``
    (arXiv:1007.1727 eq. 65-66).
    """
    return inference.hypotest(model, asimov_background(model), 1.0, "qtilde").cls_obs


def poi_uncertainty(model, data=None) -> torch.Tensor:
    """``sigma_mu = sqrt(2 [H^-1]_mu,mu)`` on the mu=1 Asimov data, ``H`` the Hessian of
    ``2 NLL`` (inverse Fisher information; :func:`analysis.inference.poi_uncertainty`)."""
    return inference.poi_uncertainty(model, asimov_signal(model))


def expected_upper_limit(model, data=None) -> torch.Tensor:
    """Median expected 95% CLs upper limit on mu (q~), on the background-only Asimov data.

    The median of the expected band of ``inference.upper_limits(model, asimov_b)``, solved
    alone (``curves``): the other curves need not be bracketed by the POI bounds, so a point
    whose median limit is inside them has a value even where the +2 sigma one is not. On
    background-only Asimov data the observed limit is the same number, since the observed test
    statistic equals its Asimov value at every mu. Differentiated through the root
    ``CLs(mu*) = 0.05`` by the implicit function theorem.
    """
    median = inference.LIMIT_CURVES.index("median")
    return inference.upper_limits(model, asimov_background(model), 0.95, curves=(median,))[0]


def asimov_significance(model, data=None) -> torch.Tensor:
    """Stat-only ``Z_A`` (:func:`asimov_z`) of the model's expected yields at the suggested
    init: ``b = lambda(mu=0)``, ``s = lambda(mu=1) - lambda(mu=0)``; no fit."""
    pars = model.suggested_init()
    poi = inference.require_poi(model)
    both = pars.expand(2, -1).clone()
    both[0, poi], both[1, poi] = 1.0, 0.0
    expected = model.expected_actualdata(both)
    b = expected[1]
    return asimov_z(expected[0] - b, b)


OBJECTIVES: Mapping[str, Objective] = types.MappingProxyType(
    {
        objective.name: objective
        for objective in (
            Objective(
                "discovery_significance",
                discovery_significance,
                True,
                "Z0 = sqrt(q0) on the mu=1 Asimov data, nuisance parameters profiled",
            ),
            Objective(
                "cls",
                expected_cls,
                False,
                "median expected CLs(mu=1) = CLs_obs on the background-only Asimov data (q~)",
            ),
            Objective(
                "poi_uncertainty",
                poi_uncertainty,
                False,
                "sigma_mu = sqrt(2 [H^-1]_mu,mu), H = Hessian of 2 NLL on the mu=1 Asimov data",
            ),
            Objective(
                "upper_limit",
                expected_upper_limit,
                False,
                "median expected 95% CLs upper limit on mu (q~), background-only Asimov data",
            ),
            Objective(
                "asimov_significance",
                asimov_significance,
                True,
                "Z_A = sqrt(sum_b 2((s_b + b_b) ln(1 + s_b/b_b) - s_b)), stat only",
            ),
        )
    }
)
"""Objective name -> :class:`Objective`."""


def get_objective(name: str) -> Objective:
    """The objective called ``name``; ConfigError (listing the valid names) otherwise."""
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}"
        ) from None
