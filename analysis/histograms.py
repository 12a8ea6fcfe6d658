"""Histograms of the observable: yields and sum of squared weights per bin.

Hard histograms follow boost-histogram's (and so cabinetry's) convention: bins are half-open,
``[e_b, e_{b+1})``, and events outside ``[e_0, e_B)`` are not counted (no flow bins). For bin b

    n_b = sum_i w_i 1[e_b <= y_i < e_{b+1}],      s_b = sum_i w_i^2 1[e_b <= y_i < e_{b+1}],

where ``s_b`` estimates the variance of ``n_b`` (staterror uses ``sqrt(s_b)``). Sums are
accumulated in float64 and returned in the dtype of the weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch

from analysis.config import Config, Cut
from analysis.io import Events, TemplateKey, read_events


@dataclass(frozen=True)
class Histogram:
    """Bin ``edges`` (B+1), ``yields`` (B) and ``sumw2`` (B, the sum of squared weights)."""

    edges: torch.Tensor
    yields: torch.Tensor
    sumw2: torch.Tensor

    @property
    def stdev(self) -> torch.Tensor:
        """Statistical uncertainty per bin, ``sqrt(sumw2)``."""
        return torch.sqrt(self.sumw2)

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "edges": self.edges.tolist(),
            "yields": self.yields.tolist(),
            "sumw2": self.sumw2.tolist(),
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
    Returns ``{(region, sample, variation): Histogram}`` in float64.
    """
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
"""Window elements (events x 2K x weight rows) per chunk. CPU: a chunk's intermediates (2 MiB in
float64) stay in cache and are reused by the allocator instead of being page-faulted in, and few
chunks mean few OpenMP regions (each of which stalls when another process holds a core). Other
devices (CUDA): ``_KDE_CHUNK_ELEMENTS_DEFAULT``, a bound on temporary memory (256 MiB per
float64 array) that keeps kernel launches few."""

_KDE_CHUNK_ELEMENTS_DEFAULT = 1 << 25

_KDE_MIN_BIN_EVENTS = 1024
"""For sorted values, a bin with at least this many events is processed in chunks of its own
events (same window edges, sums by a matrix product); smaller bins are processed together like
unsorted events. About where the per-chunk overhead (some 25 tensor operations, ~50 us on a CPU)
equals the saving (~50 ns per event: ``bucketize``, gathers and a scatter)."""

