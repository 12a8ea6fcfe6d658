"""Log-density of the HistFactory Poisson terms, as pyhf (numpy backend) evaluates it.

Elementwise, broadcasting its arguments; callers sum over the last axis. (The Gaussian
constraint term is in :meth:`analysis.likelihood.model.Model._constraint`, where its constant
is precomputed.)
"""

from __future__ import annotations

import torch


def poisson_logpdf(n: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    r"""Continuous Poisson log-density :math:`n \log\lambda - \lambda - \log\Gamma(n + 1)`.

    ``n`` need not be an integer (Asimov data); :math:`0 \log 0 = 0`, so :math:`\lambda = 0`
    with :math:`n = 0` gives 0 as pyhf does. Reproduces the Poisson p.m.f. exactly for integer
    ``n``. Where :math:`n = 0` the term is :math:`-\lambda` with its plain derivatives, also at
    :math:`\lambda = 0` (a bin that holds only signal, fitted at mu = 0): the log is masked on
    both sides of the ``where`` (``torch.xlogy``'s gradient there is 0 * (0/0) = NaN).
    """
    counted = n > 0
    log_lam = torch.log(torch.where(counted, lam, torch.ones_like(lam)))
    return torch.where(counted, n * log_lam, torch.zeros_like(lam)) - lam - torch.lgamma(n + 1.0)


def poisson_logpdf_derivatives(
    n: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""First and second derivatives of :func:`poisson_logpdf` in :math:`\lambda`:
    :math:`n/\lambda - 1` and :math:`-n/\lambda^2` (:math:`-1` and 0 where :math:`n = 0`)."""
    counted = n > 0
    ratio = torch.where(counted, n / torch.where(counted, lam, torch.ones_like(lam)), 0.0)
    return ratio - 1.0, -ratio * ratio / torch.where(counted, n, torch.ones_like(n))
