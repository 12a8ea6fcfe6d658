"""Soft selection: cuts relaxed to sigmoids, combined as sums of log-weights.

A hard cut keeps an event when ``x > c`` (or ``x < c``). Its relaxation replaces the indicator by
a logistic function of the distance to the threshold in units of a temperature ``tau``,

    w(x) = sigmoid(s (x - c) / tau),        s = +1 for ">", -1 for "<",

as in neos / relaxed (N. Simpson and L. Heinrich, "neos: End-to-End-Optimised Summary Statistics
for High Energy Physics", arXiv:2203.05570; the ``relaxed.cut`` op, gradhep/relaxed). Everything
here returns the LOG of the weight, ``log w = logsigmoid(s (x - c) / tau)``, computed by
:func:`torch.nn.functional.logsigmoid`: it never forms ``exp`` of a large number, so slopes
``1/tau`` up to ``1e6`` and beyond give finite values and gradients in float32, whereas
``1 / (1 + exp(-z))`` written by hand overflows and returns NaN gradients. Several cuts multiply,
i.e. their log-weights add (:func:`log_selection_weight`); an event then enters the histograms with
weight ``weight * exp(log_w)``. Where only that weight is needed (the pipeline),
:func:`selection_weight` / :func:`selection_weights` compute it directly as a product of
``torch.sigmoid`` (numerically stable for any ``z``, no NaN at steep slopes) in one autograd node,
at about a third of the cost of the log-space sum and its ``exp``, with scalar thresholds and
temperatures.

The knob is ``tau``: large ``tau`` lets events far from the threshold feel (and move) the cut, so
gradients are smooth and come from many events, but the relaxed selection is biased with respect
to the boolean one; small ``tau`` approaches the boolean cut (exactly reached at ``tau = 0``) while
the gradient comes from ever fewer events near the threshold and grows noisier. ``tau`` is set in
units of the spread of the cut variable (:func:`cut_temperature`), so one schedule serves
variables in GeV and in fractions.

These are pure tensor functions: thresholds and temperatures may be tensors that require grad
(trainable ``nn.Parameter`` thresholds, annealed buffers), and all arguments of the log-space
functions broadcast.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, cast

import torch
from torch.nn.functional import logsigmoid

from analysis.errors import DataError

__all__ = [
    "DIRECTIONS",
    "SoftCut",
    "column_spread",
    "cut_temperature",
    "log_selection_weight",
    "log_soft_cut",
    "log_soft_window",
    "selection_weight",
    "selection_weights",
    "soft_cut",
]

DIRECTIONS = {">": 1.0, "<": -1.0}
"""Cut direction -> sign ``s`` in ``sigmoid(s (x - c) / tau)``."""

Scalar = torch.Tensor | float


def _sign(direction: str) -> float:
    try:
        return DIRECTIONS[direction]
    except (KeyError, TypeError):
        raise ValueError(
            f"cut direction must be one of {sorted(DIRECTIONS)}, got {direction!r}"
        ) from None


def log_soft_cut(x: torch.Tensor, threshold: Scalar, tau: Scalar, direction: str) -> torch.Tensor:
    r"""Log-weight of a soft cut: ``log w = logsigmoid(s (x - c) / tau)``.

    Math: ``w = sigmoid(z) = 1 / (1 + exp(-z))`` with ``z = s (x - c) / tau``, ``s = +1`` for
    ``">"`` (keep large ``x``) and ``s = -1`` for ``"<"``. ``log w`` lies in ``(-inf, 0]``; for
    ``z -> -inf`` it is ``z`` (linear, not a vanishing exponential), which is what keeps products
    of several cuts and their gradients exact in log space. Reference: the relaxed cut of neos,
    arXiv:2203.05570 (``relaxed.cut``, which computes ``1 / (1 + exp(-slope (x - c)))``).

    Hard limit: ``tau = 0`` exactly gives the boolean strict cut, ``log w = 0`` where
    ``s (x - c) > 0`` and ``-inf`` elsewhere, so an event exactly at the threshold fails the cut
    (as ``x > c`` / ``x < c`` do in :func:`analysis.histograms.hard_cut_mask`); its gradient with
    respect to ``x``, ``threshold`` and ``tau`` is zero (the result stays connected to the
    graph). For ``tau > 0`` an event at the threshold has ``w = 1/2``, and ``tau -> 0``
    converges to the boolean cut everywhere except there.

    Knob: ``tau`` trades bias (large ``tau``: events far from ``c`` are partly kept or lost) for
    gradient variance (small ``tau``: only events within a few ``tau`` of ``c`` carry gradient).

    Numerics: no NaN and no overflow for any finite ``(x - c) / tau``; gradients are finite while
    ``|x - c| / tau**2`` is below the dtype's largest value (float32: 3.4e38, e.g. ``tau >= 1e-6``
    for ``|x - c| < 1e26``; float64: 1.8e308). ``x = NaN`` gives NaN (the pipeline rejects NaN
    columns before this point).

    Args:
        x: values of the cut variable, any shape.
        threshold: cut value ``c`` (number or tensor, may require grad), broadcast with ``x``.
        tau: temperature in the units of ``x``, ``>= 0`` (number or tensor, may require grad).
            A Python number is checked; a tensor is not (that would synchronise with the device),
            and elements ``<= 0`` give the hard cut.
        direction: ``">"`` or ``"<"``.

    Returns:
        ``log w`` with the broadcast shape of ``x``, ``threshold`` and ``tau``.
    """
    sign = _sign(direction)
    diff = x - threshold
    if not isinstance(tau, torch.Tensor):
        if not tau >= 0:  # also rejects NaN
            raise ValueError(f"cut temperature tau must be >= 0, got {tau!r}")
        if tau > 0:
            return logsigmoid(diff * (sign / tau))
        tau = torch.zeros((), dtype=diff.dtype, device=diff.device)  # hard, but graph-connected
    soft = tau > 0
    if soft.device.type == "cpu" and bool(soft.all()):  # no device sync on CPU: skip hard branch
        return logsigmoid(diff * (sign / tau))
    scale = sign / torch.where(soft, tau, torch.ones_like(tau))  # no 1/0 in the unused branch
    return torch.where(soft, logsigmoid(diff * scale), _log_hard_cut(diff, sign))


def _log_hard_cut(diff: torch.Tensor, sign: float) -> torch.Tensor:
    """``0`` where ``sign * diff > 0`` (strict), ``-inf`` elsewhere; no gradient."""
    passed = diff > 0 if sign > 0 else diff < 0
    zero = torch.zeros((), dtype=diff.dtype, device=diff.device)
    return torch.where(passed, zero, torch.full_like(zero, -torch.inf))


def soft_cut(x: torch.Tensor, threshold: Scalar, tau: Scalar, direction: str) -> torch.Tensor:
    """Weight of a soft cut, ``exp(log_soft_cut(...)) = sigmoid(s (x - c) / tau)`` in [0, 1]."""
    return torch.exp(log_soft_cut(x, threshold, tau, direction))


def log_soft_window(x: torch.Tensor, low: Scalar, high: Scalar, tau: Scalar) -> torch.Tensor:
    r"""Log-weight of a two-sided soft cut ``low < x < high``.

    Math: ``log w = logsigmoid((x - low) / tau) + logsigmoid((high - x) / tau)``, the product of a
    ``">" low`` and a ``"<" high`` soft cut (:func:`log_soft_cut`, same reference and numerics).

    Hard limit: ``tau = 0`` gives the strict boolean window, ``0`` inside and ``-inf`` outside and
    on both edges. For ``tau > 0`` the weight at the window centre is below one when the window is
    not much wider than ``tau`` (``sigmoid(L / 2tau)**2`` for a window of width ``L``), and
    ``high <= low`` gives a small, not a zero, weight.

    Knob: ``tau`` (one temperature for both edges), as for :func:`log_soft_cut`.
    """
    return log_soft_cut(x, low, tau, ">") + log_soft_cut(x, high, tau, "<")


class SoftCut(NamedTuple):
    """One soft cut: ``values`` of the variable, ``threshold``, ``tau`` and ``direction``."""

    values: torch.Tensor
    threshold: Scalar
    tau: Scalar
    direction: str


def log_selection_weight(cuts: Iterable[SoftCut | tuple]) -> torch.Tensor:
    r"""Log-weight of a selection of soft cuts: ``log w_i = sum_k log_soft_cut(x_ik, c_k, ...)``.

    Math: the selection weight is the product ``w_i = prod_k sigmoid(s_k (x_ik - c_k) / tau_k)``
    (DESIGN.md, "soft cuts"), summed here in log space so that an event far on the wrong side of
    several cuts keeps an exact, finite log-weight (and gradient) instead of a product that
    underflows to zero. An event then enters the histograms with weight ``weight * exp(log_w)``.

    Hard limit: with every ``tau_k = 0`` this is ``0`` for events passing all (strict) cuts and
    ``-inf`` otherwise, i.e. the boolean AND of the cuts.

    Args:
        cuts: ``SoftCut(values, threshold, tau, direction)`` tuples (plain 4-tuples work too),
            one per cut, whose values broadcast against each other (usually all shape ``(N,)``).

    Returns:
        ``log w`` per event (the broadcast shape of the cuts' values).
    """
    total: torch.Tensor | None = None
    for cut in cuts:
        values, threshold, tau, direction = cut
        term = log_soft_cut(values, threshold, tau, direction)
        total = term if total is None else total + term
    if total is None:
        raise ValueError(
            "log_selection_weight got no cuts; a selection without cuts has log-weight 0 "
            "(use the event weights directly)"
        )
    return total


def selection_weight(cuts: Iterable[SoftCut | tuple]) -> torch.Tensor:
    r"""Selection weight of soft cuts with scalar thresholds, ``w_i = prod_k sigmoid(z_ik)``.

    Math: ``z_ik = s_k (x_ik - c_k) / tau_k`` as in :func:`log_soft_cut`; the same weight as
    ``exp(log_selection_weight(cuts))`` (equal up to rounding: relative ``1e-15`` per cut), but
    computed as a product of ``sigmoid`` (one ``exp`` per event and cut, against an ``exp`` and a
    ``log1p`` for ``logsigmoid`` and a final ``exp``) in one autograd node, whose backward pass
    uses the factors ``f_ik = sigmoid(z_ik)`` kept by the forward pass and
    ``sigmoid(-z_ik) = 1 - f_ik``:

        dw_i/dc_k = -w_i sigmoid(-z_ik) s_k / tau_k,
        dw_i/dtau_k = -w_i sigmoid(-z_ik) z_ik / tau_k,
        dw_i/dx_ik = w_i sigmoid(-z_ik) s_k / tau_k

    (numerics of the gradient: :class:`_SelectionWeight`). The product of factors in ``[0, 1]``
    cannot overflow; it underflows to 0 (with a zero gradient) where ``sum_k log w_ik < -745``
    (float64), where ``exp`` of the log-space sum does too. Use :func:`log_selection_weight`
    where the log-weight itself is needed; :func:`selection_weights` for several sets of events
    with the same cuts (one autograd node).

    Hard limit: ``tau_k = 0`` gives the strict boolean cut (factor 1 or 0, zero gradient), as in
    :func:`log_soft_cut`; with every ``tau_k = 0`` the result is the boolean AND of the cuts.

    Args:
        cuts: ``SoftCut(values, threshold, tau, direction)`` tuples, one per cut: ``values`` of
            one shape for all cuts; ``threshold`` and ``tau >= 0`` one number or one-element
            tensor each (may require grad; a tensor ``tau`` is not checked, elements ``<= 0``
            give the hard cut, as in :func:`log_soft_cut`).

    Returns:
        ``w`` per event, the shape and dtype of the values, on their device.
    """
    cuts = [tuple(cut) for cut in cuts]
    if not cuts:
        raise ValueError(
            "selection_weight got no cuts; a selection without cuts has weight 1 "
            "(use the event weights directly)"
        )
    (w,) = selection_weights(
        [[values for values, _, _, _ in cuts]],
        [c for _, c, _, _ in cuts],
        [tau for _, _, tau, _ in cuts],
        [direction for _, _, _, direction in cuts],
    )
    return w


def selection_weights(
    columns: Sequence[Sequence[torch.Tensor]],
    thresholds: Sequence[Scalar],
    taus: Sequence[Scalar],
    directions: Sequence[str],
) -> list[torch.Tensor]:
    """:func:`selection_weight` of several sets of events that pass the same cuts.

    ``columns[g][k]``: the values of cut ``k`` (``thresholds[k]``, ``taus[k]``,
    ``directions[k]``, as in :class:`SoftCut`) for the events of set ``g``; one shape per set,
    one dtype and device for all. Returns one ``w`` per set, equal to
    ``selection_weight([SoftCut(columns[g][k], thresholds[k], taus[k], directions[k]) ...])``,
    computed in one autograd node (the per-call work is done once for all sets).
    """
    n_cuts = len(directions)
    if not n_cuts:
        raise ValueError(
            "selection_weights got no cuts; a selection without cuts has weight 1 "
            "(use the event weights directly)"
        )
    if not (len(thresholds) == len(taus) == n_cuts) or any(len(c) != n_cuts for c in columns):
        raise ValueError(
            f"one threshold, tau and column per cut: {n_cuts} directions, {len(thresholds)} "
            f"thresholds, {len(taus)} taus, columns per set {[len(c) for c in columns]}"
        )
    if not columns:
        return []
    for group in columns:
        if any(x.shape != group[0].shape for x in group):
            raise ValueError(
                f"the values of all cuts must have one shape, got {[tuple(x.shape) for x in group]}"
            )
    dtype, device = columns[0][0].dtype, columns[0][0].device
    signs = tuple(_sign(direction) for direction in directions)
    thresholds_t = _stack_scalars(list(thresholds), "threshold", dtype, device)
    soft: torch.Tensor | None = None  # needed where the hard cuts are not known on the host
    if not any(isinstance(tau, torch.Tensor) for tau in taus):
        for tau in taus:
            if not tau >= 0:  # also rejects NaN
                raise ValueError(f"cut temperature tau must be >= 0, got {tau!r}")
        hard: tuple[bool | None, ...] = tuple(not tau > 0 for tau in taus)
        slope_list = [0.0 if off else s / t for s, t, off in zip(signs, taus, hard, strict=True)]
        slopes = torch.tensor(slope_list, dtype=dtype, device=device)
    else:
        tau_t = _stack_scalars(list(taus), "tau", dtype, device)
        soft = tau_t > 0
        sign_t = torch.tensor(signs, dtype=dtype, device=device)
        # no 1/0 in the unused branch (its gradient would be NaN * 0)
        slopes = torch.where(soft, sign_t / torch.where(soft, tau_t, torch.ones_like(tau_t)), 0.0)
        # the branch per cut is known without a device synchronisation on CPU only
        hard = tuple((~soft).tolist()) if device.type == "cpu" else (None,) * n_cuts
    flat = [x for group in columns for x in group]
    return list(_SelectionWeight.apply(thresholds_t, slopes, soft, hard, signs, *flat))


def _stack_scalars(
    values: list[Scalar], name: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """One number or one-element tensor per cut as a tensor ``(K,)``, keeping their graphs."""
    if all(
        isinstance(v, torch.Tensor) and v.ndim == 0 and v.dtype == dtype and v.device == device
        for v in values
    ):
        # the usual case (the pipeline's thresholds): one operation
        return torch.stack(cast(list[torch.Tensor], values))
    return torch.stack([_scalar(v, name, dtype, device) for v in values])


def _scalar(value: Scalar, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` (a number or a one-element tensor) as a 0-d tensor, keeping its graph."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"selection_weight takes one {name} per cut, got shape {tuple(value.shape)} "
                "(log_selection_weight broadcasts)"
            )
        return value.reshape(()).to(dtype=dtype, device=device)
    return torch.tensor(float(value), dtype=dtype, device=device)


_SELECTION_PIECE = 1 << 14
"""Events per piece of ``q = 1 - f`` in the backward pass of :class:`_SelectionWeight` on CPU: a
small buffer that stays in cache and is reused, where ``q`` for all events at once would be as
large as the factors (and, written to fresh memory, slower than the products it feeds)."""


class _SelectionWeight(torch.autograd.Function):
    """``w = prod_k f_k``, ``f_k = sigmoid((x_k - c_k) a_k)``, of :func:`selection_weights`, with
    slopes ``a_k = s_k / tau_k`` (0 for hard cuts) and an analytic backward; one output per set
    of events (``columns``: the ``K`` cut columns of the first set, then of the second, ...).

    Forward, per set: the factors ``f (K, N)`` (per cut ``sub``, ``mul_``, ``sigmoid_`` in place)
    and their product over the cuts; ``f`` is kept for the backward pass. Hard cuts (``hard[k]``
    True, or ``soft[k]`` False where ``hard[k]`` is None, i.e. not known on the host) have
    ``f_k = 1[s_k (x_k - c_k) > 0]``.

    Backward, with ``H_i = dL/dw_i w_i`` and ``q_ik = sigmoid(-z_ik) = 1 - f_ik``, summed over
    the sets: ``dL/dc_k = -a_k sum_i q_ik H_i`` (one matrix-vector product ``q (K, N) @ H`` per
    set for all cuts), ``dL/da_k = sum_i q_ik H_i (x_ik - c_k)``, ``dL/dx_ik = a_k q_ik H_i``;
    zero for hard cuts (``a_k = 0``; the graph of ``a_k`` gives ``tau_k`` no gradient there).

    Numerics: ``1 - f`` is exact (Sterbenz) where ``f >= 1/2`` and rounded to a relative
    ``2^-53`` elsewhere, so ``q`` carries the absolute error of ``f`` (``2^-53``, the rounding of
    ``sigmoid``): an event with ``q`` below ``1e-16`` (far on the passing side) contributes to
    ``dL/dc_k`` with an absolute error up to ``1.1e-16 |a_k H_i|`` instead of its tiny exact
    value. The gradient's error is therefore at most ``1.1e-16 |a_k| sum_i |H_i|`` (over the
    passing events), against its value ``|a_k sum_i q_ik H_i|`` (measured on the demo analysis
    against autograd through ``logsigmoid``: 1e-15 relative, also at the final temperature).
    Recomputing ``sigmoid(-z)`` in the backward pass would double the cost of the selection.
    """

    @staticmethod
    def forward(ctx, thresholds, slopes, soft, hard, signs, *columns):
        n_cuts = len(signs)
        # per-cut numbers: on CPU as Python floats (the same values; no tensor indexing per cut)
        on_host = thresholds.device.type == "cpu"
        cs = thresholds.tolist() if on_host else thresholds.unbind()
        slopes_k = slopes.tolist() if on_host else slopes.unbind()
        outputs, kept = [], []
        for start in range(0, len(columns), n_cuts):
            group = columns[start : start + n_cuts]
            factors = group[0].new_empty((n_cuts, *group[0].shape))
            for k, (x, factor) in enumerate(zip(group, factors.unbind(), strict=True)):
                if hard[k]:
                    factor.copy_(_step(x, cs[k], signs[k]))
                    continue
                torch.sub(x, cs[k], out=factor).mul_(slopes_k[k]).sigmoid_()
                if hard[k] is None:
                    factor.copy_(torch.where(soft[k], factor, _step(x, cs[k], signs[k])))
            outputs.append(torch.prod(factors, 0))
            kept.append(factors)
        ctx.n_cuts = n_cuts
        ctx.save_for_backward(thresholds, slopes, *kept, *outputs, *columns)
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_ws):
        n_cuts, n_groups = ctx.n_cuts, len(grad_ws)
        thresholds, slopes, *saved = ctx.saved_tensors
        all_factors, outputs = saved[:n_groups], saved[n_groups : 2 * n_groups]
        columns = saved[2 * n_groups :]
        need_c, need_a = ctx.needs_input_grad[:2]
        need_x = ctx.needs_input_grad[5:]
        qh = thresholds.new_zeros(n_cuts)  # sum_i q_ik H_i
        qhd = thresholds.new_zeros(n_cuts) if need_a else None  # sum_i q_ik H_i (x_ik - c_k)
        grad_x: list[torch.Tensor | None] = [None] * len(columns)
        for g, (grad_w, factors, w) in enumerate(zip(grad_ws, all_factors, outputs, strict=True)):
            group = columns[g * n_cuts : (g + 1) * n_cuts]
            weighted = (grad_w * w).reshape(-1)  # H
            f = factors.view(n_cuts, -1)
            if need_c:  # q @ H with q = 1 - f formed in pieces, in a small reused buffer
                size = min(_SELECTION_PIECE, f.shape[1]) if f.device.type == "cpu" else f.shape[1]
                size = max(size, 1)  # a group without events
                q = f.new_empty((n_cuts, size))
                one = f.new_ones(())  # 1 - f in one operation (bitwise (-f) + 1)
                for start in range(0, f.shape[1], size):
                    piece = q[:, : min(size, f.shape[1] - start)]
                    torch.sub(one, f[:, start : start + piece.shape[1]], out=piece)
                    qh.addmv_(piece, weighted[start : start + piece.shape[1]])
            if qhd is None and not any(need_x[g * n_cuts : (g + 1) * n_cuts]):
                continue
            q = torch.rsub(f, 1.0)  # sigmoid(-z) (docstring)
            if qhd is not None:
                diff = torch.stack(
                    [torch.sub(x, c) for x, c in zip(group, thresholds, strict=True)]
                )
                qhd += torch.sum(q * weighted * diff.view(n_cuts, -1), 1)
            for k, x in enumerate(group):
                if need_x[g * n_cuts + k]:
                    grad_x[g * n_cuts + k] = (q[k] * weighted * slopes[k]).view(x.shape)
        grad_c = -slopes * qh if need_c else None
        return grad_c, qhd, None, None, None, *grad_x


def _step(x: torch.Tensor, threshold: torch.Tensor | float, sign: float) -> torch.Tensor:
    """The strict boolean cut ``1[s (x - c) > 0]`` as 0/1 in the dtype of ``x``."""
    passed = x > threshold if sign > 0 else x < threshold
    return passed.to(x.dtype)


_IQR_TO_SIGMA = 1.3489795003921634  # 2 * Phi^-1(3/4): the interquartile range of N(0, 1)


def column_spread(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    r"""Robust spread of a column: weighted interquartile range / 1.349, with fallbacks.

    Math: ``spread = (Q(3/4) - Q(1/4)) / 1.349``, where ``Q`` is the weighted quantile with
    ``|weights|`` by the inverted empirical CDF (the smallest value whose cumulative weight
    fraction reaches ``q``; numpy's ``quantile(..., weights=, method="inverted_cdf")``). For a
    Gaussian this is its standard deviation (Hyndman & Fan 1996, definition 1; the factor is
    ``2 Phi^-1(3/4)``).

    Why robust: cut variables are typically steeply falling or heavy-tailed (pT, MET, isolation);
    the weighted standard deviation is then set by a few tail events (one mismeasured 5 TeV MET
    event changes it), while the temperature should reflect the width of the bulk of events
    around the thresholds. Why ``|weights|``: samples with negative weights have no well-defined
    weighted quantile (the CDF is not monotonic); the spread is a scale, not an estimate, and the
    absolute weights describe where the events lie.

    Fallbacks, in order, so that the result is always ``> 0``: when the quartiles coincide (more
    than half the weight on one value, e.g. an isolation column mostly at exactly 0) the IQR is 0
    and the weighted standard deviation (with ``|weights|``) is used; when the column is
    constant, its absolute value; when it is constantly 0, 1 (one unit of the variable).
    Non-finite values and zero weights are ignored. Caveat: a spike holding between a quarter
    and a half of the weight shrinks the IQR below the standard deviation (the spread is then
    that of the bulk around the spike).

    No gradient flows through the spread (it is measured once, on the nominal MC). Returns a 0-d
    tensor in the dtype of ``x`` (float64 for an integer column), on its device.

    Raises:
        DataError: no event has a finite value and a non-zero weight.
    """
    dtype = x.dtype if x.is_floating_point() else torch.float64
    x, w = spread_inputs(x, weights)
    if x.numel() == 0:
        raise DataError(NO_SPREAD_EVENTS)
    x, order = torch.sort(x)
    w = w[order]
    cdf = torch.cumsum(w, 0)
    cdf = cdf / cdf[-1]
    q = torch.tensor(QUARTILES, dtype=torch.float64, device=x.device)
    index = torch.searchsorted(cdf, q).clamp_(max=x.numel() - 1)
    lower, upper = x[index]
    mean = torch.sum(w * x) / torch.sum(w)
    std = torch.sqrt(torch.sum(w * (x - mean) ** 2) / torch.sum(w))
    return spread_from(lower, upper, std, x[-1]).to(dtype)


QUARTILES = (0.25, 0.75)
"""The quantile fractions of :func:`column_spread`'s interquartile range."""

NO_SPREAD_EVENTS = "cannot measure the spread of a column without finite values and weights"


def spread_inputs(
    x: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries :func:`column_spread` uses: ``(x, |w|)`` in float64, flattened, detached,
    where ``x`` and ``w`` are finite and ``w != 0``."""
    x = x.detach().reshape(-1)
    w = (torch.ones_like(x) if weights is None else weights.detach().reshape(-1)).abs()
    if w.shape != x.shape:
        raise ValueError(f"weights have {w.numel()} entries but x has {x.numel()}")
    keep = torch.isfinite(x) & torch.isfinite(w) & (w > 0)
    return x[keep].to(torch.float64), w[keep].to(torch.float64)


def spread_from(
    lower: torch.Tensor, upper: torch.Tensor, std: torch.Tensor, largest: torch.Tensor
) -> torch.Tensor:
    """:func:`column_spread` from the weighted quartiles, the weighted standard deviation and
    the largest value: ``(upper - lower) / 1.349``, else ``std``, else ``|largest|``, else 1."""
    iqr_sigma = (upper - lower) / _IQR_TO_SIGMA
    scale = torch.where(largest.abs() > 0, largest.abs(), torch.ones_like(std))
    return torch.where(iqr_sigma > 0, iqr_sigma, torch.where(std > 0, std, scale))


def cut_temperature(
    x: torch.Tensor, weights: torch.Tensor | None, tau_relative: Scalar
) -> torch.Tensor:
    r"""Temperature in the units of ``x``: ``tau = tau_relative * column_spread(x, weights)``.

    ``tau_relative`` is the knob the optimisation schedule anneals (DESIGN.md: relaxation knobs
    are in natural units); ``column_spread`` is the weighted interquartile range / 1.349 (see its
    docstring for the choice and the fallbacks that keep it ``> 0``), measured once on the nominal
    MC. ``tau_relative = 0`` gives ``tau = 0``, the boolean cut in :func:`log_soft_cut`.

    Returns:
        a 0-d tensor in the dtype of ``x`` (float64 for an integer column), on its device, which
        carries gradient only through ``tau_relative``.
    """
    if not isinstance(tau_relative, torch.Tensor) and not tau_relative >= 0:
        raise ValueError(f"tau_relative must be >= 0, got {tau_relative!r}")
    return tau_relative * column_spread(x, weights)