_KDE_SAVE_BYTES = 1 << 30
"""Largest size of the window masses (events x (2K - 1), in the dtype of the values) that
:func:`kde_histogram` keeps for the backward pass when only the weights need a gradient (the
usual case: cut thresholds act through the weights). Above it the backward pass recomputes them
(the kernel, ``erfc``, is most of the forward time; writing the masses, page faults included,
costs about half of recomputing them). 1 GiB: 1.9e7 events in float64 at ``K = 4`` (bandwidth
0.36 bin widths), 1.2e7 at ``K = 6`` (0.5 bin widths); the autograd graph of the soft cuts
already keeps several floats per event."""


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
    evaluation: the masses ``m_ib`` depend on the values only.

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
    product (:class:`_KDEHistogram`); window bin ``r`` of bin ``j`` is bin ``j + r - K`` (so
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
    weights need a gradient and the window masses fit in ``_KDE_SAVE_BYTES``, the forward pass
    keeps them (``(2K - 1) N`` numbers) and the weight gradient needs no kernel evaluation;
    otherwise, and for the other inputs' ``exp(-z^2 / 2)``, each chunk's window is recomputed.
    Events are processed in chunks so the intermediates stay in cache (CPU) or bounded (CUDA).
    First derivatives only (no double backward; the dense op has them).

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
    edges_v, h = _kde_inputs(values, weights, edges, bandwidth)
    n_bins = edges.numel() - 1
    if reach is None:
        reach = kde_reach(edges_v, h, values.dtype)
    elif not (isinstance(reach, int) and reach >= 1):
        raise ValueError(f"reach must be an integer >= 1, got {reach!r}")
    reach = min(reach, n_bins + 1)  # K = B + 1 already covers every edge from any bin
    rows = weights if weights.ndim == 2 else weights[None]
    save_masses = (
        torch.is_grad_enabled()
        and weights.requires_grad
        and (2 * reach - 1) * values.numel() * values.element_size() <= _KDE_SAVE_BYTES
    )
    yields, sumw2 = _KDEHistogram.apply(
        values, rows, edges_v, h, reach, KDE_TAIL_CUTOFF[values.dtype], save_masses
    )
    if weights.ndim == 1:
        yields, sumw2 = yields[0], sumw2[0]
    return Histogram(edges=edges, yields=yields.to(weights.dtype), sumw2=sumw2.to(weights.dtype))


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
        m_r = 1 - ((E_K - E_k) + (E_{K-1} - E_k)) / 2   r = K - 1  (the event's bin),
        m_r = (E_r - E_{r+1}) / 2                      r > K - 1  (both edges right):

    differences of ``Q`` (accurate far from the event, exactly 0 where both edges are beyond
    ``k``) and exactly 1 in the event's bin when ``h = 0``. ``h = 0`` makes every ``u = k``
    (hard histogram); NaN values also get ``u = k`` and their unit lands in a dropped bin.
    """

    def __init__(self, edges: torch.Tensor, h: torch.Tensor, reach: int, cutoff: float) -> None:
        dtype, device = edges.dtype, edges.device
        infinity = torch.full((reach,), torch.inf, dtype=dtype, device=device)
        self.reach = reach
        self.padded = torch.cat([-infinity, edges, infinity])
        self.rows = torch.arange(2 * reach, dtype=torch.int32, device=device)[:, None]
        side = torch.ones(2 * reach, 1, dtype=dtype, device=device)
        side[:reach] = -1.0
        self.side = side  # sign of z = (e - y) / h per window row
        self.half = -0.5 * side[1:]  # m_r = half_r (E_{r+1} - E_r) off the event's bin
        # x = |z| / sqrt2; h below the smallest normal number counts as 0 (x = inf, then k)
        self.normal_h = h >= torch.finfo(dtype).tiny
        self.scale = torch.where(self.normal_h, _SQRT_HALF / h, torch.inf)
        self.x_max = cutoff * _SQRT_HALF
        # erfc(x_max) and exp(-x_max^2) as the vectorised kernels compute them (clamped entries
        # then give exactly 0), kept on the device (no synchronisation)
        at_max = torch.full((64,), self.x_max, dtype=dtype, device=device)
        self.erfc_max = torch.special.erfc(at_max)[0]
        self.exp_max = torch.exp(-(at_max * at_max))[0]

    def x(
        self, y: torch.Tensor, j: int | None, bin_of: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x = min(|e - y| / (sqrt2 h), k / sqrt2)`` ``(2K, C)`` at the window edges of the
        events ``y``, and the padded edge indices ``(2K, C)`` (``None`` for sorted values):
        all events in bin ``j`` (padded edges ``j .. j+2K-1``), or each in its ``bin_of``."""
        if j is not None:
            index, edge = None, self.padded[j : j + 2 * self.reach, None]
        else:
            index = self.rows + cast(torch.Tensor, bin_of)[None, :]  # given when j is None
            edge = self.padded.index_select(0, index.reshape(-1)).view(index.shape)
        x = torch.sub(edge, y[None, :]).abs_().mul_(self.scale)
        return torch.nan_to_num_(x, nan=self.x_max).clamp_max_(self.x_max), index

    def mass(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel mass ``(2K-1, C)`` of the window bins (class docstring)."""
        erfc = torch.special.erfc(x)
        mass = torch.sub(erfc[1:], erfc[:-1]).mul_(self.half)
        k = self.reach
        own = (erfc[k] - self.erfc_max).add_(erfc[k - 1] - self.erfc_max)
        mass[k - 1] = own.mul_(-0.5).add_(1.0)
        return mass


def _window_sums(sums: torch.Tensor, reach: int, n_bins: int) -> torch.Tensor:
    """Bin sums ``(..., B)`` from sums ``S (..., 2K-1, B+2)`` per (window row ``r``, event bin
    ``j``): window bin ``r`` of an event in bin ``j`` is real bin ``j + r - K``, so
    ``n_b = sum_r S[r, b + K - r]`` (rows shifted and added; the dropped bins are cut off)."""
    out = sums.new_zeros(sums.shape[:-2] + (n_bins + 2 * reach,))
    for r in range(2 * reach - 1):
        out[..., r : r + n_bins + 2] += sums[..., r, :]
    return out[..., reach : reach + n_bins]


def _window_table(grad: torch.Tensor, reach: int) -> torch.Tensor:
    """Upstream gradient per (window row ``r``, event bin ``j``), ``(W, 2K-1, B+2)``:
    ``T[r, j] = grad[j + r - K]``, 0 where that is not a real bin (the transpose of
    :func:`_window_sums`)."""
    padded = torch.nn.functional.pad(grad.to(torch.float64), (reach, reach))  # (W, B + 2K)
    return padded.unfold(-1, 2 * reach - 1, 1).transpose(-1, -2).contiguous()


def _bin_bounds(values: torch.Tensor, edges: torch.Tensor) -> list[int] | None:
    """On CPU, for values sorted ascending, the first event of every bin: events ``bounds[j]``
    to ``bounds[j+1]`` lie in bin ``j`` (``j = 0 .. B+1`` as from ``bucketize(right=True)``);
    ``None`` for unsorted values and on other devices (where per-bin chunks would multiply
    kernel launches, and the scatter of the generic path is atomic).

    ``bounds = [0, searchsorted(values, edges), N]`` (the events below ``e_b`` are the
    ``#(y < e_b)`` first ones; the comparisons of ``bucketize``), read on the host. NaN values
    are not sorted (every comparison with NaN is false).
    """
    if values.device.type != "cpu":
        return None
    if values.shape[0] > 1 and not bool(torch.all(values[1:] >= values[:-1])):
        return None
    return [0, *torch.searchsorted(values, edges).tolist(), values.shape[0]]


def _pieces(n: int, size: int, bounds: list[int] | None):
    """``(slice, j)``: chunks of at most ``size`` events. Unsorted values (``bounds`` None):
    ``j`` is None. Sorted values: a bin with at least ``_KDE_MIN_BIN_EVENTS`` events is cut into
    chunks of that bin ``j``; runs of consecutive smaller bins form chunks with ``j`` None (one
    chunk per bin would cost more in per-call overhead than it saves)."""
    if bounds is None:
        for start in range(0, n, size):
            yield slice(start, min(start + size, n)), None
        return
    pending = 0  # first event of the run of small bins not yet yielded
    for j in range(len(bounds) - 1):
        a, b = bounds[j], bounds[j + 1]
        if b - a < _KDE_MIN_BIN_EVENTS:
            if b - pending >= size:
                yield slice(pending, b), None
                pending = b
            continue
        if a > pending:
            yield slice(pending, a), None
        for start in range(a, b, size):
            yield slice(start, min(start + size, b)), j
        pending = b
    if n > pending:
        yield slice(pending, n), None


def _bins(
    bin_of: torch.Tensor | None, values: torch.Tensor, edges: torch.Tensor, sl: slice
) -> torch.Tensor:
    """The bins (int32) of events ``sl``: from ``bin_of`` when given, else ``bucketize``d."""
    if bin_of is not None:
        return bin_of[sl]
    return torch.bucketize(values[sl], edges, out_int32=True, right=True)


class _KDEHistogram(torch.autograd.Function):
    """``(yields, sumw2)`` of shape ``(W, B)`` in float64 of :func:`kde_histogram` for weights
    ``(W, N)``, with an analytic backward.

    The window masses ``m (2K-1, C)`` of a chunk of events are summed per (window row ``r``,
    event bin ``j``). Unsorted values: ``index_add_`` of ``w_vi m_ri`` and ``w_vi^2 m_ri`` by the
    event's bin (``bucketize``). Values sorted ascending, on CPU (the pipeline sorts its events
    by the observable): chunks are cut at the bins' bounds, so all events of a chunk have the same
    window edges (no gather) and their sums are one matrix product
    ``m (2K-1, C) @ [w; w^2]^T (C, 2W)``; a scatter of sorted events would serialise on
    repeated additions to the same bins.

    The backward pass uses ``dn_vb/dw_vi = m_ib``, ``ds_vb/dw_vi = 2 w_vi m_ib`` (the masses
    kept by the forward pass or recomputed; for sorted values again one matrix product per
    chunk) and, recomputing each chunk's window, ``dPhi/dy = -phi/h``, ``dPhi/de = phi/h``,
    ``dPhi/dh = -z phi/h`` with the truncated density ``phi(u) - phi(k)`` for ``u < k`` (0
    beyond), continuous like the forward kernel.
    """

    @staticmethod
    def forward(ctx, values, weights, edges, h, reach, cutoff, save_masses):
        n_bins, n_rows = edges.numel() - 1, weights.shape[0]
        size = _kde_chunk_size(values, reach, n_rows)
        window = _KDEWindow(edges, h, reach, cutoff)
        bounds = _bin_bounds(values, edges)
        # each event's bin: all at once for unsorted values, per mixed chunk for sorted ones
        bin_of = (
            torch.bucketize(values, edges, out_int32=True, right=True) if bounds is None else None
        )
        f64 = torch.float64
        # sums per (yields | sumw2, weight row, window row r, event bin j)
        sums = torch.zeros(2, n_rows, 2 * reach - 1, n_bins + 2, dtype=f64, device=values.device)
        masses = values.new_empty((2 * reach - 1, values.shape[0])) if save_masses else None
        for sl, j in _pieces(values.shape[0], size, bounds):
            bins = None if j is not None else _bins(bin_of, values, edges, sl)
            mass = window.mass(window.x(values[sl], j, bins)[0])
            if masses is not None:
                masses[:, sl] = mass
            w = weights[:, sl].to(f64)
            if j is not None:
                both = torch.cat([w, w * w]).T  # (C, 2W)
                sums[..., j] += (mass.to(f64) @ both).T.view(2, n_rows, -1)
                continue
            wm = mass.to(f64) * w[:, None, :]  # (W, 2K-1, C)
            bins = bins.long()  # index_add_ along a non-leading dim is slow with int32
            sums[0].index_add_(2, bins, wm)
            sums[1].index_add_(2, bins, wm.mul_(w[:, None, :]))
        ctx.save_for_backward(values, weights, edges, h, bin_of, masses)
        ctx.reach, ctx.cutoff, ctx.bounds = reach, cutoff, bounds
        out = _window_sums(sums, reach, n_bins)
        return out[0], out[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_yields, grad_sumw2):
        values, weights, edges, h, bin_of, masses = ctx.saved_tensors
        need_y, need_w, need_e, need_h = ctx.needs_input_grad[:4]
        need_x = need_y or need_e or need_h
        reach, n_bins, n_rows = ctx.reach, edges.numel() - 1, weights.shape[0]
        size = _kde_chunk_size(values, reach, n_rows)
        window = _KDEWindow(edges, h, reach, ctx.cutoff)
        f64 = torch.float64
        g_n = _window_table(grad_yields, reach)  # upstream gradient per (row, r, event bin)
        g_s = _window_table(grad_sumw2, reach)
        grad_y = torch.empty(values.shape, dtype=f64, device=values.device) if need_y else None
        grad_w = torch.empty_like(weights) if need_w else None
        grad_e = torch.zeros(n_bins + 1 + 2 * reach, dtype=f64, device=values.device)
        grad_h = torch.zeros((), dtype=f64, device=values.device)
        z_side = window.side.to(f64) * 2.0**0.5  # z = x * sqrt2 * side
        for sl, j in _pieces(values.shape[0], size, ctx.bounds):
            w = weights[:, sl].to(f64)
            bins = None if j is not None else _bins(bin_of, values, edges, sl)
            if need_x or masses is None:
                x, index = window.x(values[sl], j, bins)
            if j is None:  # upstream gradient of each event's window bins, (W, 2K-1, C)
                bins = bins.long().expand(g_n.shape[:2] + (-1,))
                gn, gs = torch.gather(g_n, 2, bins), torch.gather(g_s, 2, bins)
            if need_w:
                mass = (masses[:, sl] if masses is not None else window.mass(x)).to(f64)
                if j is None:
                    grad_w[:, sl] = torch.sum((gs * (2.0 * w[:, None, :])).add_(gn).mul_(mass), 1)
                else:  # sum_r g[., r, j] m_ri for yields and sumw2 in one product
                    both = torch.cat([g_n[:, :, j], g_s[:, :, j]]) @ mass  # (2W, C)
                    grad_w[:, sl] = both[n_rows:].mul_(2.0 * w).add_(both[:n_rows])
            if not need_x:
                continue
            # d loss / d m_r = sum_v g_n[v, r] w_v + g_s[v, r] w_v^2, (2K-1, C)
            if j is None:
                g = torch.sum((gs * w[:, None, :]).add_(gn).mul_(w[:, None, :]), 0)
            else:
                g = torch.cat([g_n[:, :, j], g_s[:, :, j]]).T @ torch.cat([w, w * w])
            # window edge r is the upper edge of bin r-1 and the lower edge of bin r:
            # d loss / d Phi_r = g_{r-1} - g_r
            dg = torch.nn.functional.pad(g, (0, 0, 1, 0)).sub_(
                torch.nn.functional.pad(g, (0, 0, 0, 1))
            )
            # dPhi_r / de_r = phi(z_r) / h = exp(-x_r^2) / (sqrt(2 pi) h), truncated: the
            # 1 / (sqrt(2 pi) h) is applied once at the end
            dg.mul_(torch.exp(-(x * x)).sub_(window.exp_max))
            if need_y:
                grad_y[sl] = torch.sum(dg, 0)
            if need_e and j is None:
                grad_e.index_add_(0, index.reshape(-1), dg.reshape(-1))
            elif need_e:
                grad_e[j : j + 2 * reach] += torch.sum(dg, 1)
            if need_h:
                grad_h -= torch.sum(dg.mul_(x).mul_(z_side))
        density = torch.where(window.normal_h, _INV_SQRT_2PI / h, 0.0).to(f64)  # 0 for h = 0
        grad_y = (grad_y * -density).to(values.dtype) if need_y else None
        grad_e = (grad_e[reach : reach + n_bins + 1] * density).to(edges.dtype) if need_e else None
        grad_h = (grad_h * density).to(h.dtype) if need_h else None
        return grad_y, grad_w, grad_e, grad_h, None, None, None


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
