"""KDE histograms: windowed op against the dense op, scipy and hist; gradients; float32; the sorted
fast path (active window rows, 1 - erf near the events, runs of small bins) and several groups
per call against the straightforward references; the pipeline's soft-cut KDE histograms against
log-space cuts and the dense op."""

from __future__ import annotations

import hist
import numpy as np
import pytest
import torch
from scipy.stats import norm

from analysis import config as config_module
from analysis import histograms
from analysis.histograms import (
    KDE_TAIL_CUTOFF,
    hard_histogram,
    kde_histogram,
    kde_histogram_dense,
    kde_histograms,
    kde_reach,
)
from analysis.io import read_events
from analysis.pipeline import AnalysisPipeline
from analysis.selection import SoftCut, log_selection_weight

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
UNIFORM = np.linspace(-2.0, 3.0, 11)
NON_UNIFORM = np.array([-2.0, -1.2, -0.9, -0.3, 0.0, 0.05, 0.5, 1.4, 3.0])


def sample(n: int, seed: int, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Values around 0, some outside the edges; positive weights."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.3, spread, n), rng.uniform(0.2, 2.0, n)


def tensors(device, dtype, *arrays):
    return [torch.tensor(a, dtype=dtype, device=device) for a in arrays]


@pytest.mark.parametrize("save_masses", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("edges", [UNIFORM, NON_UNIFORM], ids=["uniform", "non-uniform"])
def test_sorted_values_and_weight_rows_equal_dense(edges, save_masses, monkeypatch):
    """Values sorted ascending (the pipeline's layout: bins with >= 1024 events are summed by a
    matrix product, the others scattered) and three rows of weights (one of them negative in
    places) give, row by row, the dense op's histograms and gradients for every input; with the
    window masses kept for the backward pass and with them recomputed."""
    from analysis import histograms

    if not save_masses:
        monkeypatch.setattr(histograms, "_KDE_SAVE_BYTES", 0)
    values, weights = sample(30000, 3)
    values = np.sort(values)
    rows = np.stack([weights, weights * np.cos(values), 1.0 + 0.0 * values])
    upstream_n = torch.linspace(0.5, 2.0, edges.size - 1, dtype=torch.float64)
    upstream_s = torch.linspace(-1.0, 1.0, edges.size - 1, dtype=torch.float64)
    y, w, e, h = tensors("cpu", torch.float64, values, rows, edges, 0.3)
    for t in (y, w, e, h):
        t.requires_grad_()
    got = kde_histogram(y, w, e, h)
    assert got.yields.shape == got.sumw2.shape == (3, edges.size - 1)
    loss = (got.yields * upstream_n).sum() + (got.sumw2 * upstream_s).sum()
    grads = torch.autograd.grad(loss, (y, w, e, h))
    ref_loss = 0.0
    for i in range(3):
        ref = kde_histogram_dense(y, w[i], e, h)
        np.testing.assert_allclose(got.yields[i].detach(), ref.yields.detach(), rtol=1e-12)
        np.testing.assert_allclose(got.sumw2[i].detach(), ref.sumw2.detach(), rtol=1e-12)
        ref_loss = ref_loss + (ref.yields * upstream_n).sum() + (ref.sumw2 * upstream_s).sum()
    for got_g, ref_g in zip(grads, torch.autograd.grad(ref_loss, (y, w, e, h)), strict=True):
        np.testing.assert_allclose(got_g, ref_g, rtol=1e-9, atol=1e-12 * ref_g.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edges", [UNIFORM, NON_UNIFORM], ids=["uniform", "non-uniform"])
@pytest.mark.parametrize("h", [0.01, 0.18, 0.5, 2.0])
def test_windowed_equals_dense(device, edges, h):
    values, weights = sample(20000, 1)  # about 15% of the events are outside the edges
    y, w, e = tensors(device, torch.float64, values, weights, edges)
    got, ref = kde_histogram(y, w, e, h), kde_histogram_dense(y, w, e, h)
    assert got.yields.dtype == torch.float64 and got.edges is e
    np.testing.assert_allclose(got.yields.cpu(), ref.yields.cpu(), rtol=1e-12)
    np.testing.assert_allclose(got.sumw2.cpu(), ref.sumw2.cpu(), rtol=1e-12)


@pytest.mark.parametrize("edges", [UNIFORM, NON_UNIFORM], ids=["uniform", "non-uniform"])
def test_windowed_gradients_equal_dense_autograd(edges):
    values, weights = sample(3000, 2)
    upstream_n = torch.linspace(0.5, 2.0, edges.size - 1, dtype=torch.float64)
    upstream_s = torch.linspace(-1.0, 1.0, edges.size - 1, dtype=torch.float64)
    grads = []
    for op in (kde_histogram, kde_histogram_dense):
        inputs = tensors("cpu", torch.float64, values, weights, edges, 0.3)
        for t in inputs:
            t.requires_grad_()
        out = op(*inputs)
        loss = (out.yields * upstream_n).sum() + (out.sumw2 * upstream_s).sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for got, ref in zip(*grads, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * ref.abs().max().item())


def test_against_scipy():
    values, weights = sample(5000, 3)
    values[:3] = [-5.0, 0.0, 7.0]  # far outside, on an edge, far outside
    weights[:500] *= -1  # negative weights
    h = 0.27
    cdf = norm.cdf(NON_UNIFORM[None, :], loc=values[:, None], scale=h)
    mass = np.diff(cdf, axis=1)
    got = kde_histogram(*tensors("cpu", torch.float64, values, weights, NON_UNIFORM), h)
    np.testing.assert_allclose(got.yields.numpy(), weights @ mass, rtol=1e-11)
    np.testing.assert_allclose(got.sumw2.numpy(), weights**2 @ mass, rtol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_bandwidth_is_hist(device, dtype):
    values, weights = sample(5000, 4, spread=2.0)
    # events on every edge (half-open bins: they go to the bin above), outside, NaN
    values = np.concatenate([values, NON_UNIFORM, [np.nan, -9.0, 9.0]])
    weights = np.concatenate([weights, np.full(NON_UNIFORM.size + 3, 1.5)])
    reference = hist.Hist(hist.axis.Variable(NON_UNIFORM), storage=hist.storage.Weight())
    reference.fill(values, weight=weights)
    y, w, e = tensors(device, dtype, values, weights, NON_UNIFORM)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    for h in (0.0, torch.tensor(0.0, dtype=dtype, device=device)):
        for op in (kde_histogram, kde_histogram_dense):
            got = op(y, w, e, h)
            assert got.yields.dtype == dtype
            np.testing.assert_allclose(got.yields.cpu(), reference.values(), rtol=rtol)
            np.testing.assert_allclose(got.sumw2.cpu(), reference.variances(), rtol=rtol)
    hard = hard_histogram(y, w, e)
    torch.testing.assert_close(kde_histogram(y, w, e, 0.0).yields, hard.yields, rtol=rtol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_bandwidth_is_hist_away_from_edges(device):
    values, weights = sample(5000, 5, spread=2.0)
    values = values[np.min(np.abs(values[:, None] - UNIFORM[None, :]), axis=1) > 1e-6]
    weights = weights[: values.size]
    reference = hist.Hist(hist.axis.Variable(UNIFORM), storage=hist.storage.Weight())
    reference.fill(values, weight=weights)
    got = kde_histogram(*tensors(device, torch.float64, values, weights, UNIFORM), 1e-9)
    np.testing.assert_allclose(got.yields.cpu(), reference.values(), rtol=1e-12)
    np.testing.assert_allclose(got.sumw2.cpu(), reference.variances(), rtol=1e-12)


def test_event_on_an_edge_splits_in_half():
    e = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    got = kde_histogram(torch.tensor([1.0], dtype=torch.float64), torch.ones(1).double(), e, 1e-3)
    torch.testing.assert_close(got.yields, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("op", [kde_histogram, kde_histogram_dense])
@pytest.mark.parametrize("h", [0.08, 0.4, 3.0])
def test_gradcheck(op, h):
    rng = np.random.default_rng(6)
    values = np.concatenate([rng.uniform(-2.5, 3.5, 25), [0.0, -0.3]])  # two events on edges
    weights = rng.normal(1.0, 0.6, values.size)
    inputs = tensors("cpu", torch.float64, values, weights, NON_UNIFORM[:6], h)
    for t in inputs:
        t.requires_grad_()

    def f(y, w, e, bw):
        out = op(y, w, e, bw)
        return out.yields, out.sumw2

    assert torch.autograd.gradcheck(f, inputs)


def test_zero_bandwidth_gradients():
    values, weights = sample(500, 7)
    inputs = tensors("cpu", torch.float64, values, weights, UNIFORM, 0.0)
    for t in inputs:
        t.requires_grad_()
    out = kde_histogram(*inputs)
    gy, gw, ge, gh = torch.autograd.grad(out.yields.sum() + out.sumw2.sum(), inputs)
    inside = (values >= UNIFORM[0]) & (values < UNIFORM[-1])
    np.testing.assert_allclose(gw, inside * (1.0 + 2.0 * weights))  # d(w + w^2)/dw
    assert torch.all(gy == 0) and torch.all(ge == 0) and gh.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edges", [UNIFORM, NON_UNIFORM], ids=["uniform", "non-uniform"])
def test_float32_close_to_float64(device, edges):
    values, weights = sample(20000, 8)
    upstream = torch.linspace(0.5, 2.0, edges.size - 1, dtype=torch.float64, device=device)
    out, grads = {}, {}
    for dtype in (torch.float32, torch.float64):
        inputs = tensors(device, dtype, values, weights, edges, 0.2)
        for t in inputs:
            t.requires_grad_()
        out[dtype] = kde_histogram(*inputs)
        assert out[dtype].yields.dtype == dtype
        loss = (out[dtype].yields.double() * upstream).sum() + out[dtype].sumw2.double().sum()
        grads[dtype] = torch.autograd.grad(loss, inputs)
    for field in ("yields", "sumw2"):
        np.testing.assert_allclose(
            getattr(out[torch.float32], field).detach().cpu().double(),
            getattr(out[torch.float64], field).detach().cpu(),
            rtol=1e-5,
        )
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64], strict=True):
        scale = g64.abs().max().item()
        np.testing.assert_allclose(g32.cpu().double(), g64.cpu(), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_total_is_conserved_far_inside(device):
    rng = np.random.default_rng(9)
    values, weights = rng.uniform(-1.0, 1.0, 10000), rng.normal(1.0, 0.5, 10000)
    edges = np.array([-10.0, -3.0, -0.5, 0.0, 0.1, 0.7, 2.0, 10.0])
    got = kde_histogram(*tensors(device, torch.float64, values, weights, edges), 0.5)
    np.testing.assert_allclose(got.yields.sum().item(), weights.sum(), rtol=1e-12)
    np.testing.assert_allclose(got.sumw2.sum().item(), (weights**2).sum(), rtol=1e-12)


def test_window_does_not_grow_with_the_number_of_bins():
    for dtype, expected in ((torch.float64, 4), (torch.float32, 3)):
        for n_bins in (5, 20, 1000):
            edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=dtype)
            assert kde_reach(edges, 0.36 / n_bins, dtype) == expected
    # the smallest bin sets the window of non-uniform edges
    edges = torch.tensor([0.0, 1.0, 1.125, 3.0], dtype=torch.float64)
    assert kde_reach(edges, 0.125, torch.float64) == int(KDE_TAIL_CUTOFF[torch.float64]) + 2


def test_explicit_reach_and_mixed_dtypes():
    values, weights = sample(2000, 10)
    y, w = tensors("cpu", torch.float64, values, weights)
    e = torch.tensor(UNIFORM, dtype=torch.float32)  # converted to the dtype of the values
    default = kde_histogram(y, w, e, 0.2)
    for reach in (kde_reach(e, 0.2, torch.float64), 50):
        again = kde_histogram(y, w, e, 0.2, reach=reach)
        torch.testing.assert_close(again.yields, default.yields, rtol=1e-14, atol=0)
    assert default.edges is e and default.yields.dtype == torch.float64
    assert kde_histogram(y, w.float(), e, 0.2).yields.dtype == torch.float32


def test_bad_arguments_are_rejected():
    y, w = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    e = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly increasing"):
        kde_histogram(y, w, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        kde_histogram(y, w, e, -0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        kde_histogram(y, w, e, torch.tensor(float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="same length"):
        kde_histogram(y, w[:3], e, 0.1)
    with pytest.raises(ValueError, match="edges"):
        kde_histogram(y, w, e[:1], 0.1)
    with pytest.raises(ValueError, match="reach"):
        kde_histogram(y, w, e, 0.1, reach=0)
    with pytest.raises(TypeError, match="float32 or float64"):
        kde_histogram(torch.zeros(4, dtype=torch.int64), w, e, 0.1)


# ----------------------------------------------------------------------------- sorted fast path
def sorted_sample(seed: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values: a dense peak (bins of thousands of events), a sparse tail (runs of small
    bins), events exactly on edges and outside the range; two weight rows, one with negatives."""
    rng = np.random.default_rng(seed)
    values = np.concatenate(
        [
            rng.normal(0.2, 0.25, 12000),
            rng.uniform(edges[0] - 1.0, edges[-1] + 1.0, 600),
            edges,
            [edges[0] - 50.0, edges[-1] + 50.0],
        ]
    )
    values = np.sort(values)
    w = rng.uniform(0.2, 2.0, values.size)
    return values, np.stack([w, w * np.where(rng.uniform(size=values.size) < 0.2, -1.0, 1.0)])


def weights_gradients_close(got, ref, rtol):
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=1e-12 * r.abs().max().item())


@pytest.mark.parametrize("saved", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("edges", [UNIFORM, NON_UNIFORM], ids=["uniform", "non-uniform"])
@pytest.mark.parametrize("h", [0.02, 0.15, 0.5, 2.0])
def test_sorted_path_equals_dense(edges, h, saved, monkeypatch):
    """Sorted values, bins of one chunk and runs of small bins (threshold 64 events), window
    rows that no event of a chunk reaches skipped, 1 - erf at the near rows (h >= 0.35 bin
    widths): values equal the dense op to 1e-12, weight gradients to 1e-10 (the other inputs'
    to 1e-9: the truncated density differs from the dense op's by phi(k) / h)."""
    monkeypatch.setattr(histograms, "_KDE_MIN_BIN_EVENTS", 64)
    if not saved:
        monkeypatch.setattr(histograms, "_KDE_SAVE_BYTES", 0)
    values, rows = sorted_sample(21, edges)
    y, w, e, hh = tensors("cpu", torch.float64, values, rows, edges, h)
    for t in (y, w, e, hh):
        t.requires_grad_()
    got = kde_histogram(y, w, e, hh)
    up_n = torch.linspace(0.5, 2.0, edges.size - 1, dtype=torch.float64)
    up_s = torch.linspace(-1.0, 1.0, edges.size - 1, dtype=torch.float64)
    loss = (got.yields * up_n).sum() + (got.sumw2 * up_s).sum()
    grads = torch.autograd.grad(loss, (y, w, e, hh))
    ref_loss = 0.0
    for i in range(2):
        ref = kde_histogram_dense(y, w[i], e, hh)
        np.testing.assert_allclose(got.yields[i].detach(), ref.yields.detach(), rtol=1e-12)
        np.testing.assert_allclose(got.sumw2[i].detach(), ref.sumw2.detach(), rtol=1e-12)
        ref_loss = ref_loss + (ref.yields * up_n).sum() + (ref.sumw2 * up_s).sum()
    ref_grads = torch.autograd.grad(ref_loss, (y, w, e, hh))
    weights_gradients_close(grads[1:2], ref_grads[1:2], rtol=1e-10)
    weights_gradients_close(grads[:1] + grads[2:], ref_grads[:1] + ref_grads[2:], rtol=1e-9)


@pytest.mark.parametrize("h", [0.05, 0.3, 1.0])
def test_sorted_path_equals_unsorted_path(h, monkeypatch):
    """The same events sorted (per-bin products, active rows, 1 - erf near the events) and
    shuffled (the generic path, masses per event and a scatter): values to 1e-12, gradients of
    every input to 1e-10."""
    monkeypatch.setattr(histograms, "_KDE_MIN_BIN_EVENTS", 128)
    values, rows = sorted_sample(22, NON_UNIFORM)
    order = np.random.default_rng(3).permutation(values.size)
    results = []
    for perm in (np.arange(values.size), order):
        y, w, e, hh = tensors("cpu", torch.float64, values[perm], rows[:, perm], NON_UNIFORM, h)
        for t in (y, w, e, hh):
            t.requires_grad_()
        out = kde_histogram(y, w, e, hh)
        loss = (out.yields * torch.arange(1.0, 9.0)).sum() - (out.sumw2**2).sum()
        gy, gw, ge, gh = torch.autograd.grad(loss, (y, w, e, hh))
        inverse = np.argsort(perm)
        results.append(
            (out.yields.detach(), out.sumw2.detach(), gy[inverse], gw[:, inverse], ge, gh)
        )
    for got, ref in zip(*results, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12 * ref.abs().max().item())
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12)


def test_erf_near_rows_equal_erfc(monkeypatch):
    """1 - erf at the window rows every event of a chunk sees within x <= 2 against erfc
    throughout: 1e-13 in values and weight gradients."""
    values, rows = sorted_sample(23, UNIFORM)
    out = {}
    for erf_max in (histograms._KDE_ERF_MAX, -1.0):
        monkeypatch.setattr(histograms, "_KDE_ERF_MAX", erf_max)
        y, w, e = tensors("cpu", torch.float64, values, rows, UNIFORM)
        w.requires_grad_()
        hist_ = kde_histogram(y, w, e, 0.25)  # 0.5 bin widths: rows K-1, K by 1 - erf
        (gw,) = torch.autograd.grad((hist_.yields**2).sum() + hist_.sumw2.sum(), w)
        out[erf_max] = (hist_.yields.detach(), hist_.sumw2.detach(), gw)
    for got, ref in zip(*out.values(), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-14 * ref.abs().max().item())


@pytest.mark.parametrize("h", [0.0, 1e-9])
def test_sorted_zero_and_tiny_bandwidth_are_hist(h, monkeypatch):
    """Sorted values with events on every edge, at +-inf and outside the range: h = 0 (and an
    h so small that no event reaches another bin) gives the hard histogram, the own bin exactly
    the sum of the weights."""
    monkeypatch.setattr(histograms, "_KDE_MIN_BIN_EVENTS", 32)
    values, rows = sorted_sample(24, NON_UNIFORM)
    values = np.concatenate([[-np.inf], values, [np.inf]])
    rows = np.concatenate([[[1.0], [1.0]], rows, [[1.0], [1.0]]], axis=1)
    if h > 0:  # keep the events 1e-6 away from the edges (else they split in half)
        far = np.min(np.abs(values[:, None] - NON_UNIFORM[None, :]), axis=1) > 1e-6
        values, rows = values[far], rows[:, far]
    y, w, e = tensors("cpu", torch.float64, values, rows, NON_UNIFORM)
    got = kde_histogram(y, w, e, h)
    for i in range(2):
        hard = hard_histogram(y, w[i], e)
        np.testing.assert_allclose(got.yields[i], hard.yields, rtol=1e-12)
        np.testing.assert_allclose(got.sumw2[i], hard.sumw2, rtol=1e-12)


@pytest.mark.parametrize("h", [0.1, 0.6])
def test_gradcheck_sorted(h, monkeypatch):
    """gradcheck on sorted values with bins of one chunk and a run of small bins."""
    monkeypatch.setattr(histograms, "_KDE_MIN_BIN_EVENTS", 4)
    rng = np.random.default_rng(25)
    values = np.sort(np.concatenate([rng.uniform(-0.25, -0.05, 6), rng.uniform(-2.5, 3.5, 12)]))
    weights = rng.normal(1.0, 0.6, (2, values.size))
    inputs = tensors("cpu", torch.float64, values, weights, NON_UNIFORM[:6], h)
    for t in inputs:
        t.requires_grad_()

    def f(y, w, e, bw):
        out = kde_histogram(y, w, e, bw)
        return out.yields, out.sumw2

    assert torch.autograd.gradcheck(f, inputs)


def test_kde_histograms_groups_equal_separate_calls(monkeypatch):
    """Several groups in one call (sorted, unsorted, 1-D and 2-D weights, a single event)
    give each group's kde_histogram, values and gradients."""
    monkeypatch.setattr(histograms, "_KDE_MIN_BIN_EVENTS", 64)
    sorted_values, sorted_rows = sorted_sample(26, UNIFORM)
    unsorted_values, unsorted_weights = sample(3000, 27)
    data = [
        (sorted_values, sorted_rows),
        (unsorted_values, unsorted_weights),
        (np.array([0.31]), np.array([[2.0], [3.0], [-1.0]])),
        (np.sort(unsorted_values[:500]), unsorted_weights[:500]),
    ]
    groups = []
    for values, weights in data:
        y, w = tensors("cpu", torch.float64, values, weights)
        groups.append((y, w.requires_grad_()))
    e = torch.tensor(UNIFORM, dtype=torch.float64)
    together = kde_histograms(groups, e, 0.3)
    separate = [kde_histogram(y, w, e, 0.3) for y, w in groups]
    weights = [w for _, w in groups]
    losses = [
        sum((k + 1.0) * (h.yields**2).sum() + h.sumw2.sum() for k, h in enumerate(hists))
        for hists in (together, separate)
    ]
    for a, b in zip(together, separate, strict=True):
        assert a.yields.shape == b.yields.shape and a.edges is e
        torch.testing.assert_close(a.yields, b.yields, rtol=1e-14, atol=0)
        torch.testing.assert_close(a.sumw2, b.sumw2, rtol=1e-14, atol=0)
    grads = [torch.autograd.grad(loss, weights) for loss in losses]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    assert kde_histograms([], e, 0.3) == []
    with pytest.raises(ValueError, match="one dtype"):
        kde_histograms([groups[0], (groups[1][0].float(), groups[1][1])], e, 0.3)


def layout_groups(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sorted and unsorted groups, 2-D and 1-D weights (as kde_histograms takes them)."""
    sorted_values, sorted_rows = sorted_sample(seed, UNIFORM)
    unsorted_values, unsorted_weights = sample(2000, seed + 1)
    data = [(sorted_values, sorted_rows), (unsorted_values, unsorted_weights)]
    return [tuple(tensors("cpu", torch.float64, v, w)) for v, w in data]


def test_layout_keeps_kernels_bitwise(monkeypatch):
    """A KDELayout filled by the first call: later calls with other weights evaluate no kernel
    (forward and backward) and give bitwise the values and weight gradients of calls without
    it, on sorted and unsorted groups; other events are refused."""
    monkeypatch.setattr(histograms, "_KDE_MIN_BIN_EVENTS", 64)
    evaluations = []
    for method in ("erfc_rows", "mass"):
        original = getattr(histograms._KDEWindow, method)

        def counted(self, *args, _original=original, **kwargs):
            evaluations.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(histograms._KDEWindow, method, counted)
    e = torch.tensor(UNIFORM, dtype=torch.float64)
    layout = histograms.KDELayout()
    groups = layout_groups(31)
    up = torch.linspace(-1.0, 2.0, UNIFORM.size - 1, dtype=torch.float64)
    for scale in (1.0, 0.5, 2.0):  # other weights each call, the same values
        weighted = [(y, (w * scale).requires_grad_()) for y, w in groups]
        results = []
        for kept in (layout, None):
            before = len(evaluations)
            hists = kde_histograms(weighted, e, 0.36, layout=kept)
            loss = sum((h.yields * up).sum() + (h.sumw2 * up.flip(0)).sum() for h in hists)
            grads = torch.autograd.grad(loss, [w for _, w in weighted])
            if kept is not None and scale != 1.0:
                assert len(evaluations) == before, "a filled layout evaluated a kernel"
            results.append([t for h in hists for t in (h.yields, h.sumw2)] + list(grads))
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)
    assert layout.filled and layout.keep_kernels
    with pytest.raises(ValueError, match="other events"):
        kde_histograms(groups[:1], e, 0.36, layout=layout)


def factor_case(seed: int, factor_seed: int) -> tuple:
    """Non-uniform edges, the groups of :func:`layout_groups`, a factor in [0, 1) per event of
    each group, and a weight per bin for a loss."""
    e = torch.tensor(NON_UNIFORM, dtype=torch.float64)
    groups = layout_groups(seed)
    rng = np.random.default_rng(factor_seed)
    factors = [torch.tensor(rng.uniform(0.0, 1.0, y.shape[0])) for y, _ in groups]
    up = torch.linspace(0.5, 2.0, NON_UNIFORM.size - 1, dtype=torch.float64)
    return e, groups, factors, up


def test_factors_equal_products():
    """kde_histograms(groups, factors=...) equals the histograms of weights * factor (formed
    outside): values to 1e-14, and the gradients of the factors and of the weights equal
    autograd through the products to 1e-12."""
    e, groups, factors, up = factor_case(33, 5)
    results = []
    for fused in (True, False):
        weights = [w.clone().requires_grad_() for _, w in groups]
        fs = [f.clone().requires_grad_() for f in factors]
        if fused:
            hists = kde_histograms(
                [(y, w) for (y, _), w in zip(groups, weights, strict=True)], e, 0.4, factors=fs
            )
        else:
            hists = kde_histograms(
                [(y, w * f) for (y, _), w, f in zip(groups, weights, fs, strict=True)], e, 0.4
            )
        loss = sum((h.yields**2 * up).sum() - (h.sumw2 * up).sum() for h in hists)
        grads = torch.autograd.grad(loss, weights + fs)
        results.append(([t.detach() for h in hists for t in (h.yields, h.sumw2)], grads))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * b.abs().max().item())
    with pytest.raises(ValueError, match="shape and dtype"):
        kde_histograms(groups, e, 0.4, factors=[factors[0][:-1], None])


@pytest.mark.parametrize("h", [0.0, 0.36, 1.5])
def test_sumw2_rows_leave_out_sums_of_squares(h, monkeypatch):
    """``sumw2_rows``: the sums of squares of a group's first S rows only (S = 1 of a sorted
    group of 2 rows, 0 of an unsorted 1-D group; with factors). Yields equal those of the
    call with all rows to 1e-13, the kept sums of squares too (the per-bin matrix products
    have other widths, and the BLAS kernel, chosen by width and memory alignment, may sum in
    another order: once 4.9e-14 in a full run on an AVX-512 machine, where the file alone
    passes at 1e-14), the others are not returned (None for 1-D
    weights); the gradients of the weights and factors of a loss of what is returned equal the
    full call's to 1e-12. A layout filled for other rows is refused."""
    monkeypatch.setattr(histograms, "_KDE_MIN_BIN_EVENTS", 64)
    e, groups, factors, up = factor_case(35, 9)
    results = []
    for rows in ([1, 0], None):
        weights = [w.clone().requires_grad_() for _, w in groups]
        fs = [f.clone().requires_grad_() for f in factors]
        pairs = [(y, w) for (y, _), w in zip(groups, weights, strict=True)]
        sorted_hist, unsorted_hist = kde_histograms(pairs, e, h, factors=fs, sumw2_rows=rows)
        if rows is not None:
            assert sorted_hist.sumw2.shape == (1, NON_UNIFORM.size - 1)
            assert unsorted_hist.sumw2 is None
        kept = sorted_hist.sumw2[0]
        loss = (sorted_hist.yields**2 * up).sum() + (unsorted_hist.yields * up).sum()
        loss = loss - (kept * up.flip(0)).sum()
        grads = torch.autograd.grad(loss, weights + fs)
        results.append(([sorted_hist.yields, unsorted_hist.yields, kept], grads))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        np.testing.assert_allclose(a.detach(), b.detach(), rtol=1e-13, atol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * b.abs().max().item())
    for bad in ([3, 0], [1], [-1, 0], [1.0, 0]):
        with pytest.raises(ValueError, match="sumw2_rows"):
            kde_histograms(groups, e, h, sumw2_rows=bad)
    layout = histograms.KDELayout()
    kde_histograms(groups, e, 0.36, layout=layout, sumw2_rows=[1, 0])
    with pytest.raises(ValueError, match="other events"):
        kde_histograms(groups, e, 0.36, layout=layout)


@pytest.mark.parametrize("h", [0.05, 0.36, 1.5])
def test_ascending_hint_equals_dense(h, monkeypatch):
    """``ascending=True`` (the order taken as given, as the pipeline passes it for its sorted
    observables), ``None`` (checked) and ``False`` (the unsorted path) on two sorted groups with
    non-uniform edges: values equal the dense op to 1e-12 and weight gradients to 1e-10; the
    hint skips the order check and nothing else (bitwise the checked result)."""
    monkeypatch.setattr(histograms, "_KDE_MIN_BIN_EVENTS", 64)
    values, rows = sorted_sample(28, NON_UNIFORM)
    y, w, e = tensors("cpu", torch.float64, values, rows, NON_UNIFORM)
    tail = slice(9000, None)  # the second group: the sparse tail only, one weight row
    groups = [(y, w.requires_grad_()), (y[tail], w[0, tail].detach().clone().requires_grad_())]
    weights = [weights for _, weights in groups]
    up = torch.linspace(-1.0, 2.0, NON_UNIFORM.size - 1, dtype=torch.float64)

    def flat(hists):  # (yields, sumw2) of each weight row: both rows of group 0, then group 1
        pairs = [(h0.yields[i], h0.sumw2[i]) for h0 in hists[:1] for i in range(2)]
        return pairs + [(hists[1].yields, hists[1].sumw2)]

    def loss_of(pairs):
        return sum((n * up).sum() + (s2 * up.flip(0)).sum() for n, s2 in pairs)

    dense = [kde_histogram_dense(y, w[i], e, h) for i in range(2)]
    dense.append(kde_histogram_dense(y[tail], groups[1][1], e, h))
    dense_pairs = [(ref.yields, ref.sumw2) for ref in dense]
    dense_grads = torch.autograd.grad(loss_of(dense_pairs), weights)
    truncation = 1.3e-15 * float((w.abs() + w.square()).sum().detach())
    results = {}
    for ascending in (True, None, False):
        pairs = flat(kde_histograms(groups, e, h, ascending=ascending))
        # a near-empty bin may differ by the truncation, 2 Q(8) sum |w| (kde_histogram)
        for (n, s2), (n_ref, s2_ref) in zip(pairs, dense_pairs, strict=True):
            np.testing.assert_allclose(n.detach(), n_ref.detach(), rtol=1e-12, atol=truncation)
            np.testing.assert_allclose(s2.detach(), s2_ref.detach(), rtol=1e-12, atol=truncation)
        grads = torch.autograd.grad(loss_of(pairs), weights)
        weights_gradients_close(grads, dense_grads, rtol=1e-10)
        results[ascending] = [t.detach() for pair in pairs for t in pair] + list(grads)
    for a, b in zip(results[True], results[None], strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the pipeline
@pytest.mark.parametrize("knobs", [(0.3, 0.5), (0.02, 0.05)], ids=["initial", "final"])
def test_pipeline_histograms_equal_log_space_dense_reference(toy, tmp_path, knobs):
    """AnalysisPipeline.histograms (product of sigmoids over one autograd node per region,
    events in reach only, kde_histograms on sorted groups) against the straightforward
    reference: every event, weight * exp(sum_k log_soft_cut) and kde_histogram_dense per
    template. Values to 1e-12 relative, the gradient of a loss of every template with respect
    to the cut parameters to 1e-10. Two calls at different thresholds (the second with the
    kernel values kept by the first, KDELayout)."""
    config = config_module.from_dict(toy.config, source="toy.yaml")
    events = read_events(config, cache_dir=tmp_path / "cache")
    pipeline = AnalysisPipeline.from_config(config, events)
    tau, bandwidth = knobs
    # twice: the second call, at other thresholds, takes the kernel values that the first kept
    check_pipeline_histograms(pipeline, config, events, tau, bandwidth)
    moved = {
        cut.name: cut.value + 0.1 * (cut.bounds[1] - cut.value)
        for cut in config.cuts
        if cut.trainable
    }
    pipeline.set_cut_values(moved)
    check_pipeline_histograms(pipeline, config, events, tau, bandwidth)
    assert len(pipeline._kde_layouts) == len(config.regions)


def check_pipeline_histograms(pipeline, config, events, tau, bandwidth):
    region = config.regions[0]
    edges = torch.tensor(region.binning, dtype=torch.float64)
    h = bandwidth * float(torch.diff(edges).min())
    thresholds = pipeline.thresholds()
    taus = pipeline.temperatures(tau)
    reference = {}
    for key, ev in events.items():
        cuts = [
            SoftCut(ev.columns[cut.variable], thresholds[k], taus[k], cut.direction)
            for k, cut in enumerate(region.cuts)
        ]
        w = ev.weight * torch.exp(log_selection_weight(cuts))
        reference[key] = kde_histogram_dense(ev.observable, w, edges, h)
    got = pipeline.histograms(tau, bandwidth)
    assert got.keys() == reference.keys()
    for key, ref in reference.items():
        for field in ("yields", "sumw2"):
            a, b = getattr(got[key], field).detach(), getattr(ref, field).detach()
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * b.abs().max().item())

    def loss(hists):
        return sum(
            (k + 1.0) * (h.yields**2).sum() / (h.sumw2.sum() + 1.0)
            for k, h in enumerate(hists[key] for key in sorted(hists))
        )

    (g_got,) = torch.autograd.grad(loss(got), pipeline.cut_parameters)
    (g_ref,) = torch.autograd.grad(loss(reference), pipeline.cut_parameters)
    assert bool((g_ref != 0).all())
    np.testing.assert_allclose(g_got, g_ref, rtol=1e-10)


def test_pipeline_keeps_one_smoothing_and_one_hard_layout_per_region(toy, tmp_path):
    """Per region the pipeline keeps the KDE layout of the last smoothing bandwidth and of the
    hard histograms (bandwidth 0): a new smoothing bandwidth (the next level of an annealed
    run) replaces the old one, whose kernel values are dropped, and leaves the hard one; a
    layout is reused by later calls at its bandwidth (the same object)."""
    config = config_module.from_dict(toy.config, source="toy.yaml")
    pipeline = AnalysisPipeline.from_config(config, read_events(config, cache_dir=tmp_path))
    regions = range(len(config.regions))
    with torch.no_grad():
        pipeline.histograms(0.3, 0.36)
        first = dict(pipeline._kde_layouts)
        pipeline.histograms(0.0, 0.0)
        pipeline.histograms(0.3, 0.36)
        assert all(pipeline._kde_layouts[key] is layout for key, layout in first.items())
        pipeline.histograms(0.3, 0.2)
    assert set(pipeline._kde_layouts) == {(r, b, True) for r in regions for b in (0.2, 0.0)}
    assert all(layout.filled for layout in pipeline._kde_layouts.values())
