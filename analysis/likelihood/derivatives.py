r"""Exact gradient and Hessian of :math:`-2\log L` from the HistFactory structure (no autograd).

Autograd gives the Hessian of a P-parameter likelihood as P backward passes through the whole
model (219 parameters of a published ATLAS likelihood: about 1.5 s). The model's structure
gives it in a few vectorised passes instead (a few ms). With cells ``c`` (one per channel,
sample and bin), main bins ``b`` and

.. math::

    r_c = A_c\,M_c, \qquad A_c = \nu^0_c + \sum_m \delta_{cm}(\alpha_m), \qquad
    M_c = Q_{\beta(c)}\,R_c, \qquad \lambda_b = \sum_{c \in b} r_c,

where :math:`Q_\beta = \prod_k f_k(\theta_{p_k})` is the product of the factors that are
constant over the cell's block :math:`\beta(c)` (normfactor, lumi, normsys) and
:math:`R_c = \prod_j \theta_{q_j}` that of the per-bin parameters (staterror, shapesys,
shapefactor), the objective :math:`F = \sum_b g_b(\lambda_b) + \sum_a h_a(\theta_{p_a})`
(:math:`g_b = -2 \log \mathrm{Pois}(n_b|\lambda_b)`, :math:`h_a` the constraint terms, each of
one parameter) has

.. math::

    \nabla F = \sum_b g'_b\,\nabla\lambda_b + \sum_a h'_a e_{p_a}, \qquad
    \nabla^2 F = J^T \mathrm{diag}(g'') J
        + \sum_c w_c \big(M_c \nabla^2 A_c + \nabla A_c \nabla M_c^T + \nabla M_c \nabla A_c^T
        + A_c \nabla^2 M_c\big) + \sum_a h''_a e_{p_a} e_{p_a}^T,

with :math:`J = \partial\lambda/\partial\theta` and :math:`w_c = g'_{b(c)}` (the first term
alone is the Gauss-Newton / Fisher-scoring matrix; the second is what makes it exact away from
:math:`n = \lambda`). :math:`\nabla^2 A_c` is diagonal (each histosys term has one parameter),
and the product rule gives

.. math::

    \nabla^2 M_c = R_c \nabla^2 Q + Q \nabla^2 R_c + \nabla Q \nabla R_c^T + \nabla R_c \nabla Q^T,
    \qquad
    \partial_{p_k}\partial_{p_l} Q = f'_k f'_l \prod_{m \ne k, l} f_m \;(k \ne l), \quad
    \partial^2_{p_k} Q \ni f''_k \prod_{m \ne k} f_m ,

with the "all but one" and "all but two" products taken from prefix, suffix and in-between
cumulative products, exact when a factor is 0 (a normfactor at its bound). The block-factor
pairs are one matrix product over all blocks (:func:`_add_block_curvature`: about 118k ordered
pairs of factors on ANA-SUSY-2018-16, a ``(260, 110)`` matrix of blocks by block parameters),
the other sums over factor pairs are scattered into the ``(P, P)`` matrix, so a parameter that
acts twice on a cell (a name that is both histosys and normsys) gets every term. Index tables
are built once per model; the Jacobians are kept batch-first ``(B, C, P+1)`` so that the
matrix products need no copies. The elementwise derivatives
:math:`f', f''` of the interpolation codes, :math:`g', g''` and :math:`h', h''` are taken by
autograd of the model's own elementwise functions (one cheap pass each), so they match
:meth:`Model.twice_nll` to rounding, kinks included (the branch conventions of
:mod:`analysis.likelihood.interpolation`).

The results are detached (no graph to the model's inputs): the fits' Newton steps and
covariances. Differentiable Hessians (gradients through fits) keep using autograd
(:func:`analysis.fit.value_grad_hessian` with ``create_graph=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from analysis.likelihood._tensors import broadcast_shapes
from analysis.likelihood.distributions import poisson_logpdf_derivatives
from analysis.likelihood.modifiers.histosys import HistoSys

if TYPE_CHECKING:
    from analysis.likelihood.model import Model

#: elements of the largest intermediate tensor per batch chunk (float64: 8 bytes each). Measured
#: on ANA-SUSY-2018-16 (219 parameters, 57,200 elements per row), batch of 32, one thread, CPU
#: time per row: 3.1 ms at 2^22 (one chunk), 2.5 at 2^20, 2.4-2.6 at 2^19 (9 rows, 4 MiB),
#: 2.5-3.4 at 2^18, 3.3-4.5 at 2^17
CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class _Structure:
    """Index tables of one model's products, built once per model."""

    block_slots: torch.Tensor  # (Kb, n_blocks) rows of [x; unit values; 1]
    row_parameter: torch.Tensor  # (P + U + 1,) parameter of each row (P for the ones row)
    real_slots: torch.Tensor  # (S,) flat (slot * n_blocks + block) of the real block factors
    real_slot_block: torch.Tensor  # (S,) their block
    real_slot_diagonal: torch.Tensor  # (S,) p * (P + 2): their parameter's Hessian diagonal
    block_columns: torch.Tensor  # (P_b,) the parameters of the block factors
    slot_column_flat: torch.Tensor  # (S,) block * P_b + column of each real slot
    block_hessian_index: torch.Tensor  # (P_b^2,) p * (P + 1) + q of those parameters
    cell_slots: torch.Tensor  # (Kc, C) parameters of the per-bin factors (P: none)
    cell_block: torch.Tensor  # (C,)
    cell_bin: torch.Tensor  # (C,)
    # flat indices into the Jacobians of M (C, P+1) and lambda (N, P+1) of the entries of the
    # block factors (Kb * C,) and of the per-bin factors (Kc * C,)
    jac_m_block_index: torch.Tensor
    jac_m_cell_index: torch.Tensor
    jac_lam_block_index: torch.Tensor
    jac_lam_cell_index: torch.Tensor


