"""Statistics engine against pyhf 0.7.6 (numpy backend, scipy optimizer) in the same process.

    python benchmarks/bench_stats.py [--device cpu|cuda] [--quick]

Prints one JSON object with, for each case, our time, pyhf's time, the ratio (pyhf / ours) and
how well the numbers agree with pyhf's:

(a) the 2-bin pyhf example: one qtilde hypotest at mu = 1 (5 fits on either side);
(b) a generated model of 50 channels x 10 bins with ~300 parameters (every modifier type): one
    maximum-likelihood fit;
(c) 1,000 qtilde hypotests at mu = 1 of one model (a 10-bin resonance search, 14 parameters)
    with 1,000 different signals: on our side one batched call (``Model.with_sample_yields``
    with a (1000, 10) tensor of signal templates), pyhf a loop over models built per signal,
    timed on a subset and scaled linearly;
(d) 10,000 toys of the same model (one signal), drawn at the background-only fit: the free and
    the mu = 1 fits of all toys (q~_mu per toy), one batched call each on our side; pyhf's toy
    calculator fails on numpy >= 2.4, so pyhf fits the same toy datasets in a loop (a subset,
    scaled linearly).

Our side runs under ``torch.no_grad()`` (the fits take their own derivatives; in grad mode the
inference functions add an implicit-function step per fit for gradients, reported for (a)),
after one warm-up, with 1 and 2 intra-op threads on CPU (1 only for (b)); the faster is
reported, with its thread count. Times are the best of up to 3 runs; pyhf's subsets are timed
once after a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import numpy as np
import pyhf
import torch
from scipy.special import ndtr

from analysis import inference
from analysis.fit import newton_minimize
from analysis.likelihood import Workspace

warnings.filterwarnings("ignore", category=DeprecationWarning)


THREADS = (1, 2)


def timed(func, repeat: int = 3, sync: bool = False, warmup: bool = True):
    """Best wall time of ``repeat`` calls (after one warm-up call) and the last result."""
    result = func() if warmup else None
    best = math.inf
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = func()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def timed_ours(func, device: torch.device, repeat: int = 3, threads=THREADS):
    """Our side: under no_grad, warmed up, timed with each intra-op thread count (CPU).

    Returns (best time, its thread count, {threads: time}, last result)."""
    sync = device.type == "cuda"
    counts = threads if device.type == "cpu" else (torch.get_num_threads(),)
    default = torch.get_num_threads()
    by_threads, result = {}, None
    try:
        for i, n in enumerate(counts):
            torch.set_num_threads(n)
            with torch.no_grad():
                by_threads[n], result = timed(func, repeat, sync=sync, warmup=i == 0)
    finally:
        torch.set_num_threads(default)
    best = min(by_threads, key=by_threads.get)
    return by_threads[best], best, {str(n): t for n, t in by_threads.items()}, result


def ours_fields(t: float, threads: int, by_threads: dict) -> dict:
    return {"ours_s": t, "ours_threads": threads, "ours_s_by_threads": by_threads}


def two_bin_spec() -> dict:
    return {
        "channels": [
            {
                "name": "singlechannel",
                "samples": [
                    {
                        "name": "signal",
                        "data": [12.0, 11.0],
                        "modifiers": [{"name": "mu", "type": "normfactor", "data": None}],
                    },
                    {
                        "name": "background",
                        "data": [50.0, 52.0],
                        "modifiers": [
                            {"name": "uncorr_bkguncrt", "type": "shapesys", "data": [3.0, 7.0]}
                        ],
                    },
                ],
            }
        ],
        "observations": [{"name": "singlechannel", "data": [51.0, 48.0]}],
        "measurements": [{"name": "Measurement", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }


def large_spec(n_channels: int = 50, n_bins: int = 10, seed: int = 0) -> dict:
    """50 x 10 bins; normfactor, lumi, normsys, histosys, staterror, shapesys, shapefactor."""
    rng = np.random.default_rng(seed)
    channels, observations = [], []
    for c in range(n_channels):
        background = rng.uniform(50, 150, n_bins)
        signal = 20 * np.exp(-0.5 * ((np.arange(n_bins) - rng.uniform(2, 7)) / 1.5) ** 2)
        bkg_mods = [
            {"name": "lumi", "type": "lumi", "data": None},
            {"name": f"norm_{c % 30}", "type": "normsys", "data": {"hi": 1.05, "lo": 0.94}},
            {
                "name": f"shape_{c % 30}",
                "type": "histosys",
                "data": {
                    "hi_data": (background * rng.uniform(1.0, 1.08, n_bins)).tolist(),
                    "lo_data": (background * rng.uniform(0.92, 1.0, n_bins)).tolist(),
                },
            },
        ]
        if c < 20:
            bkg_mods.append(
                {
                    "name": f"staterror_ch{c}",
                    "type": "staterror",
                    "data": (0.05 * background).tolist(),
                }
            )
        elif c < 23:
            bkg_mods.append(
                {"name": f"shapesys_ch{c}", "type": "shapesys", "data": (0.1 * background).tolist()}
            )
        elif c == 23:
            bkg_mods.append({"name": "free_shape", "type": "shapefactor", "data": None})
        channels.append(
            {
                "name": f"ch{c}",
                "samples": [
                    {
                        "name": "signal",
                        "data": signal.tolist(),
                        "modifiers": [
                            {"name": "mu", "type": "normfactor", "data": None},
                            {"name": "lumi", "type": "lumi", "data": None},
                        ],
                    },
                    {"name": "background", "data": background.tolist(), "modifiers": bkg_mods},
                ],
            }
        )
        observations.append(
            {"name": f"ch{c}", "data": rng.poisson(background + signal).astype(float).tolist()}
        )
    return {
        "channels": channels,
        "observations": observations,
        "measurements": [
            {
                "name": "meas",
                "config": {
                    "poi": "mu",
                    "parameters": [
                        {
                            "name": "lumi",
                            "auxdata": [1.0],
                            "sigmas": [0.02],
                            "bounds": [[0.9, 1.1]],
                            "inits": [1.0],
                        }
                    ],
                },
            }
        ],
        "version": "1.0.0",
    }


def scan_spec(n_bins: int = 10, seed: int = 1) -> dict:
    """A 10-bin resonance search: falling background (normsys, histosys, staterror), a
    Gaussian signal (normfactor mu, normsys) at bin 4.5; 14 parameters. Data: background
    only, Poisson-fluctuated."""
    rng = np.random.default_rng(seed)
    x = np.arange(n_bins) + 0.5
    background = 200.0 * np.exp(-x / 4.0)
    return {
        "channels": [
            {
                "name": "SR",
                "samples": [
                    {
                        "name": "signal",
                        "data": signal_templates(np.array([4.5]), np.array([20.0]), n_bins)[
                            0
                        ].tolist(),
                        "modifiers": [
                            {"name": "mu", "type": "normfactor", "data": None},
                            {
                                "name": "sig_eff",
                                "type": "normsys",
                                "data": {"hi": 1.08, "lo": 0.93},
                            },
                        ],
                    },
                    {
                        "name": "background",
                        "data": background.tolist(),
                        "modifiers": [
                            {
                                "name": "bkg_norm",
                                "type": "normsys",
                                "data": {"hi": 1.05, "lo": 0.95},
                            },
                            {
                                "name": "bkg_slope",
                                "type": "histosys",
                                "data": {
                                    "hi_data": (background * (1 + 0.02 * (x - 5))).tolist(),
                                    "lo_data": (background * (1 - 0.02 * (x - 5))).tolist(),
                                },
                            },
                            {
                                "name": "staterror_SR",
                                "type": "staterror",
                                "data": (0.04 * background).tolist(),
                            },
                        ],
                    },
                ],
            }
        ],
        "observations": [{"name": "SR", "data": rng.poisson(background).astype(float).tolist()}],
        "measurements": [{"name": "meas", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }


def signal_templates(mass: np.ndarray, total: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """(len(mass), n_bins) Gaussian peaks of width 0.8 bins holding ``total`` events each."""
    edges = np.arange(n_bins + 1)

    cdf = ndtr((edges[None, :] - mass[:, None]) / 0.8)
    return total[:, None] * np.diff(cdf, axis=1)


def with_signal(spec: dict, signal: np.ndarray) -> dict:
    """``scan_spec`` with the signal template replaced (the pyhf model of one hypothesis)."""
    out = json.loads(json.dumps(spec))
    out["channels"][0]["samples"][0]["data"] = signal.tolist()
    return out


def case_a(device: torch.device, repeat: int) -> dict:
    """2-bin example: one qtilde hypotest at mu = 1."""
    spec = two_bin_spec()
    ws = Workspace.load(spec)
    model = ws.model(device=device)
    data = ws.data(model)
    run = lambda: inference.hypotest(model, data, 1.0, "qtilde")  # noqa: E731
    t_ours, threads, by_threads, ours = timed_ours(run, device, repeat)
    # the same call in grad mode (as the CLI makes it): fits add an implicit-gradient step
    default = torch.get_num_threads()
    try:
        torch.set_num_threads(threads if device.type == "cpu" else default)
        t_grad, _ = timed(run, repeat, sync=device.type == "cuda")
    finally:
        torch.set_num_threads(default)
    ref_ws = pyhf.Workspace(spec)
    ref_model = ref_ws.model()
    ref_data = ref_ws.data(ref_model)
    t_ref, ref = timed(lambda: pyhf.infer.hypotest(1.0, ref_data, ref_model, test_stat="qtilde"))
    return {
        **ours_fields(t_ours, threads, by_threads),
        "ours_grad_mode_s": t_grad,
        "pyhf_s": t_ref,
        "ratio": t_ref / t_ours,
        "cls_ours": float(ours.cls_obs),
        "cls_pyhf": float(ref),
        "cls_rel_diff": abs(float(ours.cls_obs) / float(ref) - 1.0),
    }


def case_b(device: torch.device) -> dict:
    """50 channels x 10 bins, ~300 parameters: one maximum-likelihood fit."""
    spec = large_spec()
    ws = Workspace.load(spec)
    model = ws.model(device=device)
    data = ws.data(model)
    bounds, fixed = model.suggested_bounds(), model.suggested_fixed()

    def ours_fit():
        return newton_minimize(
            lambda p: model.twice_nll(p, data), model.suggested_init(), bounds=bounds, fixed=fixed
        )

    # one thread only: ~1.5 s a fit on one core, while 2 threads took ~10x longer on a shared,
    # loaded 2-core machine, which would take the script past its 5-minute budget
    t_ours, n_threads, by_threads, ours = timed_ours(ours_fit, device, repeat=1, threads=(1,))
    ref_ws = pyhf.Workspace(spec)
    ref_model = ref_ws.model()
    ref_data = ref_ws.data(ref_model)
    # one call (~1-2 minutes), no warm-up: import-time costs are nothing next to that
    t_ref, (ref_pars, ref_twice_nll) = timed(
        lambda: pyhf.infer.mle.fit(ref_data, ref_model, return_fitted_val=True),
        repeat=1,
        warmup=False,
    )
    ref_nll = float(ref_twice_nll)
    ours_at_ref = float(model.twice_nll(torch.as_tensor(ref_pars, device=device), data))
    return {
        "channels": len(model.channels),
        "bins": model.nmain,
        "parameters": model.npars,
        "modifier_types": sorted(
            {m["type"] for c in spec["channels"] for s in c["samples"] for m in s["modifiers"]}
        ),
        **ours_fields(t_ours, n_threads, by_threads),
        "pyhf_s": t_ref,
        "ratio": t_ref / t_ours,
        "twice_nll_ours": float(ours.fun),
        "twice_nll_pyhf": ref_nll,
        "twice_nll_ours_at_pyhf_bestfit": ours_at_ref,
        "max_abs_bestfit_diff": float((ours.x.cpu() - torch.as_tensor(ref_pars)).abs().max()),
        "newton_iterations": int(ours.n_iter),
        "converged": bool(ours.converged),
    }


def case_c(device: torch.device, quick: bool, repeat: int, n_signals: int = 1000) -> dict:
    """1,000 hypotests, one per signal template, batched into one call."""
    subset = 10 if quick else 20
    spec = scan_spec()
    rng = np.random.default_rng(2)
    signals = signal_templates(rng.uniform(1.0, 9.0, n_signals), rng.uniform(5.0, 60.0, n_signals))
    ws = Workspace.load(spec)
    model = ws.model(device=device)
    data = ws.data(model)
    yields = torch.as_tensor(signals, dtype=model.dtype, device=device)

    def ours_run():
        batched = model.with_sample_yields("signal", yields)
        # the inference functions take the batch shape from the data: one row per signal
        return inference.hypotest(batched, data.expand(n_signals, -1), 1.0, "qtilde")

    t_ours, threads, by_threads, ours = timed_ours(ours_run, device, repeat)

    ref_models, ref_data = [], []
    t0 = time.perf_counter()
    for signal in signals[:subset]:
        ref_ws = pyhf.Workspace(with_signal(spec, signal))
        ref_models.append(ref_ws.model())
        ref_data.append(ref_ws.data(ref_models[-1]))
    t_build = (time.perf_counter() - t0) / subset

    def ref_loop():
        return [
            pyhf.infer.hypotest(1.0, d, m, test_stat="qtilde", return_expected=True)
            for m, d in zip(ref_models, ref_data, strict=True)
        ]

    pyhf.infer.hypotest(1.0, ref_data[0], ref_models[0], test_stat="qtilde")  # warm-up
    t_ref_subset, ref = timed(ref_loop, repeat=1, warmup=False)
    t_ref = t_ref_subset / subset * n_signals
    cls_ref = np.array([float(r[0]) for r in ref])
    cls_exp_ref = np.array([float(r[1]) for r in ref])
    cls_ours = ours.cls_obs[:subset].cpu().numpy()
    cls_exp_ours = ours.cls_exp[:subset, 2].cpu().numpy()
    return {
        "hypotests": n_signals,
        "parameters": model.npars,
        "bins": model.nmain,
        **ours_fields(t_ours, threads, by_threads),
        "pyhf_s": t_ref,
        "pyhf_timing": f"{subset} hypotests timed ({t_ref_subset:.3g} s), scaled to {n_signals}",
        "pyhf_model_build_s_per_signal": t_build,
        "ratio": t_ref / t_ours,
        "cls_range_ours": [float(ours.cls_obs.min()), float(ours.cls_obs.max())],
        "max_abs_cls_diff_subset": float(np.abs(cls_ours - cls_ref).max()),
        "max_rel_cls_diff_subset": float((np.abs(cls_ours - cls_ref) / cls_ref).max()),
        "max_abs_cls_exp_median_diff_subset": float(np.abs(cls_exp_ours - cls_exp_ref).max()),
    }


def case_d(device: torch.device, quick: bool, repeat: int, n_toys: int = 10_000) -> dict:
    """10,000 toys at the background-only fit: q~_mu (mu = 1) of each from two batched fits."""
    subset = 50 if quick else 200
    spec = scan_spec()
    ws = Workspace.load(spec)
    model = ws.model(device=device)
    data = ws.data(model)
    poi = model.poi_index
    init, bounds, fixed = model.suggested_init(), model.suggested_bounds(), model.suggested_fixed()
    with torch.no_grad():
        background_only, _ = inference.fixed_poi_fit(model, data, 0.0)
    generator = torch.Generator(device=device).manual_seed(3)
    toys = model.sample(background_only, n_toys, generator=generator)
    fixed_mu = fixed.clone()
    fixed_mu[poi] = True
    start_mu = init.clone()
    start_mu[poi] = 1.0

    def objective(p):
        return model.twice_nll(p, toys)

    def ours_run():
        free = newton_minimize(objective, init.expand(n_toys, -1), bounds=bounds, fixed=fixed)
        cond = newton_minimize(
            objective, start_mu.expand(n_toys, -1), bounds=bounds, fixed=fixed_mu
        )
        q = torch.clamp(cond.fun - free.fun, min=0.0)
        q = torch.where(free.x[:, poi] > 1.0, torch.zeros_like(q), q)
        return q, free, cond

    # ~5 s a call on one CPU core: best of 2 runs (1 in quick mode) after the warm-up
    t_ours, threads, by_threads, (q, free, cond) = timed_ours(ours_run, device, min(repeat, 2))

    ref_model = pyhf.Workspace(spec).model()
    toys_np = toys[:subset].cpu().numpy()

    def ref_loop():
        out = []
        for toy in toys_np:
            try:
                pars, nll_free = pyhf.infer.mle.fit(toy, ref_model, return_fitted_val=True)
                _, nll_mu = pyhf.infer.mle.fixed_poi_fit(
                    1.0, toy, ref_model, return_fitted_val=True
                )
            except pyhf.exceptions.FailedMinimization:
                out.append(math.nan)
                continue
            q_toy = max(float(nll_mu) - float(nll_free), 0.0)
            out.append(0.0 if pars[poi] > 1.0 else q_toy)
        return np.array(out)

    pyhf.infer.mle.fit(toys_np[0], ref_model)  # warm-up
    t_ref_subset, q_ref = timed(ref_loop, repeat=1, warmup=False)
    t_ref = t_ref_subset / subset * n_toys
    q_sub = q[:subset].cpu().numpy()
    ok = np.isfinite(q_ref)
    both = free.converged & cond.converged
    return {
        "toys": n_toys,
        "parameters": model.npars,
        "fits": 2 * n_toys,
        **ours_fields(t_ours, threads, by_threads),
        "pyhf_s": t_ref,
        "pyhf_timing": f"{subset} toys timed ({t_ref_subset:.3g} s), scaled to {n_toys}",
        "ratio": t_ref / t_ours,
        "ours_converged": {
            "free": int(free.converged.sum()),
            "fixed_mu": int(cond.converged.sum()),
            "both": int(both.sum()),
            "of": n_toys,
        },
        "ours_newton_iterations_max": [int(free.n_iter.max()), int(cond.n_iter.max())],
        "pyhf_failed_subset": int((~ok).sum()),
        "max_abs_q_diff_subset": float(np.abs(q_sub[ok] - q_ref[ok]).max()),
        "q_median_ours": float(q.median()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller pyhf subsets, fewer runs")
    parser.add_argument(
        "--cases", default="abcd", help="which cases to run (letters), default all: abcd"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    repeat = 1 if args.quick else 3
    pyhf.set_backend("numpy", "scipy")
    out: dict = {
        "device": str(device),
        "cpu_threads_available": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyhf": pyhf.__version__,
        "numpy": np.__version__,
        "quick": args.quick,
    }
    cases = {
        "a": ("a_two_bin_hypotest", lambda: case_a(device, repeat)),
        "b": ("b_large_model_fit", lambda: case_b(device)),
        "c": ("c_1000_signal_hypotests", lambda: case_c(device, args.quick, repeat)),
        "d": ("d_10000_toys", lambda: case_d(device, args.quick, repeat)),
    }
    start = time.perf_counter()
    for letter in args.cases:
        name, run = cases[letter]
        out[name] = run()
    out["total_s"] = time.perf_counter() - start
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
