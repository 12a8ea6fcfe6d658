"""Histograms of the observable: yields and sum of squared weights per bin.

Hard histograms follow boost-histogram's (and so cabinetry's) convention: bins are half-open,
``[e_b, e_{b+1})``, and events outside ``[e_0, e_B)`` are not counted (no flow bins). For bin b

    n_b = sum_i w_i 1[e_b <= y_i < e_{b+1}],      s_b = sum_i w_i^2 1[e_b <= y_i < e_{b+1}],

where ``s_b`` estimates the variance of ``n_b`` (staterror uses ``sqrt(s_b)``). Sums are
accumulated in float64 and returned in the dtype of the weights.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from analysis.config import Config, Cut
from analysis.io import Events, TemplateKey, read_events


@dataclass(frozen=True)
class Histogram:
    """Bin ``edges`` (B+1), ``yields`` (B) and ``sumw2`` (B, the sum of squared weights; None
    where the caller did not ask for it: ``sumw2_rows`` of :func:`kde_histograms`, the
    systematic variations of the optimization's steps)."""

    edges: torch.Tensor
    yields: torch.Tensor
    sumw2: torch.Tensor | None

    @property
    def variances(self) -> torch.Tensor:
        """``sumw2``; ``ValueError`` where it was not computed."""
        if self.sumw2 is None:
            raise ValueError("this histogram's sum of squared weights was not computed")
        return self.sumw2

    @property
    def stdev(self) -> torch.Tensor:
        """Statistical uncertainty per bin, ``sqrt(sumw2)``."""
        return torch.sqrt(self.variances)

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "edges": self.edges.tolist(),
            "yields": self.yields.tolist(),
            "sumw2": self.variances.tolist(),
        }


def hard_histogram(values: torch.Tensor, weights: torch.Tensor, edges: torch.Tensor) -> Histogram:
    """Weighted histogram of ``values`` with half-open bins and no flow (see module docstring)."""
    n_bins = edges.shape[0] - 1
    index = torch.bucketize(values, edges, right=True) - 1
    inside = (index >= 0) & (index < n_bins)  # also drops NaN, which bucketizes past the end
    index, w = index[inside], weights[inside].to(torch.float64)
    yields = torch.zeros(n_bins, dtype=torch.float64, device=weights.device).index_add_(0, index, w)
    sumw2 = torch.zeros_like(yields).index_add_(0, index, w * w)
    return Histogram(edges=edges, yields=yields.to(weights.dtype), sumw2=sumw2.to(weights.dtype))


def hard_cut_mask(events: Events, cuts: tuple[Cut, ...]) -> torch.Tensor:
    """Boolean mask of events passing every cut (``x > c`` or ``x < c``, strict)."""
    mask = torch.ones_like(events.weight, dtype=torch.bool)
    for cut in cuts:
        x = events.columns[cut.variable]
        mask &= (x > cut.value) if cut.direction == ">" else (x < cut.value)
    return mask