def _structure(model: Model) -> _Structure:
    cached = model.__dict__.get("_derivative_structure")
    if cached is not None:
        return cast(_Structure, cached)
    n_par, device = model.npars, model.device
    n_blocks = int(model._cell_block.max()) + 1 if model._cell_block.numel() else 0
    units = [mod.unit_parameters for mod in model._unit_factors]
    n_units = sum(int(u.numel()) for u in units)
    row_parameter = torch.cat(
        [
            torch.arange(n_par, device=device),
            *units,
            torch.full((1,), n_par, dtype=torch.long, device=device),
        ]
    )
    if model._block_slots.numel():
        block_slots = model._block_slots
    else:  # no block-level factors: one slot of the ones row
        block_slots = torch.full((1, n_blocks), n_par + n_units, dtype=torch.long, device=device)
    # the real (not padding) block factors, the distinct parameters of the block factors and
    # each real slot's column among them
    slot_parameter = row_parameter[block_slots]  # (Kb, n_blocks); P on padding slots
    real_slots = torch.nonzero(slot_parameter.reshape(-1) < n_par).reshape(-1)
    real_slot_block = real_slots % max(n_blocks, 1)
    real_parameter = slot_parameter.reshape(-1)[real_slots]
    block_columns = torch.unique(real_parameter)
    n_columns = block_columns.numel()
    column_of = torch.empty((n_par + 1,), dtype=torch.long, device=device)
    column_of[block_columns] = torch.arange(n_columns, device=device)
    slot_column_flat = real_slot_block * n_columns + column_of[real_parameter]
    block_hessian_index = (block_columns[:, None] * (n_par + 1) + block_columns).reshape(-1)
    cell_slots = model._cell_slots
    if cell_slots.numel():  # drop the block-product entries (Q is applied per block)
        cell_slots = torch.where(cell_slots < n_par, cell_slots, n_par)
        cell_slots = cell_slots[(cell_slots < n_par).any(1)]
    if not cell_slots.numel():
        cell_slots = torch.full((1, model._cell_bin.numel()), n_par, device=device)
    cell_parameter = slot_parameter[:, model._cell_block]  # (Kb, C)
    cells = torch.arange(model._cell_bin.numel(), device=device) * (n_par + 1)
    bins = model._cell_bin * (n_par + 1)
    structure = _Structure(
        block_slots,
        row_parameter,
        real_slots,
        real_slot_block,
        real_parameter * (n_par + 2),
        block_columns,
        slot_column_flat,
        block_hessian_index,
        cell_slots,
        model._cell_block,
        model._cell_bin,
        (cells + cell_parameter).reshape(-1),
        (cells + cell_slots).reshape(-1),
        (bins + cell_parameter).reshape(-1),
        (bins + cell_slots).reshape(-1),
    )
    model.__dict__["_derivative_structure"] = structure
    return structure


