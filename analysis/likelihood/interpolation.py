r"""Interpolation codes of HistFactory (ROOT's RooStats conventions, as pyhf implements them).

Reference: K. Cranmer et al., "HistFactory: A tool for creating statistical models for use with
RooFit and RooStats", CERN-OPEN-2012-016, section 4.1 (interpolation codes 0, 1, 4 and 4p).

Additive codes (``histosys``) act on a bin with nominal :math:`\nu^0`, up template
:math:`\nu^+` and down template :math:`\nu^-` through the differences
:math:`\Delta^+ = \nu^+ - \nu^0` and :math:`\Delta^- = \nu^0 - \nu^-`. Each is written as
:math:`\delta(\alpha) = w^+(\alpha)\,\Delta^+ + w^-(\alpha)\,\Delta^-`, so that the sum over many
systematics is one matrix product (``(cells, 2M)`` templates times ``(2M, batch)`` weights).

Multiplicative codes (``normsys``) act with the factors :math:`\kappa^+ = \nu^+/\nu^0` (``hi``)
and :math:`\kappa^- = \nu^-/\nu^0` (``lo``) and return the factor :math:`f(\alpha)`.

Every function here is elementwise, twice differentiable where the formula is, and takes its
constants (``hi``, ``lo``, coefficients) as tensors so that gradients reach them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


@functools.lru_cache(maxsize=32)
def _code4p_constants(
    dtype: torch.dtype, device: torch.device, ndim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner-polynomial coefficients (rows alpha^0..alpha^6, columns w+, w-) and signs."""
    poly = torch.tensor(
        [
            [0.0, 0.0],
            [0.5, 0.5],
            [0.9375, -0.9375],
            [0.0, 0.0],
            [-0.625, 0.625],
            [0.0, 0.0],
            [0.1875, -0.1875],
        ],
        dtype=dtype,
        device=device,
    )  # w+- = alpha/2 +- (15 alpha^2 - 10 alpha^4 + 3 alpha^6)/16
    signs = torch.tensor([1.0, -1.0], dtype=dtype, device=device).reshape((2,) + (1,) * ndim)
    return poly, signs


def code0_weights(alpha: torch.Tensor) -> torch.Tensor:
    r"""Piecewise linear (code 0): :math:`\delta = \alpha\Delta^+` for :math:`\alpha > 0`,
    :math:`\alpha\Delta^-` otherwise. Returns :math:`(w^+, w^-)` stacked, ``(2, *alpha.shape)``.

    Continuous with a kink at 0 (the derivative jumps from :math:`\Delta^-` to
    :math:`\Delta^+`; at exactly 0 the gradient is the :math:`\Delta^-` one, as in pyhf).
    """
    masks = torch.stack([alpha > 0, alpha <= 0])
    return torch.where(masks, alpha, 0.0)


def code4p_weights(alpha: torch.Tensor) -> torch.Tensor:
    r"""Linear outside :math:`[-1, 1]`, a 6th-order polynomial inside (code 4p).

    For :math:`|\alpha| \le 1`, with :math:`S = (\Delta^+ + \Delta^-)/2`,
    :math:`A = (\Delta^+ - \Delta^-)/16` and
    :math:`t(\alpha) = \alpha^2 (15 - 10\alpha^2 + 3\alpha^4)`:
    :math:`\delta = \alpha S + t A`, which matches value and first two derivatives of the
    linear pieces at :math:`\pm 1`. For :math:`\alpha > 1`: :math:`\alpha\Delta^+`; for
    :math:`\alpha < -1`: :math:`\alpha\Delta^-`. Returns :math:`(w^+, w^-)` stacked,
    ``(2, *alpha.shape)``, with :math:`w^\pm = \alpha/2 \pm t/16` inside.
    """
    poly, signs = _code4p_constants(alpha.dtype, alpha.device, alpha.ndim)
    inner = (torch.linalg.vander(alpha, N=7) @ poly).movedim(-1, 0)
    outer = torch.where(signs * alpha > 1.0, alpha, 0.0)  # alpha > 1 (w+), alpha < -1 (w-)
    return torch.where(alpha.abs() <= 1.0, inner, outer)