def hard_histograms(
    config: Config,
    events: Mapping[TemplateKey, Events] | None = None,
    *,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[TemplateKey, Histogram]:
    """Histogram every template of ``config`` with boolean cuts at the configured values.

    ``events`` may be given (from :func:`analysis.io.read_events`) to avoid reading again.
    Returns ``{(region, sample, variation): Histogram}`` in float64. A configuration with
    histogram inputs (no sample has a Tree) has no events: its histograms are read as they are
    (:func:`analysis.histogram_inputs.read_histograms`).
    """
    if events is None and config.general.input_type == "histogram":
        from analysis.histogram_inputs import read_histograms  # imports this module

        return read_histograms(config, device=device)
    if events is None:
        events = read_events(config, device=device, cache_dir=cache_dir)
    regions = {region.name: region for region in config.regions}
    out = {}
    for key, ev in events.items():
        region = regions[key[0]]
        edges = torch.tensor(region.binning, dtype=ev.weight.dtype, device=ev.weight.device)
        mask = hard_cut_mask(ev, region.cuts)
        out[key] = hard_histogram(ev.observable[mask], ev.weight[mask], edges)
    return out


def histograms_to_dict(histograms: Mapping[TemplateKey, Histogram]) -> dict:
    """``{region: {sample: {variation: {edges, yields, sumw2}}}}`` for JSON output."""
    out: dict = {}
    for (region, sample, variation), hist in histograms.items():
        out.setdefault(region, {}).setdefault(sample, {})[variation] = hist.to_dict()
    return out


# --- KDE (smooth) histograms --------------------------------------------------------------------

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327

KDE_TAIL_CUTOFF = {torch.float64: 8.0, torch.float32: 5.5}
"""``k`` per dtype: :func:`kde_histogram` truncates the Gaussian kernel at ``k h``, which changes
each bin's share of an event by at most ``2 Q(k)`` with ``Q(k) = 1 - Phi(k)`` (float64:
``2 Q(8) = 1.2e-15``; float32: ``2 Q(5.5) = 3.8e-8``, below float32 rounding of the CDF)."""

_KDE_UNDERFLOW = {torch.float64: 40.0, torch.float32: 15.0}
"""``|z|`` beyond which ``Q(z)`` is exactly 0 in the dtype (the dense op truncates only there)."""

_KDE_CHUNK_ELEMENTS = {"cpu": 1 << 18}
"""Window elements (events x 2K, times the weight rows for unsorted values) per chunk. CPU: a
chunk's intermediates (2 MiB in float64) are reused by the allocator instead of being
page-faulted in, and few chunks mean few operations and OpenMP regions (each of which stalls when
another process holds a core). Other devices (CUDA): ``_KDE_CHUNK_ELEMENTS_DEFAULT``, a bound on
temporary memory (256 MiB per float64 array) that keeps kernel launches few."""

_KDE_CHUNK_ELEMENTS_DEFAULT = 1 << 25

_KDE_MIN_BIN_EVENTS = 1024
"""For sorted values, a bin with at least this many events is processed in chunks of its own
events (same window edges: no gather); consecutive smaller bins are processed together (one
kernel evaluation with gathered edges, then one matrix product per bin). Measured on the demo
analysis: 256 to 1024 cost the same, smaller thresholds more (per-chunk overhead, some 15
tensor operations)."""

_KDE_ERF_MAX = 2.0
"""Window edges that every event of a sorted chunk sees at ``x <= 2`` (``x = |z| / sqrt2``; the
edges next to the events, for bandwidths above about 0.35 bin widths) get ``E = 1 - erf(x)``
instead of ``erfc(x)``: ``erf`` costs half as much, and there ``E >= erfc(2) = 4.7e-3`` and
``1 - erf`` is exact where ``erf >= 1/2`` (Sterbenz), so ``E`` carries the absolute error of
``erf`` (about 1 ulp of 1, 1.1e-16): at most 5e-14 relative, 2e-16 of an event's unit in any
bin's share (the far tails, where relative accuracy matters, are always ``erfc``). Measured on
the demo analysis against ``erfc`` throughout: 3e-16 relative in every bin."""

_KDE_SAVE_BYTES = 1 << 30
"""Largest size of the kernel values (at most events x 2K, in the dtype of the values) that
:func:`kde_histogram` keeps for the backward pass when the weights need a gradient (the usual
case: cut thresholds act through the weights). Above it the backward pass recomputes them (the
kernel, ``erfc``, is most of the forward time; keeping the values, page faults included, costs a
small fraction of recomputing them). 1 GiB: 1.7e7 events in float64 at ``K = 4`` (bandwidth
0.36 bin widths), 1.1e7 at ``K = 6`` (0.5 bin widths); the soft cuts keep several floats per
event as well. The same bound decides whether a :class:`KDELayout` keeps them between calls."""


def kde_reach(edges: torch.Tensor, bandwidth: torch.Tensor | float, dtype: torch.dtype) -> int:
    """Number ``K`` of edges that :func:`kde_histogram` examines on each side of an event.

    ``K = floor(k h / min_b(e_{b+1} - e_b)) + 2`` with ``k = KDE_TAIL_CUTOFF[dtype]``: the
    ``(m+1)``-th edge on either side of an event is at least ``m`` smallest bin widths away from
    it, so every edge within ``k h`` is among the ``K - 1`` nearest on its side, and the ``K``-th
    (beyond ``k h``, a pure step) closes the outermost bin that receives mass. For ``h = 0.36``
    bin widths (neos), ``K = 4`` in float64 (8 CDFs, 7 bins per event) and 3 in float32. Reads
    ``h`` and the smallest bin width on the host (one device synchronisation on CUDA) and checks
    them.

    Raises:
        ValueError: edges not strictly increasing, or ``h`` negative or not finite.
    """
    edges = edges.detach()
    if isinstance(bandwidth, torch.Tensor):
        h = bandwidth.detach().reshape(()).to(edges.device, torch.float64)
    else:
        h = torch.tensor(float(bandwidth), dtype=torch.float64, device=edges.device)
    min_width, h_value = torch.stack([torch.diff(edges).min().to(torch.float64), h]).tolist()
    if not min_width > 0:
        raise ValueError(f"edges must be strictly increasing, got {edges.tolist()}")
    if not 0 <= h_value < float("inf"):
        raise ValueError(f"bandwidth must be finite and >= 0, got {h_value!r}")
    return int(KDE_TAIL_CUTOFF[dtype] * h_value / min_width) + 2


def kde_histogram(
    values: torch.Tensor,
    weights: torch.Tensor,
    edges: torch.Tensor,
    bandwidth: torch.Tensor | float,
    *,
    reach: int | None = None,
) -> Histogram:
    r"""Weighted Gaussian-kernel (KDE) histogram: yields and sum of squared weights per bin.

    Math: each event is smeared by a Gaussian of width ``h`` and each bin receives the kernel
    mass between its edges (the binned KDE of neos, arXiv:2203.05570; ``relaxed.hist``):

        n_b = sum_i w_i m_ib,        s_b = sum_i w_i^2 m_ib,
        m_ib = Phi((e_{b+1} - y_i) / h) - Phi((e_b - y_i) / h).

    ``s_b`` weights ``w_i^2`` by the same kernel mass: it is the expected sum of ``w^2`` of a
    hard histogram of the smeared events, conserves ``sum_b s_b = sum_i w_i^2`` over a wide
    enough range, and becomes the hard ``sum w^2`` as ``h -> 0`` (``sum_i (w_i m_ib)^2``, the
    other candidate, underestimates it for events spread over several bins).

    Several weightings of the same events (``weights`` of shape ``(W, N)``, e.g. the nominal
    weights and weight-based systematic variations, each times the same or another selection
    weight) give ``W`` histograms, ``n_vb = sum_i w_vi m_ib``, for the price of one kernel
    evaluation: the masses ``m_ib`` depend on the values only. Several sets of events with the
    same edges and bandwidth: :func:`kde_histograms` (one call, one autograd node).

    Hard limit: ``h = 0`` exactly gives :func:`hard_histogram` (half-open bins
    ``[e_b, e_{b+1})``: an event on an edge goes to the bin above it; events outside
    ``[e_0, e_B)`` are dropped). For ``h > 0`` an event exactly on an edge puts half its weight
    on each side, so ``h -> 0`` converges to the hard histogram for events not on an edge.
    Events outside the range contribute the part of their kernel inside it; NaN values
    contribute nothing (as in the hard histogram); NaN weights make the sums NaN.

    Knob: ``h`` trades bias (weight leaks into neighbouring bins, shapes are smoothed) for
    gradient variance (only events within a few ``h`` of an edge carry gradient with respect to
    cuts, values and edges). DESIGN.md sets it in units of the bin width (neos uses 0.36).

    Algorithm (cost independent of the number of bins): ``bucketize`` finds each event's bin
    ``j``; the CDF is evaluated only at the ``K`` edges on each side of it (:func:`kde_reach`,
    ``K = floor(k h / smallest bin width) + 2``, so non-uniform edges work), and the ``2K - 1``
    window masses ``w_i m_ir`` are summed in float64 per (window position ``r``, event bin
    ``j``): by ``index_add_``, or, for values sorted ascending on CPU, per bin by a matrix
    product of the ``erfc`` values at the edges that the bin's events reach
    (:class:`_KDEHistogram`); window bin ``r`` of bin ``j`` is bin ``j + r - K`` (so
    ``n_b = sum_r S[r, b + K - r]``, a shift-and-add of ``2K - 1`` rows of ``B + 2`` numbers at
    the end). The kernel is truncated at ``k h``: writing
    ``Phi(z) = 1[z > 0] +- Q(|z|)``, the tail ``Q(u)`` is replaced by ``Q(min(u, k)) - Q(k)``,
    continuous in ``u`` and exactly 0 beyond ``k``, so every bin outside the window is exactly
    empty and an event's masses over the window sum to 1 (the part outside ``[e_0, e_B)`` is
    then dropped).
    Truncation error: each bin's share ``m_ib`` of an event changes by at most ``2 Q(k)``, so
    ``|Delta n_b| <= 2 Q(k) sum_i |w_i|`` (and ``|Delta s_b| <= 2 Q(k) sum_i w_i^2``), with
    ``k = 8`` in float64 (``2 Q(8) = 1.2e-15``, far below 1e-12 relative) and ``k = 5.5`` in
    float32 (``2 Q(5.5) = 3.8e-8``, below float32 rounding); see ``KDE_TAIL_CUTOFF``. Measured
    against :func:`kde_histogram_dense` (untruncated): up to 1.3e-15 of ``sum_i |w_i|``.

    Backward: analytic (``dn_b/dw_i = m_ib``, ``ds_b/dw_i = 2 w_i m_ib``; ``dPhi/dy = -phi/h``,
    ``dPhi/de = phi/h``, ``dPhi/dh = -z phi/h``) with the truncated density ``phi(u) - phi(k)``
    for ``u < k`` (0 beyond; it differs from the derivative of the forward kernel by at most
    ``phi(k) / h``: 5e-15/h in float64, 1.1e-7/h in float32, against a peak of 0.4/h). When the
    weights need a gradient and the kernel values fit in ``_KDE_SAVE_BYTES``, the forward pass
    keeps them (at most ``2K`` numbers per event) and the weight gradient needs no kernel
    evaluation; otherwise, and for the other inputs' ``exp(-z^2 / 2)``, each chunk's window is
    recomputed. Events are processed in chunks so the intermediates stay in cache (CPU) or
    bounded (CUDA). First derivatives only (no double backward; the dense op has them).

    Numerics: the kernel is evaluated in the dtype of ``values`` (float32 or float64; ``edges``
    and ``h`` are converted to it); tail masses are differences of ``Q`` rather than of ``Phi``
    (no cancellation far from an event); sums are accumulated in float64 and returned in the
    dtype of ``weights``. Values and gradients are finite for every finite ``h >= 0``; an ``h``
    below the smallest normal number of the dtype (1.2e-38 in float32, 2.2e-308 in float64)
    counts as 0. Nothing leaves the device except the two numbers :func:`kde_reach` reads when
    ``reach`` is not given.

    Args:
        values: observable ``y``, shape ``(N,)``; may require grad.
        weights: event weights ``w`` (e.g. ``weight * exp(log_selection_weight)``), shape
            ``(N,)``, or ``(W, N)`` for ``W`` weightings of the same events; may require grad.
        edges: bin edges, strictly increasing, shape ``(B + 1,)``; may require grad.
        bandwidth: kernel width ``h >= 0`` in the units of ``values`` (a number or a scalar
            tensor; may require grad). The caller converts from bin widths.
        reach: ``K`` when the caller knows it (e.g. :func:`kde_reach` at the largest ``h`` of an
            annealing schedule); skips the host synchronisation and the checks of ``edges`` and
            ``h`` (which must then be valid). A ``K`` smaller than :func:`kde_reach` gives loses
            the kernel mass beyond the window.

    Returns:
        ``Histogram(edges, yields, sumw2)``, ``edges`` as given; ``yields`` and ``sumw2`` of
        shape ``(B,)``, or ``(W, B)`` for 2-D ``weights``.
    """
    return kde_histograms([(values, weights)], edges, bandwidth, reach=reach)[0]


def kde_histograms(
    groups: Sequence[tuple[torch.Tensor, torch.Tensor]],
    edges: torch.Tensor,
    bandwidth: torch.Tensor | float,
    *,
    reach: int | None = None,
    ascending: bool | None = None,
    layout: KDELayout | None = None,
    factors: Sequence[torch.Tensor | None] | None = None,
    sumw2_rows: Sequence[int] | None = None,
) -> list[Histogram]:
    """:func:`kde_histogram` of several sets of events with the same edges and bandwidth.

    ``groups``: ``(values, weights)`` pairs as :func:`kde_histogram` takes them (values
    ``(N_g,)``, weights ``(N_g,)`` or ``(W_g, N_g)``), all values in one dtype. Returns one
    ``Histogram`` per group, equal to ``kde_histogram(values, weights, edges, bandwidth)``
    (the sums of each group are formed the same way), computed in one autograd node: the
    per-call work (window constants, the final shift-and-add, the backward pass's tables) is
    done once for all groups, which matters when there are many groups of few events.

    ``ascending``: ``True`` when the caller knows that every group's values are sorted
    ascending and free of NaN (e.g. stored sorted, as :class:`~analysis.pipeline.AnalysisPipeline`
    does): skips the check, a pass over all values per call (like ``reach``, not verified; other
    values then give wrong sums). ``None`` (default): checked per group (the sorted path on CPU
    where they are sorted, :class:`_KDEHistogram`); ``False``: the unsorted path.

    ``layout``: a :class:`KDELayout` for calls that repeat the same events, edges and bandwidth
    with other weights (the steps of an optimization): the first call fills it, later calls
    take the kernel values and the bookkeeping from it instead of computing them again.

    ``factors``: one per group, ``None`` or a tensor ``(N_g,)`` that multiplies every row of
    the group's weights (the histograms of ``weights * factor``, e.g. constant event weights
    times the selection weights of the soft cuts), with gradients for both. Equal to passing
    the products, without forming them outside or their gradient rows
    (``dL/dfactor_i = sum_v weights_vi dL/d(weights_vi factor_i)``).

    ``sumw2_rows``: one per group, how many of its leading weight rows get a sum of squared
    weights (default: all). The sums of squares cost as much as the yields; a caller that needs
    them for some weightings only (a workspace's ``staterror`` uses the nominal ones) skips the
    others. A group's ``Histogram.sumw2`` then has that many rows (``(S, B)``; for 1-D weights
    ``(B,)`` or, with 0, None).
    """
    if not groups:
        return []
    dtype = groups[0][0].dtype
    edges_v, h = _kde_inputs(groups[0][0], groups[0][1], edges, bandwidth)
    for values, weights in groups[1:]:
        _kde_inputs(values, weights, edges, 0.0)
        if values.dtype != dtype or values.device != groups[0][0].device:
            raise ValueError(
                f"all values must have one dtype and device, got {dtype} and {values.dtype}"
            )
    n_bins = edges.numel() - 1
    if reach is None:
        reach = kde_reach(edges_v, h, dtype)
    elif not (isinstance(reach, int) and reach >= 1):
        raise ValueError(f"reach must be an integer >= 1, got {reach!r}")
    reach = min(reach, n_bins + 1)  # K = B + 1 already covers every edge from any bin
    rows = [weights if weights.ndim == 2 else weights[None] for _, weights in groups]
    factors = [None] * len(groups) if factors is None else list(factors)
    if len(factors) != len(groups):
        raise ValueError(f"one factor (or None) per group, got {len(factors)} for {len(groups)}")
    for (values, _), factor in zip(groups, factors, strict=True):
        if factor is not None and (factor.shape != values.shape or factor.dtype != dtype):
            raise ValueError(
                f"a factor must have the shape and dtype of its values {tuple(values.shape)} "
                f"{dtype}, got {tuple(factor.shape)} {factor.dtype}"
            )
    n_events = sum(values.numel() for values, _ in groups)
    fits = 2 * reach * n_events * groups[0][0].element_size() <= _KDE_SAVE_BYTES
    save_kernels = (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in [*rows, *factors])
        and fits
    )
    squared = tuple(w.shape[0] for w in rows) if sumw2_rows is None else tuple(sumw2_rows)
    if len(squared) != len(groups) or not all(
        isinstance(n, int) and 0 <= n <= w.shape[0] for n, w in zip(squared, rows, strict=False)
    ):
        raise ValueError(
            f"sumw2_rows must give one count per group, from 0 to its weight rows "
            f"{[w.shape[0] for w in rows]}, got {list(squared)}"
        )
    if layout is not None:
        layout.check(groups, rows, squared, reach, fits)
    yields, sumw2 = _KDEHistogram.apply(
        edges_v,
        h,
        reach,
        KDE_TAIL_CUTOFF[dtype],
        save_kernels,
        ascending,
        layout,
        squared,
        *[values for values, _ in groups],
        *rows,
        *factors,
    )
    out, start, start_squared = [], 0, 0
    for (_, weights), w, n_squared in zip(groups, rows, squared, strict=True):
        n_yields = yields[start : start + w.shape[0]].to(weights.dtype)
        n_sumw2 = sumw2[start_squared : start_squared + n_squared].to(weights.dtype)
        start, start_squared = start + w.shape[0], start_squared + n_squared
        if weights.ndim == 1:
            n_yields = n_yields[0]
            out.append(Histogram(edges, n_yields, n_sumw2[0] if n_squared else None))
        else:
            out.append(Histogram(edges, n_yields, n_sumw2))
    return out


