"""Soft cuts against numpy, their boolean limit, float32 stability, gradcheck, temperatures; the
product-of-sigmoids selection (selection_weight, selection_weights) against the log-space
reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.errors import DataError
from analysis.selection import (
    SoftCut,
    column_spread,
    cut_temperature,
    log_selection_weight,
    log_soft_cut,
    log_soft_window,
    selection_weight,
    selection_weights,
    soft_cut,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIGN = {">": 1.0, "<": -1.0}


def np_log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", [">", "<"])
@pytest.mark.parametrize("tau", [0.05, 1.0, 20.0])
def test_log_soft_cut_equals_numpy(device, direction, tau):
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 3.0, 2000)
    threshold = 0.7
    expected = np_log_sigmoid(SIGN[direction] * (x - threshold) / tau)
    for dtype, rtol in [(torch.float64, 1e-12), (torch.float32, 2e-5)]:
        xt = torch.tensor(x, dtype=dtype, device=device)
        for tau_arg in (tau, torch.tensor(tau, dtype=dtype, device=device)):
            got = log_soft_cut(xt, threshold, tau_arg, direction)
            assert got.dtype == dtype and got.device.type == device
            np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=rtol, atol=1e-30)
            np.testing.assert_allclose(
                soft_cut(xt, threshold, tau_arg, direction).cpu().numpy(),
                np.exp(expected),
                rtol=rtol,
                atol=1e-30,
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", [">", "<"])
def test_tiny_tau_is_the_boolean_cut(device, direction):
    rng = np.random.default_rng(2)
    x = rng.normal(10.0, 5.0, 5000)
    x = x[np.abs(x - 10.0) > 1e-6]  # away from the threshold
    passed = x > 10.0 if direction == ">" else x < 10.0
    xt = torch.tensor(x, dtype=torch.float64, device=device)
    weight = soft_cut(xt, 10.0, 1e-9, direction).cpu().numpy()
    np.testing.assert_array_equal(weight, passed.astype(float))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", [">", "<"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_tau_is_the_strict_boolean_cut(device, direction, dtype):
    x = torch.tensor([-3.0, 1.0, 1.5, 2.0, 7.0], dtype=dtype, device=device, requires_grad=True)
    threshold = torch.tensor(1.5, dtype=dtype, device=device, requires_grad=True)
    expected = (x > 1.5) if direction == ">" else (x < 1.5)  # x == c fails either way
    for tau in (0.0, torch.tensor(0.0, dtype=dtype, device=device, requires_grad=True)):
        logw = log_soft_cut(x, threshold, tau, direction)
        assert torch.equal(logw == 0, expected) and torch.all(torch.isneginf(logw[~expected]))
        grads = torch.autograd.grad(
            torch.exp(logw).sum(), [x, threshold] + ([tau] if torch.is_tensor(tau) else [])
        )
        assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_tau_mixing_hard_and_soft_broadcasts(device):
    x = torch.linspace(-2, 2, 9, dtype=torch.float64, device=device, requires_grad=True)
    tau = torch.tensor([[0.0], [0.5]], dtype=torch.float64, device=device, requires_grad=True)
    logw = log_soft_cut(x, 0.0, tau, ">")
    assert logw.shape == (2, 9)
    assert torch.equal(torch.exp(logw[0]), (x > 0).to(torch.float64))
    torch.testing.assert_close(logw[1], torch.nn.functional.logsigmoid(x / 0.5))
    gx, gtau = torch.autograd.grad(torch.exp(logw).sum(), [x, tau])
    assert torch.all(torch.isfinite(gx)) and torch.all(torch.isfinite(gtau))
    assert gtau[0].item() == 0.0 and gtau[1].item() != 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", [">", "<"])
def test_float32_steep_slope_gives_finite_useful_gradients(device, direction):
    # slope 1/tau = 1e6 in float32: 1 / (1 + exp(-z)) written by hand gives NaN gradients here
    c0 = 0.5
    offsets = torch.tensor([-1e3, -1.0, -3e-6, -1e-6, 0.0, 1e-6, 3e-6, 1.0, 1e3])
    x = (c0 + offsets.double()).float().to(device).requires_grad_()
    threshold = torch.nn.Parameter(torch.tensor(c0, device=device))
    tau = torch.tensor(1e-6, device=device, requires_grad=True)
    logw = log_soft_cut(x, threshold, tau, direction)
    assert torch.all(torch.isfinite(logw))
    for loss in (torch.exp(logw).sum(), logw.sum()):
        gx, gc, gtau = torch.autograd.grad(loss, [x, threshold, tau], retain_graph=True)
        for g in (gx, gc, gtau):
            assert torch.all(torch.isfinite(g))
        assert gc.item() != 0.0 and gtau.item() != 0.0
        near = (x - threshold).abs() < 5e-6
        assert torch.all(gx[near] != 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", [">", "<"])
def test_gradcheck_log_soft_cut(device, direction):
    rng = np.random.default_rng(3)
    kw = {"dtype": torch.float64, "device": device, "requires_grad": True}
    x = torch.tensor(rng.normal(0, 1, 12), **kw)
    threshold = torch.tensor(0.2, **kw)
    tau = torch.tensor(0.3, **kw)
    assert torch.autograd.gradcheck(lambda *a: log_soft_cut(*a, direction), (x, threshold, tau))
    assert torch.autograd.gradcheck(
        lambda *a: log_soft_window(*a), (x, threshold - 0.5, threshold + 0.4, tau)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_window_equals_product_of_sigmoids(device):
    rng = np.random.default_rng(4)
    x = rng.uniform(-5, 5, 3000)
    low, high, tau = -1.0, 2.0, 0.4
    expected = np_log_sigmoid((x - low) / tau) + np_log_sigmoid((high - x) / tau)
    got = log_soft_window(torch.tensor(x, device=device), low, high, tau)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-12)
    edges = torch.tensor([-3.0, -1.0, 0.0, 2.0, 4.0], dtype=torch.float64, device=device)
    hard = torch.exp(log_soft_window(edges, low, high, 0.0)).cpu()
    torch.testing.assert_close(hard, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_selection_product_in_log_space(device):
    rng = np.random.default_rng(5)
    n = 4000
    columns = {
        "pt": rng.exponential(30, n),
        "met": rng.exponential(40, n),
        "iso": rng.uniform(0, 1, n),
    }
    spec = [("pt", 25.0, 5.0, ">"), ("met", 60.0, 10.0, "<"), ("iso", 0.2, 0.05, "<")]
    expected_product = np.prod(
        [1.0 / (1.0 + np.exp(-SIGN[d] * (columns[v] - c) / t)) for v, c, t, d in spec], axis=0
    )
    cuts = [SoftCut(torch.tensor(columns[v], device=device), c, t, d) for v, c, t, d in spec]
    logw = log_selection_weight(cuts)
    np.testing.assert_allclose(torch.exp(logw).cpu().numpy(), expected_product, rtol=1e-12)
    # far on the wrong side of every cut the product underflows; the log-weight stays exact
    far = [
        (torch.tensor([-1e4], dtype=torch.float64, device=device), 0.0, 1.0, ">"),
        (torch.tensor([1e4], dtype=torch.float64, device=device), 0.0, 1.0, "<"),
    ]
    torch.testing.assert_close(
        log_selection_weight(far).cpu(), torch.tensor([-2e4], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="no cuts"):
        log_selection_weight([])


def test_bad_arguments_are_rejected():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="direction"):
        log_soft_cut(x, 0.0, 1.0, ">=")
    with pytest.raises(ValueError, match="tau"):
        log_soft_cut(x, 0.0, -1.0, ">")
    with pytest.raises(ValueError, match="tau"):
        log_soft_cut(x, 0.0, float("nan"), ">")
    with pytest.raises(ValueError, match="tau_relative"):
        cut_temperature(x, None, -0.1)
    with pytest.raises(DataError):
        column_spread(torch.full((4,), float("nan")), None)
    with pytest.raises(DataError):
        column_spread(torch.ones(4), torch.zeros(4))


def np_weighted_quantile(x, w, q):
    return np.quantile(x, q, weights=w, method="inverted_cdf")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cut_temperature_against_numpy(device, dtype):
    rng = np.random.default_rng(6)
    x = rng.exponential(30.0, 10001)
    w = rng.uniform(0.5, 1.5, x.size) * np.where(rng.uniform(size=x.size) < 0.1, -1.0, 1.0)
    q25, q75 = np_weighted_quantile(x, np.abs(w), [0.25, 0.75])
    expected = 0.1 * (q75 - q25) / 1.3489795003921634
    xt, wt = (
        torch.tensor(x, dtype=dtype, device=device),
        torch.tensor(w, dtype=dtype, device=device),
    )
    got = cut_temperature(xt, wt, 0.1)
    assert got.dtype == dtype and got.device.type == device and got.ndim == 0
    np.testing.assert_allclose(got.item(), expected, rtol=1e-12 if dtype == torch.float64 else 1e-6)
    # unweighted, with NaN ignored
    x_nan = np.concatenate([x, [np.nan]])
    q25, q75 = np.quantile(x, [0.25, 0.75], method="inverted_cdf")
    np.testing.assert_allclose(
        column_spread(torch.tensor(x_nan, device=device), None).item(),
        (q75 - q25) / 1.3489795003921634,
        rtol=1e-12,
    )
    # gradient flows through tau_relative only
    tau_rel = torch.tensor(0.2, dtype=dtype, device=device, requires_grad=True)
    (grad,) = torch.autograd.grad(cut_temperature(xt, wt, tau_rel), [tau_rel])
    np.testing.assert_allclose(grad.item(), expected / 0.1, rtol=1e-6)


def test_cut_temperature_fallbacks_are_positive():
    rng = np.random.default_rng(7)
    # isolation-like: 85% of the events at exactly 0 -> IQR = 0 -> weighted standard deviation
    iso = np.where(rng.uniform(size=5000) < 0.85, 0.0, rng.exponential(0.1, 5000))
    w = rng.uniform(0.5, 2.0, iso.size)
    mean = np.average(iso, weights=w)
    std = np.sqrt(np.average((iso - mean) ** 2, weights=w))
    got = cut_temperature(torch.tensor(iso), torch.tensor(w), 1.0).item()
    np.testing.assert_allclose(got, std, rtol=1e-12)
    # constant column -> its absolute value; constant zero -> 1; integer column -> float64
    assert cut_temperature(torch.full((10,), -4.0), None, 0.5).item() == 2.0
    assert cut_temperature(torch.zeros(10), torch.ones(10), 0.5).item() == 0.5
    counts = cut_temperature(torch.tensor([2, 2, 2, 3, 4, 5]), None, 1.0)
    assert counts.dtype == torch.float64 and counts.item() > 0


# ----------------------------------------------------------------------------- selection_weight
SPEC = [("pt", 25.0, ">"), ("met", 60.0, "<"), ("iso", 0.2, "<"), ("eta", -1.0, ">")]


def selection_columns(n: int, seed: int, device="cpu", dtype=torch.float64) -> dict:
    rng = np.random.default_rng(seed)
    columns = {
        "pt": rng.exponential(30, n),
        "met": rng.exponential(40, n),
        "iso": rng.uniform(0, 1, n),
        "eta": rng.normal(0, 2, n),
    }
    return {k: torch.tensor(v, dtype=dtype, device=device) for k, v in columns.items()}


def reference_weight(columns, thresholds, taus):
    """exp(sum_k log_soft_cut): the straightforward log-space selection (plain autograd)."""
    cuts = [
        SoftCut(columns[name], thresholds[k], taus[k], d) for k, (name, _, d) in enumerate(SPEC)
    ]
    return torch.exp(log_selection_weight(cuts))


def fast_weight(columns, thresholds, taus):
    cuts = [
        SoftCut(columns[name], thresholds[k], taus[k], d) for k, (name, _, d) in enumerate(SPEC)
    ]
    return selection_weight(cuts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relative", [0.5, 0.02, 1e-3], ids=["initial", "final", "steep"])
@pytest.mark.parametrize("tensor_tau", [False, True], ids=["float-tau", "tensor-tau"])
def test_selection_weight_equals_log_space_reference(device, relative, tensor_tau):
    """Values to 1e-12 and gradients (thresholds, temperatures, columns) to 1e-10 relative of
    exp(sum_k logsigmoid) with plain autograd, from wide to steep temperatures."""
    columns = selection_columns(20000, 11, device)
    for x in columns.values():
        x.requires_grad_()
    spreads = {"pt": 20.0, "met": 30.0, "iso": 0.25, "eta": 2.0}
    thresholds = torch.tensor([c for _, c, _ in SPEC], dtype=torch.float64, device=device)
    thresholds.requires_grad_()
    taus = [relative * spreads[name] for name, _, _ in SPEC]
    if tensor_tau:
        taus = torch.tensor(taus, dtype=torch.float64, device=device, requires_grad=True)
    gen = torch.Generator(device=device).manual_seed(5)
    upstream = torch.rand(20000, dtype=torch.float64, device=device, generator=gen) - 0.3
    inputs = [thresholds, *columns.values()] + ([taus] if tensor_tau else [])
    got = fast_weight(columns, thresholds.unbind(), list(taus.unbind()) if tensor_tau else taus)
    ref = reference_weight(columns, thresholds.unbind(), taus if not tensor_tau else taus.unbind())
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-300)
    got_grads = torch.autograd.grad((got * upstream).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), inputs)
    for g, r in zip(got_grads, ref_grads, strict=True):
        scale = r.abs().max().item()
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_selection_weight_hard_limit_and_mixed_temperatures(device):
    """tau = 0 (number or tensor element) is the strict boolean cut with zero gradient; mixed
    hard and soft cuts equal the log-space reference. The path for hard cuts not known on the
    host (a device tensor tau) is exercised on CPU too, through the autograd Function."""
    from analysis.selection import _SelectionWeight

    columns = selection_columns(5000, 12, device)
    columns["pt"][:5] = 25.0  # on the threshold: fails the strict cut
    thresholds = torch.tensor([c for _, c, _ in SPEC], dtype=torch.float64, device=device)
    thresholds.requires_grad_()
    hard = fast_weight(columns, thresholds.unbind(), [0.0] * 4)
    boolean = (
        (columns["pt"] > 25.0)
        & (columns["met"] < 60.0)
        & (columns["iso"] < 0.2)
        & (columns["eta"] > -1.0)
    )
    assert torch.equal(hard, boolean.to(torch.float64))
    (grad,) = torch.autograd.grad(hard.sum(), thresholds)
    assert torch.all(grad == 0)
    taus = torch.tensor([0.0, 5.0, 0.0, 0.3], dtype=torch.float64, device=device)
    taus.requires_grad_()
    got = fast_weight(columns, thresholds.unbind(), list(taus.unbind()))
    ref = reference_weight(columns, thresholds.unbind(), taus.unbind())
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    g_got = torch.autograd.grad(got.sum(), [thresholds, taus])
    g_ref = torch.autograd.grad(ref.sum(), [thresholds, taus])
    for g, r in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)
    # the branch for hard cuts unknown on the host: where(soft, sigmoid, step) per cut
    soft = taus.detach() > 0
    slopes = torch.where(soft, torch.tensor([1.0, -1.0, -1.0, 1.0]).to(taus) / taus.detach(), 0.0)
    cols = [columns[name] for name, _, _ in SPEC]
    (unknown,) = _SelectionWeight.apply(
        thresholds.detach(), slopes, soft, (None,) * 4, (1.0, -1.0, -1.0, 1.0), *cols
    )
    torch.testing.assert_close(unknown, got.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_selection_weights_of_several_sets_equal_separate_calls(device):
    sizes = ((3000, 1), (17, 2), (1, 3), (0, 4))  # a set without events too
    sets = [selection_columns(n, seed, device) for n, seed in sizes]
    thresholds = torch.tensor([c for _, c, _ in SPEC], dtype=torch.float64, device=device)
    thresholds.requires_grad_()
    taus = [5.0, 10.0, 0.05, 0.0]
    got = selection_weights(
        [[s[name] for name, _, _ in SPEC] for s in sets],
        list(thresholds.unbind()),
        taus,
        [d for _, _, d in SPEC],
    )
    separate = [fast_weight(s, thresholds.unbind(), taus) for s in sets]
    for a, b in zip(got, separate, strict=True):
        assert torch.equal(a, b)
    (g_got,) = torch.autograd.grad(sum((w * (k + 1)).sum() for k, w in enumerate(got)), thresholds)
    (g_sep,) = torch.autograd.grad(
        sum((w * (k + 1)).sum() for k, w in enumerate(separate)), thresholds
    )
    torch.testing.assert_close(g_got, g_sep, rtol=1e-14, atol=0)
    assert selection_weights([], [0.0], [1.0], [">"]) == []
    with pytest.raises(ValueError, match="no cuts"):
        selection_weights([[]], [], [], [])
    with pytest.raises(ValueError, match="one threshold"):
        selection_weights([[sets[0]["pt"]]], [1.0, 2.0], [1.0], [">"])
    with pytest.raises(ValueError, match="one shape"):
        selection_weights([[sets[0]["pt"], sets[1]["pt"]]], [1.0, 1.0], [1.0, 1.0], [">", ">"])
    with pytest.raises(ValueError, match="tau"):
        selection_weight([SoftCut(sets[0]["pt"], 1.0, -1.0, ">")])
    with pytest.raises(ValueError, match="one threshold per cut"):
        selection_weight([SoftCut(sets[0]["pt"], torch.zeros(2), 1.0, ">")])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_selection_weights(device):
    rng = np.random.default_rng(13)
    kw = {"dtype": torch.float64, "device": device, "requires_grad": True}
    a = [torch.tensor(rng.normal(0, 1, 9), **kw) for _ in range(3)]
    b = [torch.tensor(rng.normal(0, 1, 4), **kw) for _ in range(3)]
    thresholds = torch.tensor([0.1, -0.2, 0.3], **kw)
    taus = torch.tensor([0.5, 0.3, 0.7], **kw)

    def f(thresholds, taus, *columns):
        return tuple(
            selection_weights(
                [columns[:3], columns[3:]],
                list(thresholds.unbind()),
                list(taus.unbind()),
                [">", "<", ">"],
            )
        )

    assert torch.autograd.gradcheck(f, (thresholds, taus, *a, *b))


@pytest.mark.parametrize("device", DEVICES)
def test_selection_weight_float32_steep_slope_is_finite(device):
    c0 = 0.5
    offsets = torch.tensor([-1e3, -1.0, -3e-6, -1e-6, 0.0, 1e-6, 3e-6, 1.0, 1e3])
    x = (c0 + offsets.double()).float().to(device).requires_grad_()
    threshold = torch.tensor(c0, device=device, requires_grad=True)
    tau = torch.tensor(1e-6, device=device, requires_grad=True)
    for direction in (">", "<"):
        w = selection_weight([SoftCut(x, threshold, tau, direction)])
        assert w.dtype == torch.float32 and torch.all(torch.isfinite(w))
        grads = torch.autograd.grad(w.sum(), [x, threshold, tau])
        assert all(torch.all(torch.isfinite(g)) for g in grads)
        assert grads[1].item() != 0.0 and grads[2].item() != 0.0