def code1_factor(alpha: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    r"""Piecewise exponential (code 1): :math:`f = (\kappa^+)^{\alpha}` for :math:`\alpha > 0`,
    :math:`(\kappa^-)^{-\alpha}` otherwise.

    ``lo`` and ``hi`` broadcast with ``alpha`` (one per unit). Always positive for
    positive :math:`\kappa^\pm`; the derivative jumps at 0 unless :math:`\kappa^+\kappa^- = 1`.
    At exactly 0 the gradient is the down side's, :math:`-\ln\kappa^-` (as in pyhf), never 0:
    ``alpha.abs()`` would have a zero derivative there, a false stationary point at the usual
    starting value of every fit.
    """
    positive = alpha > 0
    base = torch.where(positive, hi, lo)
    return base ** torch.where(positive, alpha, -alpha)


def code4_coefficients(lo: torch.Tensor, hi: torch.Tensor, alpha0: float = 1.0) -> torch.Tensor:
    r"""Coefficients :math:`a_1..a_6` (shape ``(6, U)``) of the code-4 polynomial.

    :math:`p(\alpha) = 1 + \sum_{i=1}^6 a_i\alpha^i` is fixed by matching value, first and
    second derivative of :math:`(\kappa^+)^{\alpha}` at :math:`\alpha_0` and of
    :math:`(\kappa^-)^{-\alpha}` at :math:`-\alpha_0`: a 6x6 linear system :math:`A a = b`,
    solved here (its determinant is :math:`-2048\,\alpha_0^{15}`, so any :math:`\alpha_0 > 0`).
    """
    a0 = float(alpha0)
    powers = range(1, 7)

    def value(x: float) -> list[float]:
        return [x**i for i in powers]

    def slope(x: float) -> list[float]:
        return [i * x ** (i - 1) for i in powers]

    def curvature(x: float) -> list[float]:
        return [i * (i - 1) * x ** (i - 2) if i >= 2 else 0.0 for i in powers]

    # rows: p(a0), p(-a0), p'(a0), p'(-a0), p''(a0), p''(-a0)
    rows = [value(a0), value(-a0), slope(a0), slope(-a0), curvature(a0), curvature(-a0)]
    matrix = torch.tensor(rows, dtype=hi.dtype, device=hi.device)
    log_hi, log_lo = torch.log(hi), torch.log(lo)
    up, dn = hi**a0, lo**a0
    rhs = torch.stack(
        [
            up - 1.0,  # (k+)^a0 - 1
            dn - 1.0,  # (k-)^a0 - 1
            log_hi * up,  # d/da (k+)^a at a0
            -log_lo * dn,  # d/da (k-)^-a at -a0
            log_hi * log_hi * up,
            log_lo * log_lo * dn,
        ]
    )
    return torch.linalg.solve(matrix, rhs)


def code4_factor(
    alpha: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    coefficients: Sequence[torch.Tensor],
    alpha0: float = 1.0,
) -> torch.Tensor:
    r"""Polynomial interpolation, exponential extrapolation (code 4).

    :math:`f = (\kappa^+)^{\alpha}` for :math:`\alpha \ge \alpha_0`,
    :math:`(\kappa^-)^{-\alpha}` for :math:`\alpha \le -\alpha_0`, and
    :math:`1 + \sum_i a_i\alpha^i` in between (``coefficients``: ``1`` then the six rows of
    :func:`code4_coefficients`, i.e. :math:`a_0 = 1, a_1, ..., a_6`, each broadcastable with
    ``alpha``). Smooth to second order
    everywhere, unlike code 1. The unused branch is evaluated with a safe exponent so no NaN
    reaches the gradient.
    """
    abs_alpha = alpha.abs()
    inside = abs_alpha < alpha0
    base = torch.where(alpha >= alpha0, hi, lo)
    outer = base ** abs_alpha.masked_fill(inside, 1.0)
    poly = coefficients[-1]
    for c in coefficients[-2::-1]:
        poly = torch.addcmul(c, alpha, poly)
    return torch.where(inside, poly, outer)


# --------------------------------------------------------------------------------------------
# First and second derivatives in alpha (exact Hessians, analysis.likelihood.derivatives)
# --------------------------------------------------------------------------------------------
# Each returns (d/dalpha, d^2/dalpha^2) of the function above, elementwise, with the same
# branch at the kinks as autograd of that function (the side its torch.where picks).


def code0_weight_derivatives(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Derivatives of :func:`code0_weights`: ``(2, *alpha.shape)`` each."""
    first = torch.stack([alpha > 0, alpha <= 0]).to(alpha.dtype)
    return first, torch.zeros_like(first)


def code4p_weight_derivatives(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Derivatives of :func:`code4p_weights`: inside, :math:`w^\pm{}' = 1/2 \pm t'/16`,
    :math:`w^\pm{}'' = \pm t''/16` with :math:`t' = 30\alpha - 40\alpha^3 + 18\alpha^5`,
    :math:`t'' = 30 - 120\alpha^2 + 90\alpha^4`; outside, 1 on the linear piece's side."""
    signs = torch.tensor([1.0, -1.0], dtype=alpha.dtype, device=alpha.device)
    signs = signs.reshape((2,) + (1,) * alpha.ndim)
    a2 = alpha * alpha
    t1 = alpha * (30.0 + a2 * (-40.0 + 18.0 * a2))
    t2 = 30.0 + a2 * (-120.0 + 90.0 * a2)
    inside = alpha.abs() <= 1.0
    first = torch.where(inside, 0.5 + signs * t1 / 16.0, (signs * alpha > 1.0).to(alpha.dtype))
    second = torch.where(inside, signs * t2 / 16.0, 0.0)
    return first, second


def code1_factor_derivatives(
    alpha: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, factor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Derivatives of :func:`code1_factor` (``factor`` its value): :math:`\ln\kappa^+ f`,
    :math:`(\ln\kappa^+)^2 f` for :math:`\alpha > 0`, :math:`-\ln\kappa^- f`,
    :math:`(\ln\kappa^-)^2 f` otherwise."""
    positive = alpha > 0
    log_base = torch.log(torch.where(positive, hi, lo))
    slope = torch.where(positive, log_base, -log_base)
    return slope * factor, log_base * log_base * factor


def code4_factor_derivatives(
    alpha: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    coefficients: Sequence[torch.Tensor],
    factor: torch.Tensor,
    alpha0: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Derivatives of :func:`code4_factor` (``factor`` its value): those of the polynomial
    inside :math:`|\\alpha| < \\alpha_0`, of the exponentials outside."""
    inside = alpha.abs() < alpha0
    upper = alpha >= alpha0
    log_base = torch.log(torch.where(upper, hi, lo))
    outer1 = torch.where(upper, log_base, -log_base) * factor
    outer2 = log_base * log_base * factor
    # Horner for p' = sum i a_i alpha^(i-1) and p'' = sum i (i-1) a_i alpha^(i-2)
    degree = len(coefficients) - 1
    poly1 = degree * coefficients[degree]
    for i in range(degree - 1, 0, -1):
        poly1 = torch.addcmul(i * coefficients[i], alpha, poly1)
    poly2 = degree * (degree - 1) * coefficients[degree]
    for i in range(degree - 1, 1, -1):
        poly2 = torch.addcmul(i * (i - 1) * coefficients[i], alpha, poly2)
    return torch.where(inside, poly1, outer1), torch.where(inside, poly2, outer2)