class KDELayout:
    """What :func:`kde_histograms` computes from the events' values, the edges and the bandwidth
    alone, kept for the next call with the same ones and other weights.

    That is the window constants, the chunks and the sorted plan (:class:`_KDEHistogram`) and,
    when they fit in ``_KDE_SAVE_BYTES``, the kernel values (``erfc`` at the window edges of
    every event). The binned KDE is linear in the weights (``n_b = sum_i w_i m_ib``) and its
    masses ``m_ib`` depend on the values, the edges and ``h`` only, so with a filled layout a
    call evaluates no kernel, forward or backward, and gives bitwise the sums of a call
    without it. The steps of an optimization at a fixed bandwidth are such calls: only the
    selection weights change (:class:`~analysis.pipeline.AnalysisPipeline` keeps one layout per
    region and bandwidth).

    Create it empty and pass it to every call; the first call fills it. Like ``reach`` and
    ``ascending``, the layout is trusted: the caller passes the same values, edges and ``h`` as
    to the first call (other ones give wrong sums); the number of sets, their sizes, the rows of
    their weights, the dtype, the device and ``K`` are checked (``ValueError``).
    """

    def __init__(self) -> None:
        self._signature: tuple | None = None
        self._state: tuple | None = None  # (window, groups, plan, kernels or None)
        self.keep_kernels = False  # set by the first call: whether they fit

    def check(
        self,
        groups: Sequence[tuple[torch.Tensor, torch.Tensor]],
        rows: Sequence[torch.Tensor],
        squared: Sequence[int],
        reach: int,
        keep_kernels: bool,
    ) -> None:
        """Raise ``ValueError`` unless the call matches the first one; record it if first."""
        values = groups[0][0]
        signature = (
            tuple(
                (v.shape[0], w.shape[0], s)
                for (v, _), w, s in zip(groups, rows, squared, strict=True)
            ),
            values.dtype,
            values.device,
            reach,
        )
        if self._signature is None:
            self._signature, self.keep_kernels = signature, keep_kernels
        elif signature != self._signature:
            raise ValueError(
                "this KDELayout was filled for other events (sets (events, weight rows, "
                "sumw2 rows), dtype, "
                f"device, reach): {self._signature}, got {signature}"
            )

    @property
    def filled(self) -> bool:
        """Whether a call has filled the layout."""
        return self._state is not None


