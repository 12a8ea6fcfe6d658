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
"""Window elements (events x 2K) per chunk. CPU: a chunk's intermediates (2 MiB in float64) stay
in cache and are reused by the allocator instead of being page-faulted in, and few chunks mean
few OpenMP regions (each of which stalls when another process holds a core). Other devices
(CUDA): ``_KDE_CHUNK_ELEMENTS_DEFAULT``, a bound on temporary memory (256 MiB per float64
array) that keeps kernel launches few."""

_KDE_CHUNK_ELEMENTS_DEFAULT = 1 << 25


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

    Hard limit: ``h = 0`` exactly gives :func:`hard_histogram` (half-open bins
    ``[e_b, e_{b+1})``: an event on an edge goes to the bin above it; events outside
    ``[e_0, e_B)`` are dropped). For ``h > 0`` an event exactly on an edge puts half its weight
    on each side, so ``h -> 0`` converges to the hard histogram for events not on an edge.
    Events outside the range contribute the part of their kernel inside it; NaN values
    contribute nothing (as in the hard histogram); NaN weights make the sums NaN.

    Knob: ``h`` trades bias (weight leaks into neighbouring bins, shapes are smoothed) for
    gradient variance (only events within a few ``h`` of an edge carry gradient with respect to
    cuts, values and edges). DESIGN.md sets it in units of the bin width (neos uses 0.36).

    Algorithm (cost independent of the number of bins): ``bucketize`` finds each event's bin;
    the CDF is evaluated only at the ``K`` edges on each side of it (:func:`kde_reach`,
    ``K = floor(k h / smallest bin width) + 2``, so non-uniform edges work) and the ``2K - 1``
    bin masses are scatter-added (``index_add_``) into float64 sums. The kernel is truncated at
    ``k h``: writing ``Phi(z) = 1[z > 0] +- Q(|z|)``, the tail ``Q(u)`` is replaced by
    ``Q(min(u, k)) - Q(k)``, continuous in ``u`` and exactly 0 beyond ``k``, so every bin
    outside the window is exactly empty and an event's masses over the window sum to exactly 1
    (the part outside ``[e_0, e_B)`` is then dropped).
    Truncation error: each bin's share ``m_ib`` of an event changes by at most ``2 Q(k)``, so
    ``|Delta n_b| <= 2 Q(k) sum_i |w_i|`` (and ``|Delta s_b| <= 2 Q(k) sum_i w_i^2``), with
    ``k = 8`` in float64 (``2 Q(8) = 1.2e-15``, far below 1e-12 relative) and ``k = 5.5`` in
    float32 (``2 Q(5.5) = 3.8e-8``, below float32 rounding); see ``KDE_TAIL_CUTOFF``. Measured
    against :func:`kde_histogram_dense` (untruncated): up to 1.3e-15 of ``sum_i |w_i|``.

    Backward: analytic (``dPhi/dy = -phi/h``, ``dPhi/de = phi/h``, ``dPhi/dh = -z phi/h``) with
    the truncated density ``phi(u) - phi(k)`` for ``u < k`` (0 beyond; it differs from the
    derivative of the forward kernel by at most ``phi(k) / h``: 5e-15/h in float64,
    1.1e-7/h in float32, against a peak of 0.4/h). It recomputes each chunk's window instead of
    storing it: saved for backward are the inputs and each event's bin (int32), nothing per bin
    or window. Events are processed in chunks so the intermediates stay in cache (CPU) or bounded
    (CUDA). First derivatives only (no double backward; the dense op has them).

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
            ``(N,)``; may require grad.
        edges: bin edges, strictly increasing, shape ``(B + 1,)``; may require grad.
        bandwidth: kernel width ``h >= 0`` in the units of ``values`` (a number or a scalar
            tensor; may require grad). The caller converts from bin widths.
        reach: ``K`` when the caller knows it (e.g. :func:`kde_reach` at the largest ``h`` of an
            annealing schedule); skips the host synchronisation and the checks of ``edges`` and
            ``h`` (which must then be valid). A ``K`` smaller than :func:`kde_reach` gives loses
            the kernel mass beyond the window.

    Returns:
        ``Histogram(edges, yields, sumw2)``, ``edges`` as given.
    """
    edges_v, h = _kde_inputs(values, weights, edges, bandwidth)
    n_bins = edges.numel() - 1
    if reach is None:
        reach = kde_reach(edges_v, h, values.dtype)
    elif not (isinstance(reach, int) and reach >= 1):
        raise ValueError(f"reach must be an integer >= 1, got {reach!r}")
    reach = min(reach, n_bins + 1)  # K = B + 1 already covers every edge from any bin
    yields, sumw2 = _KDEHistogram.apply(
        values, weights, edges_v, h, reach, KDE_TAIL_CUTOFF[values.dtype]
    )
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
    if values.ndim != 1 or weights.shape != values.shape:
        raise ValueError(
            f"values and weights must be 1-D of the same length, got shapes "
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


def _kde_chunk_size(values: torch.Tensor, reach: int) -> int:
    elements = _KDE_CHUNK_ELEMENTS.get(values.device.type, _KDE_CHUNK_ELEMENTS_DEFAULT)
    return max(1, elements // (2 * reach))


class _KDEWindow:
    """Per-call constants of :class:`_KDEHistogram` and the kernel of one chunk of events.

    Layout: the edges are padded with ``K`` edges at ``-inf`` and ``K`` at ``+inf``, so the window
    of an event in bin ``j - 1`` (``edges[j-1] <= y < edges[j]``, ``j`` from ``bucketize``) is
    padded edges ``j + r``, ``r = 0 .. 2K-1``, with no clamping; its bins are padded bins
    ``j + r``, ``r = 0 .. 2K-2`` (real bin ``b`` is padded bin ``b + K``; the others are dropped).
    Arrays are ``(2K, C)`` (window position, event) so rows are contiguous. Window edge ``r`` lies
    left of the event for ``r < K`` and right of it for ``r >= K``, so
    ``Phi(z_r) = step_r + tail_r`` with ``step_r = 1[r >= K]`` and ``tail_r = +-(Q(u_r) - Q(k))``,
    ``u_r = min(|z_r|, k)``, ``Q(u) = erfc(u / sqrt2) / 2``: differences of ``tail`` are accurate
    far from the event, ``tail`` is continuous and exactly 0 beyond ``k`` (the truncation), and the
    step puts one unit into window bin ``K - 1``, the event's own bin. ``h = 0`` makes every
    ``u = k`` (hard histogram); NaN values also get ``u = k`` and their unit lands in a dropped bin.
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
        # x = |z| / sqrt2; h below the smallest normal number counts as 0 (x = inf, then k)
        self.normal_h = h >= torch.finfo(dtype).tiny
        self.scale = torch.where(self.normal_h, _SQRT_HALF / h, torch.inf)
        self.x_max = cutoff * _SQRT_HALF
        # erfc(x_max) and exp(-x_max^2) as the vectorised kernels compute them (clamped entries
        # then give exactly 0), kept on the device (no synchronisation)
        at_max = torch.full((64,), self.x_max, dtype=dtype, device=device)
        self.erfc_max = torch.special.erfc(at_max)[0]
        self.exp_max = torch.exp(-(at_max * at_max))[0]

    def index_and_x(
        self, bin_of: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded edge indices ``(2K, C)`` and ``x = min(|e - y| / (sqrt2 h), k / sqrt2)``."""
        index = self.rows + bin_of[None, :]
        edge = self.padded.index_select(0, index.reshape(-1)).view(index.shape)
        x = torch.sub(edge, y[None, :]).abs_().mul_(self.scale)
        return index, torch.nan_to_num_(x, nan=self.x_max).clamp_max_(self.x_max)

    def mass(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel mass ``(2K-1, C)`` of the window bins."""
        tail = torch.special.erfc(x).sub_(self.erfc_max).mul_(-0.5 * self.side)  # Phi - step
        mass = tail[1:] - tail[:-1]
        mass[self.reach - 1] += 1.0
        return mass


class _KDEHistogram(torch.autograd.Function):
    """``(yields, sumw2)`` in float64 of :func:`kde_histogram`, with an analytic backward.

    The backward pass recomputes each chunk's window and uses ``dPhi/dy = -phi/h``,
    ``dPhi/de = phi/h``, ``dPhi/dh = -z phi/h``, with the truncated density
    ``phi(u) - phi(k)`` for ``u < k`` (0 beyond), continuous like the forward kernel.
    """

    @staticmethod
    def forward(ctx, values, weights, edges, h, reach, cutoff):
        n_bins, size = edges.numel() - 1, _kde_chunk_size(values, reach)
        window = _KDEWindow(edges, h, reach, cutoff)
        bin_of = torch.bucketize(values, edges, out_int32=True, right=True)
        yields = torch.zeros(n_bins + 2 * reach, dtype=torch.float64, device=values.device)
        sumw2 = torch.zeros_like(yields)
        for start in range(0, values.shape[0], size):
            sl = slice(start, start + size)
            index, x = window.index_and_x(bin_of[sl], values[sl])
            w = weights[sl].to(torch.float64)
            wm = window.mass(x).to(torch.float64).mul_(w)
            bins = index[:-1].reshape(-1)
            yields.index_add_(0, bins, wm.reshape(-1))
            sumw2.index_add_(0, bins, wm.mul_(w).reshape(-1))
        ctx.save_for_backward(values, weights, edges, h, bin_of)
        ctx.reach, ctx.cutoff = reach, cutoff
        return yields[reach : reach + n_bins].clone(), sumw2[reach : reach + n_bins].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_yields, grad_sumw2):
        values, weights, edges, h, bin_of = ctx.saved_tensors
        need_y, need_w, need_e, need_h = ctx.needs_input_grad[:4]
        reach, n_bins = ctx.reach, edges.numel() - 1
        size = _kde_chunk_size(values, reach)
        window = _KDEWindow(edges, h, reach, ctx.cutoff)
        f64 = torch.float64
        # upstream gradient per padded bin, 0 on the dropped ones
        g_n = torch.nn.functional.pad(grad_yields.to(f64), (reach, reach))
        g_s = torch.nn.functional.pad(grad_sumw2.to(f64), (reach, reach))
        grad_y = torch.empty(values.shape, dtype=f64, device=values.device) if need_y else None
        grad_w = torch.empty_like(weights) if need_w else None
        grad_e = torch.zeros(n_bins + 1 + 2 * reach, dtype=f64, device=values.device)
        grad_h = torch.zeros((), dtype=f64, device=values.device)
        z_side = window.side.to(f64) * 2.0**0.5  # z = x * sqrt2 * side
        for start in range(0, values.shape[0], size):
            sl = slice(start, start + size)
            index, x = window.index_and_x(bin_of[sl], values[sl])
            bins = index[:-1].reshape(-1)
            gn = g_n.index_select(0, bins).view(2 * reach - 1, -1)
            gs = g_s.index_select(0, bins).view(2 * reach - 1, -1)
            w = weights[sl].to(f64)
            if need_w:
                grad_w[sl] = torch.sum((gn + 2.0 * w * gs).mul_(window.mass(x)), 0)
            if not (need_y or need_e or need_h):
                continue
            g = (gs * w).add_(gn).mul_(w)  # d loss / d m_rb
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
            if need_e:
                grad_e.index_add_(0, index.reshape(-1), dg.reshape(-1))
            if need_h:
                grad_h -= torch.sum(dg.mul_(x).mul_(z_side))
        density = torch.where(window.normal_h, _INV_SQRT_2PI / h, 0.0).to(f64)  # 0 for h = 0
        grad_y = (grad_y * -density).to(values.dtype) if need_y else None
        grad_e = (grad_e[reach : reach + n_bins + 1] * density).to(edges.dtype) if need_e else None
        grad_h = (grad_h * density).to(h.dtype) if need_h else None
        return grad_y, grad_w, grad_e, grad_h, None, None


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