def _constraint_derivatives(
    model: Model, theta: torch.Tensor, aux: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""First and second derivatives of each constraint term of :math:`-2\log L` in its
    parameter, ``(A, B)`` for its values ``theta`` and aux data ``aux`` (columns): Gaussian
    :math:`((a - \theta)/\sigma)^2` gives :math:`2(\theta - a)/\sigma^2` and
    :math:`2/\sigma^2`; Poisson :math:`-2\log\mathrm{Pois}(a|\theta\tau)` gives
    :math:`\tau` and :math:`\tau^2` times those of :func:`poisson_logpdf` in its mean, times -2."""
    scale = model._aux_scale.detach()
    inv_sigma2 = (model._inv_sigma.detach() ** 2).unsqueeze(-1)
    first = 2.0 * (theta * scale - aux) * inv_sigma2 * scale
    second = (2.0 * inv_sigma2 * scale * scale).expand_as(first)
    if model._has_poisson:
        mask = model._pois_mask.unsqueeze(-1)
        p1, p2 = poisson_logpdf_derivatives(
            torch.where(mask, aux, 1.0), torch.where(mask, theta * scale, 1.0)
        )
        first = torch.where(mask, -2.0 * p1 * scale, first)
        second = torch.where(mask, -2.0 * p2 * scale * scale, second)
    return first, second


def _before_after(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exclusive prefix and suffix products over K of ``factors`` ``(K, n, B)``:
    :math:`\prod_{m < k} f_m` and :math:`\prod_{m > k} f_m`."""
    ones = torch.ones_like(factors[:1])
    before = torch.cat([ones, factors[:-1]]).cumprod(0)
    after = torch.cat([factors[1:], ones]).flip(0).cumprod(0).flip(0)
    return before, after


def _all_but_one(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Product ``(n, B)`` and all-but-one products ``(K, n, B)`` of ``factors`` ``(K, n, B)``
    over K, from prefix and suffix products (no division: exact with zeros)."""
    before, after = _before_after(factors)
    return before[-1] * factors[-1], before * after


def _all_but_two(factors: torch.Tensor) -> torch.Tensor:
    """All-but-two products ``(K, K, n, B)`` (zero diagonal) of ``factors`` ``(K, n, B)``:
    prefix x in-between x suffix products, O(K^2) memory (for few factors)."""
    k = factors.shape[0]
    before, after = _before_after(factors)
    index = torch.arange(k, device=factors.device)
    later = (index[None, :] > index[:, None]).reshape(k, k, *([1] * (factors.ndim - 1)))
    # between[k, l] = prod_{k < m < l} f_m for l > k
    running = torch.where(later, factors.unsqueeze(0), 1.0).cumprod(1)
    between = torch.cat([torch.ones_like(running[:, :1]), running[:, :-1]], 1)
    upper = torch.where(later, before.unsqueeze(1) * between * after.unsqueeze(0), 0.0)
    return upper + upper.transpose(0, 1)


def _add_block_curvature(
    flat_hessian: torch.Tensor,
    structure: _Structure,
    f: torch.Tensor,
    f1: torch.Tensor,
    f2: torch.Tensor,
    weight: torch.Tensor,
) -> None:
    r"""``flat_hessian`` ``(B, (P+1)^2)`` += :math:`\sum_\beta u_\beta \nabla^2 Q_\beta` for
    block products :math:`Q = \prod_k f_k` (factors ``f`` and derivatives ``(K, n, B)`` of
    the structure's block slots, weights ``u`` ``(n, B)``):

    .. math::

        \nabla^2 Q = \sum_{k \ne l} f'_k f'_l \prod_{m \ne k,l} f_m \, e_{p_k} e_{p_l}^T
            + \sum_k f''_k \prod_{m \ne k} f_m \, e_{p_k} e_{p_k}^T .

    With :math:`\bar Q` the product of the non-zero factors (:math:`\bar f = f`, or 1 where
    :math:`f = 0`) and :math:`a_k = f'_k / \bar f_k`, the pair sum is
    :math:`\bar Q \sum_{k \ne l} a_k a_l e_{p_k} e_{p_l}^T` over the pairs with no zero factor
    outside :math:`\{k, l\}` (exact with zero factors, a normfactor at 0). By the number of
    zero factors of the block, with :math:`S = \sum_k a_k e_{p_k}` over all factors and
    :math:`Z`, :math:`S - Z` its parts over the zero and the non-zero ones, that sum is
    :math:`S S^T - \sum_k a_k^2 e_{p_k} e_{p_k}^T` (none), :math:`Z (S - Z)^T + (S - Z) Z^T`
    (one), :math:`Z Z^T - \sum_{f_k = 0} a_k^2 e_{p_k} e_{p_k}^T` (two) and 0 (more): one
    product :math:`X^T \mathrm{diag}(v) Y` of ``(n, P_b)`` matrices over the block parameters
    (and its transpose) for all blocks, instead of one gather per pair of factors (about 118k
    ordered pairs on ANA-SUSY-2018-16). The elementwise work is done on the real factors only
    (4,025 of 11,440 padded slots there).
    """
    real, block = structure.real_slots, structure.real_slot_block
    if not real.numel():
        return
    width = f.shape[-1]
    zero_padded = f.abs() < torch.finfo(f.dtype).tiny
    real_factors = f.reshape(-1, width).index_select(0, real)  # (S, B): the real factors
    f1 = f1.reshape(-1, width).index_select(0, real)
    f2 = f2.reshape(-1, width).index_select(0, real)
    if not bool(zero_padded.any()):  # the usual case: X = Y = S, v = u Q / 2
        v = 0.5 * weight * f.prod(0)  # (n, B)
        x = y = f1 / real_factors
        v_slot = v.index_select(0, block)
        curvature = f2 / real_factors * (2.0 * v_slot)  # f''_k prod_{m != k} f_m
    else:
        n_zero = zero_padded.sum(0)  # (n, B)
        uq = weight * torch.where(zero_padded, 1.0, f).prod(0)  # u x the non-zero factors
        zero = real_factors.abs() < torch.finfo(f.dtype).tiny
        safe = torch.where(zero, 1.0, real_factors)
        a = f1 / safe
        z = zero.to(f.dtype)
        none, one, two = (n_zero == k for k in (0, 1, 2))
        v = torch.where(one, uq, torch.where(none | two, 0.5 * uq, 0.0))
        none, one, v_slot = (t.index_select(0, block) for t in (none, one, v))
        x = torch.where(none, a, a * z)  # S or Z
        y = torch.where(none, a, torch.where(one, a - a * z, a * z))  # S, S - Z or Z
        alone = (n_zero.index_select(0, block) - zero.to(n_zero.dtype)) == 0
        curvature = torch.where(alone, f2 / safe * uq.index_select(0, block), 0.0)
    # the block matrices (B, n, P_b) by one scatter each
    n_blocks, n_cols = v.shape[0], structure.block_columns.numel()
    target = structure.slot_column_flat
    x_matrix = x.new_zeros((width, n_blocks * n_cols))
    x_matrix.index_add_(1, target, x.T)
    y_matrix = x.new_zeros((width, n_blocks * n_cols))
    y_matrix.index_add_(1, target, (y * v_slot).T)
    x_matrix = x_matrix.view(width, n_blocks, n_cols)
    product = x_matrix.transpose(1, 2) @ y_matrix.view(width, n_blocks, n_cols)
    product = (product + product.transpose(1, 2)).reshape(width, -1)
    flat_hessian.index_add_(1, structure.block_hessian_index, product)
    # diagonal: f''_k prod_{m != k} f_m, less the k = l terms of S S^T and Z Z^T
    diagonal = curvature - 2.0 * v_slot * x * y
    flat_hessian.index_add_(1, structure.real_slot_diagonal, diagonal.T)


def _scatter_pairs(
    hessian: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor
) -> None:
    """``hessian[:, rows, cols] += values`` (flat ``(B, (P+1)^2)``, values ``(..., B)``),
    indices broadcast with values' leading dimensions."""
    size = int(round(hessian.shape[1] ** 0.5))
    flat = (rows * size + cols).expand(values.shape[:-1]).reshape(-1)
    hessian.index_add_(1, flat, values.reshape(-1, values.shape[-1]).T)


def twice_nll_derivatives(
    model: Model, pars: torch.Tensor, data: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value ``(...)``, gradient ``(..., P)`` and Hessian ``(..., P, P)`` of
    :meth:`Model.twice_nll` at ``pars`` (``(..., P)``) for ``data`` (``(..., N + A)``), exact
    and detached; batch dimensions broadcast (a yield-batched model needs ``(B, P)``)."""
    with torch.no_grad():
        pars, data = model._pars(pars).detach(), model._data(data).detach()
        batch = broadcast_shapes(pars.shape[:-1], data.shape[:-1])
        value = model.twice_nll(pars, data).expand(batch)
        x = pars.expand(*batch, model.npars).reshape(-1, model.npars).T
        d = data.expand(*batch, data.shape[-1]).reshape(-1, data.shape[-1]).T
        structure = _structure(model)
        n_cells, n_par = structure.cell_bin.numel(), model.npars
        kb, kc = structure.block_slots.shape[0], structure.cell_slots.shape[0]
        n_blocks, n_block_columns = structure.block_slots.shape[1], structure.block_columns.numel()
        per_column = max(
            n_cells * (n_par + 1),
            n_blocks * n_block_columns,  # the block-factor matrices
            n_block_columns**2,
            kc * (kb + kc) * n_cells,
            (n_par + 1) ** 2,
        )
        step = max(1, CHUNK_ELEMENTS // per_column)
        nominal = model._nominal_column.detach()
        grads, hessians = [], []
        for start in range(0, x.shape[1], step):
            columns = slice(start, start + step)
            nominal_part = nominal if nominal.shape[1] == 1 else nominal[:, columns]
            g, h = _chunk(model, structure, x[:, columns], d[:, columns], nominal_part)
            grads.append(g)
            hessians.append(h)
        grad = torch.cat(grads).reshape(*batch, n_par)
        hessian = hessians[0] if len(hessians) == 1 else torch.cat(hessians)
        hessian = hessian.reshape(*batch, n_par, n_par)
        hessian = (hessian + hessian.transpose(-1, -2)).mul_(0.5)
    return value, grad, hessian


def _chunk(
    model: Model,
    structure: _Structure,
    x: torch.Tensor,
    data: torch.Tensor,
    nominal: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient ``(B, P)`` and Hessian ``(B, P, P)`` for parameter columns ``x`` ``(P, B)``."""
    n_par, width = x.shape
    size = n_par + 1  # one extra index for "no parameter", dropped at the end
    n_cells = structure.cell_bin.numel()

    # rows [x; unit values; 1] with elementwise first and second derivatives
    values, firsts, seconds = [x], [torch.ones_like(x)], [torch.zeros_like(x)]
    for mod in model._unit_factors:
        f, f1, f2 = mod.factor_derivatives(x.index_select(0, mod.unit_parameters))
        values.append(f)
        firsts.append(f1)
        seconds.append(f2)
    ones = x.new_ones((1, width))
    rows = torch.cat([*values, ones])
    rows1 = torch.cat([*firsts, torch.zeros_like(ones)])
    rows2 = torch.cat([*seconds, torch.zeros_like(ones)])

    # block products Q, per-bin products R
    slots = structure.block_slots
    par_k = structure.row_parameter[slots]  # (Kb, n_blocks)
    f_k = rows[slots]
    f1_k, f2_k = rows1[slots], rows2[slots]
    q, q_but_one = _all_but_one(f_k)
    grad_q = q_but_one * f1_k  # (Kb, n_blocks, B)
    x_ones = torch.cat([x, ones])
    par_j = structure.cell_slots  # (Kc, C)
    cell_factors = x_ones[par_j]  # the factors are parameters: f' = 1, f'' = 0
    r, r_but_one = _all_but_one(cell_factors)
    r_but_two = _all_but_two(cell_factors)
    block = structure.cell_block
    q_cell = q.index_select(0, block)
    m = q_cell * r

    # additive part A (histosys): dA/dalpha_m (C, M, B) and the diagonal d2A/dalpha_m^2
    a = nominal.expand(n_cells, width)
    additive = []
    for additive_type in model._additive:
        if not isinstance(additive_type, HistoSys):
            raise NotImplementedError(f"no exact Hessian for {additive_type.type} modifiers")
        histosys = additive_type
        alpha = x.index_select(0, histosys.parameters)
        n_sys = alpha.shape[0]
        weights = histosys.weights(alpha)
        w1, w2 = histosys.weight_derivatives(alpha)
        up, down = histosys.deltas[:, :n_sys].detach(), histosys.deltas[:, n_sys:].detach()
        a = a + up @ weights[0] + down @ weights[1]
        d1 = up.unsqueeze(-1) * w1[0].unsqueeze(0) + down.unsqueeze(-1) * w1[1].unsqueeze(0)
        d2 = up.unsqueeze(-1) * w2[0].unsqueeze(0) + down.unsqueeze(-1) * w2[1].unsqueeze(0)
        additive.append((histosys.parameters, d1, d2))

    # dense Jacobians, batch first for the matrix products below, by scattering their entries:
    # of M (B, C, P+1), R dQ on the block's parameters and Q dR on the cell's; of lambda
    # (B, N, P+1), A dM + M dA summed over the cells of each bin
    grad_q_cell = grad_q[:, block]  # (Kb, C, B)
    block_entries = grad_q_cell * r
    cell_entries = r_but_one * q_cell  # (Kc, C, B)
    jac_m = x.new_zeros((width, n_cells * size))
    jac_m.index_add_(1, structure.jac_m_block_index, block_entries.reshape(-1, width).T)
    jac_m.index_add_(1, structure.jac_m_cell_index, cell_entries.reshape(-1, width).T)
    jac_m = jac_m.view(width, n_cells, size)
    jl = x.new_zeros((width, model.nmain * size))
    jl.index_add_(1, structure.jac_lam_block_index, (block_entries * a).reshape(-1, width).T)
    jl.index_add_(1, structure.jac_lam_cell_index, (cell_entries * a).reshape(-1, width).T)
    for parameters, d1, _ in additive:
        index = (structure.cell_bin.unsqueeze(1) * size + parameters).reshape(-1)  # (C * M,)
        jl.index_add_(1, index, (m.unsqueeze(1) * d1).reshape(-1, width).T)
    jl = jl.view(width, model.nmain, size)

    # Poisson terms g(lambda) = -2 log Pois(n | lambda): J^T diag(g'') J, J = dlambda/dtheta
    rates = a * m
    lam = rates.new_zeros((model.nmain, width)).index_add_(0, structure.cell_bin, rates)
    g1, g2 = (-2.0 * d for d in poisson_logpdf_derivatives(data[: model.nmain], lam))
    grad = (jl * g1.T.unsqueeze(-1)).sum(1)  # (B, P+1)
    hessian = jl.transpose(1, 2) @ (jl * g2.T.unsqueeze(-1))  # (B, P+1, P+1)
    flat_h = hessian.view(width, size * size)

    # sum_c w_c (M d2A + dA dM^T + dM dA^T + A d2M), w_c = g'(lambda) of the cell's bin
    w = g1.index_select(0, structure.cell_bin)  # (C, B)
    for parameters, d1, d2 in additive:
        flat_h.index_add_(1, parameters * (size + 1), ((w * m).unsqueeze(1) * d2).sum(0).T)
        cross = (d1 * w.unsqueeze(1)).permute(2, 1, 0) @ jac_m  # (B, M, P+1)
        hessian.index_add_(1, parameters, cross)
        hessian.index_add_(2, parameters, cross.transpose(1, 2))
    # A d2M = A (R d2Q + Q d2R + dQ dR^T + dR dQ^T)
    u = w * a
    u_block = x.new_zeros((q.shape[0], width)).index_add_(0, block, u * r)
    _add_block_curvature(flat_h, structure, f_k, f1_k, f2_k, u_block)
    _scatter_pairs(flat_h, par_j.unsqueeze(1), par_j.unsqueeze(0), r_but_two * (u * q_cell))
    mixed = grad_q_cell.unsqueeze(1) * r_but_one.unsqueeze(0) * u  # (Kb, Kc, C, B)
    par_kc = par_k[:, block].unsqueeze(1)
    _scatter_pairs(flat_h, par_kc, par_j.unsqueeze(0), mixed)
    _scatter_pairs(flat_h, par_j.unsqueeze(0), par_kc, mixed)

    # constraint terms, one parameter each
    if model.naux:
        aux_par = model._aux_par
        h1, h2 = _constraint_derivatives(model, x.index_select(0, aux_par), data[model.nmain :])
        grad.index_add_(1, aux_par, h1.T)
        flat_h.index_add_(1, aux_par * (size + 1), h2.T)
    return grad[:, :n_par], hessian[:, :n_par, :n_par]