def _kde_inputs(
    values: torch.Tensor,
    weights: torch.Tensor,
    edges: torch.Tensor,
    bandwidth: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and dtypes; return ``edges`` and ``h`` in the dtype of ``values``."""
    if values.dtype not in KDE_TAIL_CUTOFF:
        raise TypeError(f"values must be float32 or float64, got {values.dtype}")
    if values.ndim != 1 or weights.ndim not in (1, 2) or weights.shape[-1:] != values.shape:
        raise ValueError(
            f"values must be 1-D and weights (N,) or (W, N) with the same length N, got shapes "
            f"{tuple(values.shape)} and {tuple(weights.shape)}"
        )
    if edges.ndim != 1 or edges.numel() < 2:
        raise ValueError(f"edges must be 1-D with at least 2 entries, got {tuple(edges.shape)}")
    if isinstance(bandwidth, torch.Tensor):
        if bandwidth.numel() != 1:
            raise ValueError(f"bandwidth must be a scalar, got shape {tuple(bandwidth.shape)}")
        h = bandwidth.reshape(()).to(values.dtype)
    else:
        if not 0 <= bandwidth < float("inf"):
            raise ValueError(f"bandwidth must be finite and >= 0, got {bandwidth!r}")
        h = torch.tensor(float(bandwidth), dtype=values.dtype, device=values.device)
    return edges.to(values.dtype), h


def _kde_chunk_size(values: torch.Tensor, reach: int, n_rows: int) -> int:
    elements = _KDE_CHUNK_ELEMENTS.get(values.device.type, _KDE_CHUNK_ELEMENTS_DEFAULT)
    return max(1, elements // (2 * reach * n_rows))


class _KDEWindow:
    """Per-call constants of :class:`_KDEHistogram` and the kernel of one chunk of events.

    Layout: the edges are padded with ``K`` edges at ``-inf`` and ``K`` at ``+inf``, so the window
    of an event in bin ``j - 1`` (``edges[j-1] <= y < edges[j]``, ``j`` from ``bucketize``) is
    padded edges ``j + r``, ``r = 0 .. 2K-1``, with no clamping; its bins are padded bins
    ``j + r``, ``r = 0 .. 2K-2`` (real bin ``b`` is padded bin ``b + K``; the others are dropped).
    Arrays are ``(2K, C)`` (window position, event) so rows are contiguous. Window edge ``r`` lies
    left of the event for ``r < K`` and right of it for ``r >= K``, so
    ``Phi(z_r) = step_r + tail_r`` with ``step_r = 1[r >= K]`` and ``tail_r = +-(Q(u_r) - Q(k))``
    (``+`` left, ``-`` right), ``u_r = min(|z_r|, k)``, ``Q(u) = erfc(u / sqrt2) / 2``: tails are
    continuous and exactly 0 beyond ``k`` (the truncation), and the step puts one unit into
    window bin ``K - 1``, the event's own bin. With ``E_r = erfc(u_r / sqrt2)`` and
    ``E_k = erfc(k / sqrt2)`` the window masses are therefore

        m_r = (E_{r+1} - E_r) / 2                      r < K - 1  (both edges left),
        m_r = 1 - ((E_K - E_k) + (E_{K-1} - E_k)) / 2  r = K - 1  (the event's bin),
        m_r = (E_r - E_{r+1}) / 2                      r > K - 1  (both edges right):

    differences of ``Q`` (accurate far from the event, exactly 0 where both edges are beyond
    ``k``) and exactly 1 in the event's bin when ``h = 0``. ``h = 0`` makes every ``u = k``
    (hard histogram); NaN values also get ``u = k`` and their unit lands in a dropped bin.

    ``x_r = u_r / sqrt2 = min((e_r - y) s_r, k / sqrt2)`` with the signed scale
    ``s_r = -+1 / (sqrt2 h)`` (``-`` left, ``+`` right; ``e_r - y`` has the opposite sign, so
    ``x_r = |e_r - y| / (sqrt2 h)`` exactly, with no ``abs``); NaN becomes ``k / sqrt2``.
    """

    def __init__(
        self, edges: torch.Tensor, h: torch.Tensor, reach: int, cutoff: float, n_bins: int
    ) -> None:
        dtype, device = edges.dtype, edges.device
        self.reach, self.edges, self.n_bins = reach, edges, n_bins
        infinity = torch.full((reach,), torch.inf, dtype=dtype, device=device)
        self.padded = torch.cat([-infinity, edges, infinity])
        self.padded_col = self.padded[:, None]
        # sign of z = (e - y) / h per window row; m_r = half_r (E_{r+1} - E_r) off the own bin
        self.signs = [-1.0] * reach + [1.0] * reach
        side = torch.tensor(self.signs, dtype=dtype, device=device)[:, None]
        # x = |z| / sqrt2; h below the smallest normal number counts as 0 (x = inf, then k)
        self.normal_h = h >= torch.finfo(dtype).tiny
        self.signed_scale = side * torch.where(self.normal_h, _SQRT_HALF / h, torch.inf)
        self.x_max = cutoff * _SQRT_HALF
        # erfc(x_max) as the vectorised kernel computes it (clamped entries then give exactly
        # 0), kept on the device (no synchronisation)
        self.erfc_max = torch.special.erfc(
            torch.full((64,), self.x_max, dtype=dtype, device=device)
        )[0]

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """``0 .. 2K-1`` as a column (int32), for gathering the window edges of events."""
        return torch.arange(2 * self.reach, dtype=torch.int32, device=self.edges.device)[:, None]

    @functools.cached_property
    def one(self) -> torch.Tensor:
        """``1`` as a 0-d tensor in the dtype of the edges (for ``1 - erf`` in one operation)."""
        return torch.ones((), dtype=self.edges.dtype, device=self.edges.device)

    @functools.cached_property
    def half(self) -> torch.Tensor:
        """``half_r = -side_{r+1} / 2`` ``(2K-1, 1)`` in float64: ``+1/2`` left, ``-1/2`` right."""
        half = [-0.5 * s for s in self.signs[1:]]
        return torch.tensor(half, dtype=torch.float64, device=self.edges.device)[:, None]

    @functools.cached_property
    def exp_max(self) -> torch.Tensor:
        """``exp(-x_max^2)`` as the vectorised kernel computes it (the truncated density)."""
        at_max = torch.full((64,), self.x_max, dtype=self.edges.dtype, device=self.edges.device)
        return torch.exp(-(at_max * at_max))[0]

    @functools.cached_property
    def window_index(self) -> torch.Tensor:
        """``j + r`` for (window row ``r``, event bin ``j``), flattened ``((2K-1)(B+2),)``: the
        padded bin of window bin ``r`` of an event in bin ``j`` (:func:`_window_sums`)."""
        device = self.edges.device
        bins = torch.arange(self.n_bins + 2, device=device)
        return (torch.arange(2 * self.reach - 1, device=device)[:, None] + bins).reshape(-1)

    def x(
        self,
        y: torch.Tensor,
        j: int | None,
        bin_of: torch.Tensor | None,
        rows: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x = min(|e - y| / (sqrt2 h), k / sqrt2)`` ``(R, C)`` at the window edges ``rows``
        (``[r0, r1)``, default all ``2K``) of the events ``y``, and the padded edge indices
        ``(R, C)`` (``None`` when all events are in one bin): all events in bin ``j`` (padded
        edges ``j + r``), or each in its ``bin_of``. NaN (NaN values, ``inf - inf``, ``0 * inf``
        for ``h = 0``) becomes ``k / sqrt2``."""
        r0, r1 = (0, 2 * self.reach) if rows is None else rows
        if j is not None:
            index, edge = None, self.padded_col[j + r0 : j + r1]
        else:
            index = self.rows[r0:r1] + cast(torch.Tensor, bin_of)[None, :]  # given if j is None
            edge = self.padded.index_select(0, index.reshape(-1)).view(index.shape)
        x = torch.sub(edge, y).mul_(self.signed_scale[r0:r1])
        return torch.nan_to_num_(x, nan=self.x_max).clamp_max_(self.x_max), index

    def mass(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel mass ``(2K-1, C)`` of the window bins (class docstring) from ``x (2K, C)``."""
        erfc = torch.special.erfc(x)
        mass = torch.sub(erfc[1:], erfc[:-1]).mul_(self.half.to(erfc.dtype))
        k = self.reach
        own = (erfc[k] - self.erfc_max).add_(erfc[k - 1] - self.erfc_max)
        mass[k - 1] = own.mul_(-0.5).add_(1.0)
        return mass

    def active_rows(self, values: torch.Tensor, segments: np.ndarray) -> tuple[np.ndarray, ...]:
        """For segments ``(j, start, stop)`` (rows of an int array) of sorted values on CPU
        (events ``start .. stop-1``, all in bin ``j``), the window rows ``r0 .. r1-1`` where
        ``x < k / sqrt2`` for some event of the segment, and within them the rows
        ``e0 .. e1-1`` where ``x <= _KDE_ERF_MAX`` for every event: arrays ``r0, r1, e0, e1``.

        The event nearest to a left edge is the segment's first one, to a right edge its last
        (and the farthest the other way round), and ``x`` is monotonic in ``y`` (also after
        rounding), so ``x`` of those two events decides each row; the rows selected are
        contiguous around the event's bin (rows ``K-1``, ``K``), as ``x`` grows with the
        distance of the edge. Computed with numpy on the host, with the operations of
        :meth:`x` in the same dtype (IEEE arithmetic: the same numbers).
        """
        k = self.reach
        y = values.detach().numpy()
        padded = self.padded.detach().numpy()
        signed = self.signed_scale.detach().reshape(-1).numpy()
        edge = padded[segments[:, :1] + np.arange(2 * k)]  # (S, 2K)
        left = np.arange(2 * k) < k
        first, last = y[segments[:, 1:2]], y[segments[:, 2:] - 1]
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, as in x(): not near
            near = (edge - np.where(left, first, last)) * signed
            near = near < np.asarray(self.x_max, dtype=padded.dtype)
            erf = (edge - np.where(left, last, first)) * signed <= _KDE_ERF_MAX
        r0, r1 = k - near[:, :k].sum(1), k + near[:, k:].sum(1)
        return r0, r1, k - erf[:, :k].sum(1), k + erf[:, k:].sum(1)

    def erfc_rows(self, y: torch.Tensor, bin_j: int | None, rows: tuple[int, ...]) -> torch.Tensor:
        """``[E_r0; ...; E_{r1-1}; 1]`` ``(r1 - r0 + 1, C)`` of sorted events ``y``: ``erfc`` at
        the window edges ``rows = (r0, r1, e0, e1)`` (``1 - erf`` at ``e0 .. e1-1``, see
        ``_KDE_ERF_MAX``) and a row of ones (for the sum of the weights, see
        :class:`_KDEHistogram`). All events in bin ``bin_j`` (the rows are reached, so no NaN
        can arise), or, for ``bin_j`` None, each in its own (``bucketize``)."""
        r0, r1, e0, e1 = rows
        out = y.new_empty((r1 - r0 + 1, y.shape[0]))
        out[-1].fill_(1.0)
        if r1 == r0:
            return out
        tail = out[:-1]
        a, b = e0 - r0, e1 - r0
        if bin_j is None:
            bins = torch.bucketize(y, self.edges, out_int32=True, right=True)
            x = self.x(y, None, bins, (r0, r1))[0]
        else:  # x() for one bin, inlined and written into the output (the kernel is computed
            # in place): no NaN can arise, and at the rows e0 .. e1-1 every event has
            # x <= _KDE_ERF_MAX < k / sqrt2 (active_rows), so only the others need the clamp
            edge = self.padded_col[bin_j + r0 : bin_j + r1]
            x = torch.sub(edge, y, out=tail).mul_(self.signed_scale[r0:r1])
            if a > 0:
                x[:a].clamp_max_(self.x_max)
            if r1 - r0 > b:
                x[b:].clamp_max_(self.x_max)
        if a > 0:
            torch.special.erfc(x[:a], out=tail[:a])
        if b > a:
            erf = torch.special.erf(x[a:b], out=tail[a:b])
            torch.sub(self.one, erf, out=erf)  # 1 - erf, bitwise (-erf) + 1, in one pass
        if r1 - r0 > b:
            torch.special.erfc(x[b:], out=tail[b:])
        return out


def _window_sums(sums: torch.Tensor, window: _KDEWindow) -> torch.Tensor:
    """Bin sums ``(R, B)`` from sums ``S (R, 2K-1, B+2)`` per (window row ``r``, event bin
    ``j``): window bin ``r`` of an event in bin ``j`` is real bin ``j + r - K``, so
    ``n_b = sum_r S[r, b + K - r]`` (one ``index_add_``; the dropped bins are cut off)."""
    k, n_bins = window.reach, window.n_bins
    out = sums.new_zeros((sums.shape[0], n_bins + 2 * k))
    out.index_add_(1, window.window_index, sums.reshape(sums.shape[0], -1))
    return out[:, k : k + n_bins]


def _window_table(grad: torch.Tensor, window: _KDEWindow) -> torch.Tensor:
    """Upstream gradient per (window row ``r``, event bin ``j``), ``(R, 2K-1, B+2)``:
    ``T[r, j] = grad[j + r - K]``, 0 where that is not a real bin (the transpose of
    :func:`_window_sums`)."""
    k = window.reach
    padded = torch.nn.functional.pad(grad.to(torch.float64), (k, k))  # (R, B + 2K)
    return padded.index_select(1, window.window_index).view(grad.shape[0], 2 * k - 1, -1)


def _bin_bounds(
    values: torch.Tensor, edges: torch.Tensor, ascending: bool | None = None
) -> list[int] | None:
    """On CPU, for values sorted ascending, the first event of every bin: events ``bounds[j]``
    to ``bounds[j+1]`` lie in bin ``j`` (``j = 0 .. B+1`` as from ``bucketize(right=True)``);
    ``None`` for unsorted values and on other devices (where per-bin chunks would multiply
    kernel launches, and the scatter of the generic path is atomic).

    ``bounds = [0, searchsorted(values, edges), N]`` (the events below ``e_b`` are the
    ``#(y < e_b)`` first ones; the comparisons of ``bucketize``), read on the host. NaN values
    are not sorted (every comparison with NaN is false). ``ascending`` (of
    :func:`kde_histograms`): ``None`` checks the order, ``True`` takes it as given, ``False``
    takes the values as unsorted.
    """
    if values.device.type != "cpu" or ascending is False:
        return None
    if ascending is None and values.shape[0] > 1 and not bool(torch.all(values[1:] >= values[:-1])):
        return None
    return [0, *torch.searchsorted(values, edges).tolist(), values.shape[0]]


def _chunks(n: int, size: int, bounds: list[int] | None) -> list[tuple[slice, list | None]]:
    """``(slice, segments)``: chunks of at most ``size`` events (or one small bin), in order.

    Unsorted values (``bounds`` None): ``segments`` is None. Sorted values: ``segments`` lists
    ``(j, start, stop)``, the events ``start .. stop-1`` of the chunk in bin ``j``. A bin with
    at least ``_KDE_MIN_BIN_EVENTS`` events is cut into chunks of its own (one segment: same
    window edges for all events); consecutive smaller bins are collected into chunks of several
    segments (one kernel evaluation for all of them; a chunk per bin would cost more in
    per-call overhead than it saves).
    """
    if bounds is None:
        return [(slice(start, min(start + size, n)), None) for start in range(0, n, size)]
    chunks: list[tuple[slice, list | None]] = []
    run: list[tuple[int, int, int]] = []  # the segments of the chunk of small bins being filled

    def close_run() -> None:
        if run:
            chunks.append((slice(run[0][1], run[-1][2]), run.copy()))
            run.clear()

    for j in range(len(bounds) - 1):
        a, b = bounds[j], bounds[j + 1]
        if b - a >= _KDE_MIN_BIN_EVENTS:
            close_run()
            for start in range(a, b, size):
                stop = min(start + size, b)
                chunks.append((slice(start, stop), [(j, start, stop)]))
            continue
        for start in range(a, b, size):
            stop = min(start + size, b)
            if run and stop - run[0][1] > size:
                close_run()
            run.append((j, start, stop))
    close_run()
    return chunks


def _single_bin(segments: list[tuple[int, int, int]]) -> int | None:
    """The bin of a chunk of sorted events that lie in one bin, else None."""
    return segments[0][0] if len(segments) == 1 else None


class _Group:
    """The bookkeeping of one set of events of :class:`_KDEHistogram` (values ``(N,)``,
    weights ``(W, N)``, the sums of squares of the first ``S`` rows wanted): its weight rows
    ``row .. row+W-1`` among the ``R`` of all groups (the stacked sums hold every group's
    yields, then the sums of squares, ``squared_row ..``: ``rows``, ``W + S`` of them), its
    chunks (:func:`_chunks`) and, for unsorted values, the events' bins ``bin_of``."""

    def __init__(
        self,
        values: torch.Tensor,
        n_rows: int,
        n_squared: int,
        row: int,
        squared_row: int,
        window: _KDEWindow,
        ascending: bool | None,
    ) -> None:
        self.row, self.n_rows, self.n_squared = row, n_rows, n_squared
        # its rows of the stacked sums: yields, then (after all groups' yields) sums of squares
        self.rows = list(range(row, row + n_rows)) + list(
            range(squared_row, squared_row + n_squared)
        )
        self.rows_index = torch.tensor(self.rows, device=values.device)
        bounds = _bin_bounds(values, window.edges, ascending)
        # sorted chunks hold (2K, C) arrays, unsorted ones also (W + S, 2K-1, C)
        size = _kde_chunk_size(values, window.reach, n_rows if bounds is None else 1)
        self.chunks = _chunks(values.shape[0], size, bounds)
        # sorted values: the events of every segment, in order (they cover all events)
        self.segment_lengths = [
            stop - start for _, segs in self.chunks for _, start, stop in (segs or ())
        ]
        self.bin_of = (
            None
            if bounds is not None
            else torch.bucketize(values, window.edges, out_int32=True, right=True)
        )


class _KDEHistogram(torch.autograd.Function):
    """``(yields, sumw2)`` of shape ``(R, B)`` in float64 of :func:`kde_histograms` for groups of
    events with weights ``(W_g, N_g)``, ``R = sum_g W_g``, with an analytic backward.

    The weights of a group enter as ``b = [w; w_{:S}^2]`` ``(W + S, N)`` (yields and sums of
    squares in one go; ``S``: the rows whose sums of squares are wanted, ``squared``).

    Unsorted values (the generic path, also on CUDA): the window masses ``m (2K-1, C)`` of a
    chunk of events times ``b`` are summed per (window row ``r``, event bin ``j``) by
    ``index_add_`` (``bucketize`` gives the bins).

    Values sorted ascending, on CPU (the pipeline sorts its events by the observable): the
    events of a bin are contiguous, so they are summed per bin by matrix products (a scatter
    of sorted events would serialise on repeated additions to the same bins), and ``erfc`` is
    evaluated only at the window edges ``s`` that some event of the bin (segment) reaches,
    ``[r0, r1)`` (:meth:`_KDEWindow.active_rows`; with ``h = 0.36`` bin widths 6 of the 8, and
    none for ``h = 0``); elsewhere ``E_s = E_k``. With the tails ``T_s = E_s - E_k`` (exactly 0
    at the edges not reached) the masses of :class:`_KDEWindow` are linear in ``T``,

        m_r = half_r (T_{r+1} - T_r) + 1[r = K-1] (1 - T_{K-1}),   half_r = +1/2 (r < K-1),
                                                                          -1/2 (r >= K-1),

    so a segment needs only ``sum_i E_s(i) b_i`` and ``sum_i b_i``: one matrix product
    ``[E_r0; ...; E_{r1-1}; 1] (R+1, C) @ b^T (C, W+S)`` (:meth:`_KDEWindow.erfc_rows`; a chunk
    of several small bins evaluates the union of their rows once, with gathered edges, and
    takes one product per bin), with no per-event masses. After the loop
    (:class:`_SortedPlan`, all groups at once), per bin, ``V_s = sum (E_s - E_k) b`` over the
    segments that reach ``s`` and the mass sums
    ``half_r (V_{r+1} - V_r) + 1[r = K-1] (sum b - V_{K-1})`` (a bin that nothing reaches gets
    exactly 0, the own bin exactly ``sum b``, so ``h = 0`` is the hard histogram).

    The backward pass uses ``dn_vb/dw_vi = m_ib``, ``ds_vb/dw_vi = 2 w_vi m_ib``, i.e. per event
    ``sum_r (g_r + 2 w_i g'_r) m_r(i)`` for the upstream gradients ``g`` (yields) and ``g'``
    (sumw2) of its window bins, from the kernel values the forward pass kept (one tensor per
    chunk) or recomputed. Unsorted chunks: the masses times the gathered ``g``. Sorted chunks:
    by the linearity above, ``sum_r g_r m_r = g_{K-1} + sum_s c_s T_s`` with
    ``c_s = half_{s-1} g_{s-1} - half_s g_s - 1[s = K-1] g_{K-1}``, i.e.
    ``[c_r0 .. c_{r1-1}, g_{K-1} - E_k sum_s c_s] @ [E; 1]``, again one product per segment (the
    coefficients of all segments are gathered at once). The other inputs' gradients recompute
    each chunk's whole window (:func:`_input_gradients`).

    Inputs: ``edges, h, reach, cutoff, save_kernels, ascending, layout`` (a
    :class:`KDELayout` or None), ``squared`` (per group ``S``), then the ``G`` groups' values,
    their weights and their factors (None or ``(N,)``: the weights of the sums are
    ``weights * factor``). Outputs: the yields ``(R, B)`` and the sums of squares
    ``(sum_g S_g, B)``.
    """

    @staticmethod
    def forward(ctx, edges, h, reach, cutoff, save_kernels, ascending, layout, squared, *tensors):
        n_groups = len(tensors) // 3
        all_values, all_weights = tensors[:n_groups], tensors[n_groups : 2 * n_groups]
        all_factors = tensors[2 * n_groups :]
        n_bins, f64, device = edges.numel() - 1, torch.float64, edges.device
        n_rows = sum(weights.shape[0] for weights in all_weights)
        kept = None  # the kernel values of a filled layout, per group and chunk
        if layout is not None and layout.filled:
            window, groups, plan, kept = layout._state
        else:
            window = _KDEWindow(edges, h, reach, cutoff, n_bins)
            groups, row, squared_row = [], 0, n_rows
            for values, weights, n_squared in zip(all_values, all_weights, squared, strict=True):
                groups.append(
                    _Group(values, weights.shape[0], n_squared, row, squared_row, window, ascending)
                )
                row, squared_row = row + weights.shape[0], squared_row + n_squared
            plan = _SortedPlan(window, groups, all_values, squared_row)
        keep = kept is None and (save_kernels or (layout is not None and layout.keep_kernels))
        # mass sums per (yields | sumw2 row, window row r, event bin j)
        sums = torch.zeros(plan.n_sums, 2 * reach - 1, n_bins + 2, dtype=f64, device=device)
        kernels: list[list[torch.Tensor]] = []  # computed here and kept (keep), per group
        products = []  # sorted chunks: [E; 1] @ b^T per segment, all groups, flattened
        products_w = []  # w = weights * factor per group (the weights without a factor)
        for g, (group, values, weights, factor, chunk_rows) in enumerate(
            zip(groups, all_values, all_weights, all_factors, plan.chunk_rows, strict=True)
        ):
            kernels.append([])
            w, s = group.n_rows, group.n_squared
            both = weights.new_empty((w + s, weights.shape[1]), dtype=f64)  # b (W + S, N)
            if factor is None:
                both[:w] = weights
            else:
                torch.mul(weights, factor, out=both[:w])
            torch.mul(both[:s], both[:s], out=both[w:])
            products_w.append(weights if factor is None else both[:w])
            both_t = both.t()
            group_sums = None  # unsorted chunks
            group_products = []
            # sorted values: per segment (C, W+S), one call (not one per bin)
            pieces = iter(
                both_t.split_with_sizes(group.segment_lengths) if group.segment_lengths else ()
            )
            for c, ((sl, segments), rows) in enumerate(zip(group.chunks, chunk_rows, strict=True)):
                if segments is None:
                    bins = group.bin_of[sl]
                    if kept is not None:
                        kernel = kept[g][c]
                    else:
                        kernel = window.mass(window.x(values[sl], None, bins)[0])
                    if group_sums is None:
                        group_sums = torch.zeros_like(sums[: w + s])
                    # index_add_ along a non-leading dim is slow with int32 indices
                    group_sums.index_add_(2, bins.long(), kernel.to(f64)[None] * both[:, None, sl])
                else:
                    if kept is not None:
                        kernel = kept[g][c]
                    else:
                        kernel = window.erfc_rows(values[sl], _single_bin(segments), rows)
                    kernel64 = kernel if kernel.dtype == f64 else kernel.to(f64)
                    if len(segments) == 1:
                        group_products.append(torch.mm(kernel64, next(pieces)))
                    else:
                        lengths = [stop - start for _, start, stop in segments]
                        for local in kernel64.split_with_sizes(lengths, dim=1):
                            group_products.append(torch.mm(local, next(pieces)))
                if keep:
                    kernels[g].append(kernel)
            if group_sums is not None:
                sums.index_add_(0, group.rows_index, group_sums)
            if group_products:
                products.append(torch.cat(group_products).view(-1))
        if products:
            sums += plan.mass_sums(torch.cat(products), window)
        if layout is not None and not layout.filled:
            layout._state = (window, groups, plan, kernels if layout.keep_kernels else None)
        if kept is None and keep:
            kept = kernels
        ctx.save_for_backward(edges, h, *tensors)
        ctx.products_w = products_w
        ctx.window, ctx.groups, ctx.plan = window, groups, plan
        ctx.kernels = kept if (save_kernels or layout is not None) else None
        out = _window_sums(sums, window)
        return out[:n_rows], out[n_rows:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_yields, grad_sumw2):
        edges, h, *tensors = ctx.saved_tensors
        window, plan, groups = ctx.window, ctx.plan, ctx.groups
        n_groups, n_rows = len(groups), grad_yields.shape[0]
        all_values, all_weights = tensors[:n_groups], tensors[n_groups : 2 * n_groups]
        all_factors = tensors[2 * n_groups :]
        need_e, need_h = ctx.needs_input_grad[:2]
        first = 8  # the position of the first tensor among forward's inputs
        need_y = ctx.needs_input_grad[first : first + n_groups]
        need_w = ctx.needs_input_grad[first + n_groups : first + 2 * n_groups]
        need_f = ctx.needs_input_grad[first + 2 * n_groups :]
        f64, device = torch.float64, edges.device
        # upstream gradient per (yields | sumw2 row, window row r, event bin j)
        g_table = _window_table(torch.cat([grad_yields, grad_sumw2]), window)
        # the same with the sumw2 rows doubled (d(w^2)/dw = 2 w): dL/dw = p[:W] + w p[W:] for
        # the products p (W + S, N) of the kernel and this table (p[W:] of the first S rows)
        g2_table = torch.cat([g_table[:n_rows], 2.0 * g_table[n_rows:]])
        coefficients = (
            plan.coefficients(g2_table, window)
            if (any(need_w) or any(need_f)) and plan.n_products
            else None
        )
        grads_y: list[torch.Tensor | None] = [None] * n_groups
        grads_w: list[torch.Tensor | None] = [None] * n_groups
        grads_f: list[torch.Tensor | None] = [None] * n_groups
        n_padded = window.n_bins + 1 + 2 * window.reach
        grad_e = torch.zeros(n_padded, dtype=f64, device=device)
        grad_h = torch.zeros((), dtype=f64, device=device)
        for i, (group, values, weights, factor, w, chunk_rows) in enumerate(
            zip(
                groups,
                all_values,
                all_weights,
                all_factors,
                ctx.products_w,
                plan.chunk_rows,
                strict=True,
            )
        ):
            group_kernels = ctx.kernels[i] if ctx.kernels is not None else None
            rows = group.rows_index
            if need_w[i] or need_f[i]:
                grad = _weight_gradient(  # dL/dw of the products w = weights * factor
                    window,
                    plan,
                    i,
                    group,
                    values,
                    w,
                    chunk_rows,
                    group_kernels,
                    g2_table.index_select(0, rows),
                    coefficients,
                )
                if need_f[i]:  # sum_v weights_v dL/dw_v, row by row (faster than a sum(0))
                    grad_f = grad[0] * weights[0]
                    for v in range(1, grad.shape[0]):
                        grad_f.addcmul_(grad[v], weights[v])
                    grads_f[i] = grad_f.to(factor.dtype)
                if need_w[i]:
                    grads_w[i] = (grad if factor is None else grad * factor).to(weights.dtype)
            if need_y[i] or need_e or need_h:
                grads_y[i] = _input_gradients(
                    window,
                    group,
                    values,
                    w,
                    g_table.index_select(0, rows),
                    need_y[i],
                    grad_e if need_e else None,
                    grad_h if need_h else None,
                )
        density = torch.where(window.normal_h, _INV_SQRT_2PI / h, 0.0).to(f64)  # 0 for h = 0
        grads_y = [
            None if g is None else (g * -density).to(v.dtype)
            for g, v in zip(grads_y, all_values, strict=True)
        ]
        grad_e_out = (
            (grad_e[window.reach : window.reach + window.n_bins + 1] * density).to(edges.dtype)
            if need_e
            else None
        )
        grad_h_out = (grad_h * density).to(h.dtype) if need_h else None
        return (
            grad_e_out,
            grad_h_out,
            *[None] * (first - 2),
            *grads_y,
            *grads_w,
            *grads_f,
        )


def _weight_gradient(
    window: _KDEWindow,
    plan: _SortedPlan,
    index: int,
    group: _Group,
    values: torch.Tensor,
    weights: torch.Tensor,
    chunk_rows: list,
    kernels: list[torch.Tensor] | None,
    g2: torch.Tensor,
    coefficients: torch.Tensor | None,
) -> torch.Tensor:
    """``dL/dw (W, N)`` of group ``index`` of :class:`_KDEHistogram` (its class docstring):
    ``p[:W] + w p[W:]`` (in its first ``S`` rows) with ``p (W + S, N)`` the products of the
    kernel values (kept or recomputed) and the upstream gradient ``g2`` (the group's rows,
    sumw2 doubled)."""
    f64 = torch.float64
    w, s = group.n_rows, group.n_squared
    p = torch.empty(w + s, values.shape[0], dtype=f64, device=values.device)
    coefficients_t = torch.empty(0)  # [c; const] of the group's sorted segments, (W+S, rows)
    if plan.offsets[index][-1]:
        coefficients_t = plan.group_coefficients(cast(torch.Tensor, coefficients), index)
    # sorted: per segment its coefficients and its columns of p (one call each, not per bin)
    segment_coefficients: Iterator[torch.Tensor] = iter(())
    segment_p: Iterator[torch.Tensor] = iter(())
    if group.segment_lengths:
        segment_coefficients = iter(coefficients_t.split_with_sizes(plan.heights[index], dim=1))
        segment_p = iter(p.split_with_sizes(group.segment_lengths, dim=1))
    for k, ((sl, segments), rows) in enumerate(zip(group.chunks, chunk_rows, strict=True)):
        bin_of = cast(torch.Tensor, group.bin_of)  # given for unsorted chunks
        if kernels is not None:
            kernel = kernels[k]
        elif segments is None:
            kernel = window.mass(window.x(values[sl], None, bin_of[sl])[0])
        else:
            kernel = window.erfc_rows(values[sl], _single_bin(segments), rows)
        kernel = kernel if kernel.dtype == f64 else kernel.to(f64)
        if segments is None:  # sum_r g_r m_r per event
            bins = bin_of[sl].long().expand(g2.shape[:2] + (-1,))
            out = p.narrow(1, sl.start, sl.stop - sl.start)
            torch.sum(torch.gather(g2, 2, bins).mul_(kernel), 1, out=out)
            continue
        locals_: Sequence[torch.Tensor] = (kernel,)  # [c; const] @ [E; 1] per segment
        if len(segments) > 1:
            locals_ = kernel.split_with_sizes([stop - start for _, start, stop in segments], dim=1)
        for local in locals_:
            torch.mm(next(segment_coefficients), local, out=next(segment_p))
    p[:s].addcmul_(p[w:], weights[:s])
    return p[:w].to(weights.dtype)


def _input_gradients(
    window: _KDEWindow,
    group: _Group,
    values: torch.Tensor,
    weights: torch.Tensor,
    g_table: torch.Tensor,
    need_y: bool,
    grad_e: torch.Tensor | None,
    grad_h: torch.Tensor | None,
) -> torch.Tensor | None:
    """The gradient with respect to the values ``(N,)`` (if ``need_y``), and accumulated into
    ``grad_e`` (padded edges) and ``grad_h``, all still to be multiplied by the density
    ``1 / (sqrt(2 pi) h)``: each chunk's whole window recomputed, ``dPhi/dy = -phi/h``,
    ``dPhi/de = phi/h``, ``dPhi/dh = -z phi/h`` with the truncated density ``phi(u) - phi(k)``
    for ``u < k`` (0 beyond), continuous like the forward kernel. ``g_table (W+S, 2K-1, B+2)``:
    the group's rows of the upstream gradient (yields, then sums of squares)."""
    f64, reach, n_squared = torch.float64, window.reach, group.n_squared
    grad_y = torch.empty(values.shape, dtype=f64, device=values.device) if need_y else None
    z_side = torch.tensor(window.signs, dtype=f64, device=values.device)[:, None] * 2.0**0.5
    for sl, segments in group.chunks:
        w = weights[:, sl].to(f64)
        j = None if segments is None else _single_bin(segments)
        bins = None  # each event's bin, where the chunk is not one bin j
        if j is None and group.bin_of is not None:
            bins = group.bin_of[sl]
        elif j is None:
            bins = torch.bucketize(values[sl], window.edges, out_int32=True, right=True)
        x, index = window.x(values[sl], j, bins)
        j_bin = cast(int, j)  # used where j is not None
        # d loss / d m_r = sum_v g_n[v, r] w_v + sum_{v < S} g_s[v, r] w_v^2, (2K-1, C)
        both = torch.cat([w, w[:n_squared] * w[:n_squared]])  # b (W + S, C)
        if j is None:
            index_j = cast(torch.Tensor, bins).long().expand(g_table.shape[:2] + (-1,))
            gm = torch.sum(torch.gather(g_table, 2, index_j).mul_(both[:, None, :]), 0)
        else:
            gm = g_table[:, :, j].T @ both
        # window edge r is the upper edge of bin r-1 and the lower edge of bin r:
        # d loss / d Phi_r = g_{r-1} - g_r
        dg = torch.nn.functional.pad(gm, (0, 0, 1, 0)).sub_(
            torch.nn.functional.pad(gm, (0, 0, 0, 1))
        )
        # dPhi_r / de_r = phi(z_r) / h = exp(-x_r^2) / (sqrt(2 pi) h), truncated
        dg.mul_(torch.exp(-(x * x)).sub_(window.exp_max))
        if grad_y is not None:
            grad_y[sl] = torch.sum(dg, 0)
        if grad_e is not None and j is None:
            grad_e.index_add_(0, cast(torch.Tensor, index).reshape(-1), dg.reshape(-1))
        elif grad_e is not None:
            grad_e[j_bin : j_bin + 2 * reach] += torch.sum(dg, 1)
        if grad_h is not None:
            grad_h -= torch.sum(dg.mul_(x).mul_(z_side))
    return grad_y


class _SortedPlan:
    """The window rows and the bookkeeping of the sorted chunks of :class:`_KDEHistogram`.

    ``chunk_rows[g]``: per chunk of group ``g``, the window edges ``(R0, R1)`` evaluated (the
    union of its segments' :meth:`_KDEWindow.active_rows`; None for unsorted chunks). Segment
    ``n`` of group ``g`` (bin ``j``, edges ``r0 .. r1-1`` reached, in a chunk evaluating
    ``R0 .. R1-1``) owns rows ``offsets[g][n] .. offsets[g][n+1]-1`` of the group's stacked
    products ``P_g = [E; 1] @ b^T`` (``R1 - R0`` rows ``sum E_s b``, then ``sum b``;
    ``W_g + S_g`` columns), and all groups' ``P_g`` are flattened one after the other
    (``start[g]``).
    Sums are tabled per (sums row ``v``, window edge ``s``, bin ``j``): entry
    ``(v 2K + s) (B+2) + j``. The index arrays combine all segments of all groups with a few
    operations per call.
    """

    def __init__(
        self, window: _KDEWindow, groups: list[_Group], all_values: Sequence, n_sums: int
    ) -> None:
        k, self.slots = window.reach, window.n_bins + 2
        self.reach, self.n_sums = k, n_sums
        self.chunk_rows: list[list] = []
        self.offsets: list[list[int]] = []
        self.heights: list[list[int]] = []  # per segment: its rows, offsets[n+1] - offsets[n]
        self.start: list[int] = []
        parts: dict[str, list[np.ndarray]] = {
            name: [] for name in ("tail", "tail_sum", "tail_entry", "total", "total_entry")
        }
        flat = 0
        for group, values in zip(groups, all_values, strict=True):
            self.start.append(flat)
            sorted_chunks = [segs for _, segs in group.chunks if segs is not None]
            if not sorted_chunks:
                self.chunk_rows.append([None] * len(group.chunks))
                self.offsets.append([0])
                self.heights.append([])
                continue
            segments = np.array([seg for segs in sorted_chunks for seg in segs])  # (S, 3)
            per_chunk = np.array([len(segs) for segs in sorted_chunks])
            r0, r1, e0, e1 = window.active_rows(values, segments)
            chunk_start = np.cumsum(per_chunk) - per_chunk
            first = np.minimum.reduceat(r0, chunk_start)  # the rows evaluated per chunk
            last = np.maximum.reduceat(r1, chunk_start)
            # 1 - erf for chunks of one segment (a chunk of several bins: erfc throughout)
            single = per_chunk == 1
            erf0 = np.where(single, e0[chunk_start], window.reach)
            erf1 = np.where(single, e1[chunk_start], window.reach)
            erf0, erf1 = np.clip(erf0, first, last), np.clip(erf1, first, last)
            rows = iter(
                zip(first.tolist(), last.tolist(), erf0.tolist(), erf1.tolist(), strict=True)
            )
            self.chunk_rows.append(
                [None if segs is None else next(rows) for _, segs in group.chunks]
            )
            chunk_of = np.repeat(np.arange(per_chunk.size), per_chunk)  # per segment
            first, heights = first[chunk_of], (last - first + 1)[chunk_of]
            offsets = np.concatenate([[0], np.cumsum(heights)])
            self.offsets.append(offsets.tolist())
            self.heights.append(heights.tolist())
            # one entry per (segment n, window edge s reached) and column c of P_g
            width, sums_rows = len(group.rows), np.array(group.rows)
            n = r1 - r0
            seg = np.repeat(np.arange(n.size), n)
            s = r0[seg] + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
            columns = np.arange(width)
            parts["tail"].append(flat + (offsets[seg] + s - first[seg])[:, None] * width + columns)
            parts["tail_sum"].append(
                flat + (offsets[seg] + heights[seg] - 1)[:, None] * width + columns
            )
            parts["tail_entry"].append(
                (sums_rows * 2 * k)[None, :] * self.slots
                + (s * self.slots + segments[seg, 0])[:, None]
            )
            parts["total"].append(flat + (offsets[1:] - 1)[:, None] * width + columns)
            parts["total_entry"].append(sums_rows[None, :] * self.slots + segments[:, :1])
            flat += offsets[-1] * width
        self.n_products = flat
        index = {
            name: np.concatenate([a.reshape(-1) for a in arrays])
            if arrays
            else np.zeros(0, np.int64)
            for name, arrays in parts.items()
        }
        self.tail, self.tail_sum, self.tail_entry = (
            torch.from_numpy(index[n]) for n in ("tail", "tail_sum", "tail_entry")
        )
        self.total, self.total_entry = (
            torch.from_numpy(index["total"]),
            torch.from_numpy(index["total_entry"]),
        )
        self.widths = [len(group.rows) for group in groups]

    def mass_sums(self, products: torch.Tensor, window: _KDEWindow) -> torch.Tensor:
        """Mass sums ``(R + S, 2K-1, B+2)`` per (sums row, window row ``r``, event bin ``j``) of the
        sorted chunks from all groups' flattened products ``P`` (class docstring of
        :class:`_KDEHistogram`)."""
        k, n_sums = self.reach, self.n_sums
        erfc_max = window.erfc_max.to(torch.float64)
        tails = products[self.tail] - erfc_max * products[self.tail_sum]  # (E_s - E_k) b
        v = products.new_zeros(n_sums * 2 * k * self.slots).index_add_(0, self.tail_entry, tails)
        v = v.view(n_sums, 2 * k, self.slots)  # V
        total = products.new_zeros(n_sums * self.slots).index_add_(
            0, self.total_entry, products[self.total]
        )
        sums = v.diff(dim=1).mul_(window.half)
        sums[:, k - 1] += total.view(n_sums, self.slots) - v[:, k - 1]
        return sums

    def coefficients(self, g_table: torch.Tensor, window: _KDEWindow) -> torch.Tensor:
        """``[c_R0 .. c_{R1-1}, g_{K-1} - E_k sum_s c_s]`` of every sorted segment of every
        group (``c_s = 0`` at the edges it does not reach), flattened like the products, for the
        upstream gradient ``g_table (R + S, 2K-1, B+2)`` (class docstring of
        :class:`_KDEHistogram`)."""
        k = self.reach
        half_g = g_table * window.half
        c = torch.nn.functional.pad(half_g, (0, 0, 1, 0)).sub_(
            torch.nn.functional.pad(half_g, (0, 0, 0, 1))
        )
        c[:, k - 1] -= g_table[:, k - 1]  # (R + S, 2K, B+2)
        tails = c.reshape(-1)[self.tail_entry]
        out = c.new_zeros(self.n_products)
        out[self.tail] = tails
        out[self.total] = g_table[:, k - 1].reshape(-1)[self.total_entry]
        out.index_add_(0, self.tail_sum, tails * -window.erfc_max.to(torch.float64))
        return out

    def group_coefficients(self, coefficients: torch.Tensor, index: int) -> torch.Tensor:
        """Group ``index``'s coefficients as ``(W + S, rows)`` (a view), to multiply ``[E; 1]``."""
        width, rows = self.widths[index], self.offsets[index][-1]
        start = self.start[index]
        return coefficients[start : start + rows * width].view(rows, width).t()


def _kernel_cdf(
    d: torch.Tensor, h: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian CDF ``Phi(d / h)`` at edge-minus-event distances ``d``, as ``step + tail``.

    ``step = 1[d > 0]``, ``tail = Phi(d/h) - step`` (``Q(|d|/h)`` left of the event,
    ``-Q(d/h)`` right of it), set to 0 where ``|d| > cutoff h`` or ``h <= 0``. Differentiable by
    autograd; both ``where`` branches stay finite so no NaN reaches a gradient.
    """
    right = d > 0
    positive = h > 0
    a = torch.where(right, d, -d)  # |d|, with derivative -1 at d = 0 (abs' would give 0)
    near = (a <= cutoff * h) & positive
    z = torch.where(near, a, 0.0) / torch.where(positive, h, 1.0)
    q = 0.5 * torch.special.erfc(z * _SQRT_HALF)
    tail = torch.where(near, torch.where(right, -q, q), 0.0)
    return right.to(d.dtype), tail


def kde_histogram_dense(
    values: torch.Tensor,
    weights: torch.Tensor,
    edges: torch.Tensor,
    bandwidth: torch.Tensor | float,
) -> Histogram:
    r"""The KDE histogram of :func:`kde_histogram`, computed per bin for every event.

    Evaluates all ``N x (B + 1)`` kernel CDFs with plain autograd (time and memory
    ``O(N B)``), truncating ``Q`` only where it underflows to 0 in the dtype, then sums
    ``w_i m_ib`` and ``w_i^2 m_ib`` over events in float64. It is the reference that the tests
    and ``benchmarks/bench_ops.py`` compare :func:`kde_histogram` with: same math, hard limit,
    dtypes and return value, plain autograd (so it supports higher derivatives).
    """
    edges_v, h = _kde_inputs(values, weights, edges, bandwidth)
    d = edges_v[None, :] - values[:, None]
    step, tail = _kernel_cdf(d, h, _KDE_UNDERFLOW[values.dtype])
    mass = ((tail[:, 1:] - tail[:, :-1]) + (step[:, 1:] - step[:, :-1])).to(torch.float64)
    w = weights.to(torch.float64)
    yields, sumw2 = w @ mass, (w * w) @ mass
    return Histogram(edges=edges, yields=yields.to(weights.dtype), sumw2=sumw2.to(weights.dtype))
