"""Statistics engine against pyhf 0.7.6 (numpy backend, scipy optimizer), and NextStat.

    python benchmarks/bench_stats.py [--device cpu|cuda] [--quick] [--cases abcd]
    OMP_NUM_THREADS=1 python benchmarks/bench_stats.py --published [--workspaces susy,validation]
        [--repeat 3] [--tight all|small|none] [--pyhf-limit all|small|none] [--numpy-susy]

Prints one JSON object. Without ``--published``, cases (a)-(d) run in this process, each with
our time, pyhf's time, the ratio (pyhf / ours) and how well the numbers agree with pyhf's:

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

``--published`` (cases (a)-(d) then only with ``--cases``): real workspaces, read from
``../shared/reference`` (``--reference-dir``): the published ATLAS likelihood
``published/ANA-SUSY-2018-16_with_signal.json`` (44 channels, 219 parameters, POI ``mu_SIG``)
and pyhf's four biggest validation workspaces (``pyhf_validation/reference_cases/2bin_2channel_*``,
2 channels x 2 bins, 2-5 parameters). For each, three measurements, each timed whole process
(wall time of the command in a subprocess) and in-process (the library call, models built
beforehand):

fit       ``diffana fit WS`` vs ``pyhf fit WS --value``; in-process
          ``analysis.inference.global_fit(model, data, init, fixed, ())`` (what ``diffana fit``
          runs, with its default method: the batched Newton minimum, multi-started on kinked
          parameters, and the exact-Hessian errors) vs ``pyhf.infer.mle.fit(data, model,
          return_fitted_val=True)``;
hypotest  ``diffana hypotest WS --poi-value 1`` vs ``pyhf cls WS`` (qtilde, mu = 1);
          in-process ``analysis.inference.hypotest(model, data, 1.0, "qtilde")`` vs
          ``pyhf.infer.hypotest(1.0, data, model, test_stat="qtilde", return_expected_set=True)``;
limit     ``diffana limit WS`` (which also computes a 31-point CLs curve) vs pyhf's
          ``pyhf.infer.intervals.upper_limits.toms748_scan(data, model, 0, upper, level=0.05)``
          (upper 2 on SUSY, 5 elsewhere; it widens a bracket that is too small) run as
          ``python -c`` (pyhf has no limit command): its wall time is the whole-process time,
          the time it measures around ``toms748_scan`` the in-process one; our in-process call
          is ``analysis.inference.upper_limit(model, data, cl=0.95)``;
ranking   ``diffana ranking WS`` and in-process ``analysis.inference.ranking`` after
          ``global_fit``: ours only (pyhf has no ranking; cabinetry's, 4 MINUIT refits per
          nuisance parameter, would take hours on SUSY); timed once when over 5 s.

Two engines of ours: ``diffana fit|hypotest|limit`` run a JSON workspace of at most
``analysis.numpy_backend.AUTO_MAX_PARAMETERS`` (40) parameters on the torch-free numpy backend
(``--backend auto``, the default), larger ones (SUSY) on the torch engine. Each workspace's
``cli_backend`` (in ``workspace``, and per measurement in ``whole_process``) says which engine
the default command ran: the command is run once more, untimed, with ``-v``, and ``"numpy"``
means its stderr has the log line "numpy backend: N parameters". Whole process, ``ours_s`` is
the default command; where it ran on numpy (the validation workspaces) the same command with
``--backend torch`` is timed too, as ``ours_torch_process_s`` (with
``ratio_pyhf_over_ours_torch_process`` and ``ratio_ours_torch_process_over_ours``). In-process,
``ours_s`` stays the torch engine's call and ``ours_numpy_s`` is the numpy backend's
(``analysis.numpy_backend.infer.global_fit(model, data, init, fixed)``, ``hypotest(model, data,
1, "qtilde")``, ``upper_limit_with_curve(model, data, 0.95)``) on the model and data that the
CLI builds (``NumpyModel`` of the first measurement, ``analysis.cli.stats._numpy_data``), with
``ratio_pyhf_over_ours_numpy`` and ``ratio_ours_over_ours_numpy`` (torch / numpy). The numpy
limit call also computes the 31-point CLs curve, so the limit's in-process block has the torch
engine's same call, ``inference.upper_limit_with_curve``, as ``ours_with_curve_s``. A numpy
model that does not build or a call that raises ``analysis.numpy_backend.Unsupported`` (where
the CLI would run torch) gives ``ours_numpy_error``. Above 40 parameters (SUSY) numpy is slow:
it is built and timed, once, only with ``--numpy-susy``. The ``agreement`` blocks add the numpy
backend (``ours_numpy``) and the torch command (``ours_torch_cli``): twice NLL and its relative
differences to ours (torch), pyhf and pyhf tight, best-fit differences, CLs obs/exp and limits
with relative differences to ours, pyhf, pyhf tight (and NextStat).

NextStat (optional: ``pip install -e .[bench]``; ``"nextstat": "not installed"`` otherwise) is
timed on the same workspaces: in-process ``nextstat.from_pyhf(json_text)``, then
``nextstat.fit(model)``, ``nextstat.hypotest(1.0, model, return_tail_probs=True)`` (observed
CLs only) and ``nextstat.upper_limit(model, method="root", alpha=0.05, hi=upper)``; whole
process its ``nextstat fit|hypotest --expected-set|upper-limit --expected`` commands with
``--threads 1``. Not with ``--interp-defaults pyhf``: in nextstat-cli 0.10.1 that flag gives
another likelihood than pyhf's (its best-fit twice NLL on the SUSY workspace 563.67, where
pyhf's ``logpdf`` at that point is 563.97), while the command's default gives pyhf's, as
``from_pyhf`` does (checked in every run: ``twice_nll_pyhf_logpdf_at_nextstat_cli_bestfit``).

Every measurement reports ``*_s`` (best time), ``*_runs_s``, ``ratio_pyhf_over_ours`` and
``ratio_nextstat_over_ours``, and an ``agreement`` block: twice NLL at the best fit (ours, pyhf,
NextStat, and pyhf's own ``model.logpdf`` evaluated at our and NextStat's best fit), best-fit
POI, observed and expected CLs and limits of every tool with relative differences. pyhf is
timed at its defaults (numpy, scipy SLSQP); the agreement reference is pyhf with
``minuit_optimizer(tolerance=1e-6)`` where ``--tight`` says (default: the small workspaces; on
the SUSY workspace one tight MINUIT fit takes over half an hour, so there the reference is
pyhf's ``logpdf`` at each tool's best fit, pyhf's defaults and NextStat).

Timing: our side best of ``--repeat`` (3; 1 with ``--quick``) with one intra-op thread (the
CLI's ``--threads 1``), under ``torch.no_grad()`` like the CLI; an in-process first call under
1 s is a warm-up and not counted. pyhf and NextStat likewise, except that a call or command
slower than 5 s is timed once (pyhf on the SUSY workspace: ~15 s a fit, ~75 s a hypotest on an
idle core). NextStat gets one Rayon thread (``set_threads(1)``). Run with ``OMP_NUM_THREADS=1``
(pyhf's numpy and torch would otherwise use every core); the load average at start and end is
in the output, as the numbers are only as good as the machine was idle. On a 2-core machine at
load ~2 the SUSY part took 17 minutes without pyhf's limit (``--pyhf-limit small``; mostly
pyhf's fits and hypotests and NextStat's limit; the ``-v`` runs of the ``cli_backend`` check
add one untimed run of each command), the validation part 5; pyhf's toms748 scan of
the SUSY workspace (``--pyhf-limit all``, the default) adds about 40 hypotests of ~2 minutes
each on an idle core (43 with the bracket [0, 5]). Progress goes to stderr. The output is
strict JSON: a non-finite number (a relative difference to a reference of 0) is written null.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyhf
import torch
from scipy.special import ndtr

import analysis
from analysis import inference
from analysis.cli.stats import _numpy_data
from analysis.fit import newton_minimize
from analysis.likelihood import Workspace
from analysis.numpy_backend import AUTO_MAX_PARAMETERS
from analysis.numpy_backend import infer as numpy_infer
from analysis.numpy_backend.model import NumpyModel

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


# --------------------------------------------------------------------------------------------
# --published: a published ATLAS likelihood and pyhf's validation workspaces against pyhf (and
# NextStat when installed), whole process (the command lines) and in-process (library calls)
# --------------------------------------------------------------------------------------------

PROJECT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = PROJECT.parent / "shared" / "reference"
SUSY_WORKSPACE = "published/ANA-SUSY-2018-16_with_signal.json"
SUSY_LIMIT_BRACKET = 2.0
"""Upper end of pyhf's toms748 bracket on the SUSY workspace (its POI bound is 5; the +2 sigma
expected limit is ~1.1): each toms748 step there is a ~2 minute hypotest. toms748_scan widens
a bracket that does not hold a limit by itself."""
VALIDATION_CASES = (
    "2bin_2channel_coupledhistosys_mu1",
    "2bin_2channel_couplednorm_mu1",
    "2bin_2channel_coupledshapefactor_mu1",
    "2bin_2channel_mu1",
)
"""pyhf's biggest validation workspaces (2 channels x 2 bins, 2 to 5 parameters; the
``workspace`` of each reference case; the CLs stored with them are for the q statistic)."""
POI_TEST = 1.0
CL = 0.95
WARMUP_BELOW_S = 1.0
"""An in-process first call faster than this is a warm-up, not counted."""
ONCE_ABOVE_S = 5.0
"""A pyhf or NextStat call (or command) slower than this is timed once."""
SMALL_PARAMETERS = 20
"""Workspaces with at most this many parameters are small: pyhf's tight-MINUIT limit is run on
them only (on the SUSY workspace it would be dozens of MINUIT hypotests of minutes each)."""
TIGHT_WHERE = {
    "all": "every workspace (limits: small ones only)",
    "small": f"workspaces of at most {SMALL_PARAMETERS} parameters",
    "none": "no workspace",
}
PYHF_DEFAULT = "numpy backend, scipy optimizer (SLSQP), pyhf defaults"
PYHF_TIGHT = "numpy backend, pyhf.optimize.minuit_optimizer(tolerance=1e-6)"

PYHF_LIMIT_SCRIPT = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import pyhf
path, upper, tight = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "tight"
pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-6) if tight else "scipy")
with open(path) as f:
    workspace = pyhf.Workspace(json.load(f))
model = workspace.model()
data = workspace.data(model)
start = time.perf_counter()
observed, expected = pyhf.infer.intervals.upper_limits.toms748_scan(
    data, model, 0.0, upper, level=0.05
)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "observed": float(observed),
                  "expected": [float(x) for x in expected]}))
"""
"""pyhf has no limit command: this script, run as ``python -c``, is its whole process; the
time it prints is its in-process time (``toms748_scan`` alone)."""


def _measure(func: Callable[[], Any], repeat: int, once_above: float = math.inf):
    """(best seconds, counted runs' seconds, last result) of up to ``repeat`` timed calls. A
    first call under WARMUP_BELOW_S is a warm-up (not counted); a call over ``once_above``
    seconds ends the timing."""
    runs: list[float] = []
    result, warmed = None, False
    while len(runs) < repeat:
        start = time.perf_counter()
        result = func()
        seconds = time.perf_counter() - start
        if not warmed and not runs and seconds < WARMUP_BELOW_S:
            warmed = True
            continue
        runs.append(seconds)
        if seconds > once_above:
            break
    return min(runs), runs, result


def _process(argv: list[str]) -> tuple[float, Any]:
    """Wall seconds of one command and the JSON it printed (RuntimeError if it failed)."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = done.stderr.strip()[-600:]
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {tail}")
    return seconds, json.loads(done.stdout)


def _measure_process(argv: list[str], repeat: int, once_above: float = math.inf):
    """(best seconds, runs' seconds, last JSON output) of up to ``repeat`` runs of a command."""
    runs: list[float] = []
    out = None
    while len(runs) < repeat:
        seconds, out = _process(argv)
        runs.append(seconds)
        if seconds > once_above:
            break
    return min(runs), runs, out


def _executable(name: str) -> str | None:
    """The command ``name`` next to this Python (the virtualenv's), else on PATH."""
    here = pathlib.Path(sys.executable).with_name(name)
    return str(here) if here.exists() else shutil.which(name)


def _attempt(func: Callable[[], Any]) -> Any:
    """``func()``, or ``{"error": ...}``: one failing tool does not stop the benchmark."""
    try:
        return func()
    except Exception as err:  # noqa: BLE001 - reported in the JSON
        return {"error": f"{type(err).__name__}: {err}"}


def _ok(value: Any) -> bool:
    return not (isinstance(value, dict) and "error" in value)


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if isinstance(numerator, dict | str) or isinstance(denominator, dict | str):
        return None
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def _rel_diff(ours: Any, ref: Any) -> float | None:
    """max |ours / ref - 1| over the elements (None when one side is missing)."""
    if ours is None or ref is None or not _ok(ours) or not _ok(ref):
        return None
    a, b = np.asarray(ours, dtype=float), np.asarray(ref, dtype=float)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _side(out: dict, key: str, side: Any) -> None:
    """``out[key + "_s"]`` and ``_runs_s`` of a measured side (``_measure``'s tuple); None
    and ``key + "_error"`` for an error dict; a string (why it was skipped) as it is."""
    if isinstance(side, str):
        out[f"{key}_s"] = side
    elif side is None:
        out[f"{key}_s"] = None
    elif _ok(side):
        out[f"{key}_s"], out[f"{key}_runs_s"] = side[0], side[1]
    else:
        out[f"{key}_s"], out[f"{key}_error"] = None, side["error"]


def _number(value: Any) -> Any:
    """``value``, or None where it is a note (a string) instead of a time."""
    return None if isinstance(value, str) else value


def _result(side: Any) -> Any:
    """The result of a measured side, or None (not run, skipped or failed)."""
    if side is None or isinstance(side, str) or not _ok(side):
        return None
    return side[2]


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf, e.g. a relative difference to a
    reference of 0) as None: the output stays strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    return value


NUMPY_LOG_LINE = re.compile(r"numpy backend: \d+ parameters")
"""What ``diffana -v`` logs (stderr) when a command runs on the numpy backend
(``analysis.cli.stats._numpy_output``)."""


def _cli_backend(argv: list[str]) -> str:
    """The engine a ``diffana`` command ran on: ``"numpy"`` when the command, run once more
    with ``-v`` (untimed), logs "numpy backend: N parameters" on stderr, else ``"torch"``."""
    done = subprocess.run([*argv, "-v"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip()[-600:]
        raise RuntimeError(f"{' '.join(argv)} -v exited with {done.returncode}: {tail}")
    return "numpy" if NUMPY_LOG_LINE.search(done.stderr) else "torch"


@contextlib.contextmanager
def _pyhf_tight():
    """pyhf with the tight MINUIT settings of the agreement reference, scipy again after."""
    pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-6))
    try:
        yield
    finally:
        pyhf.set_backend("numpy", "scipy")


def _import_nextstat() -> Any:
    """The ``nextstat`` module (optional: ``pip install diffana[bench]``), or None."""
    try:
        import nextstat  # type: ignore[import-not-found]
    except ImportError:
        return None
    return nextstat if getattr(nextstat, "from_pyhf", None) is not None else None


def _diffana_fit_call() -> tuple[str, Callable]:
    """What ``diffana fit`` runs: ``analysis.inference.global_fit`` with its default method
    (``analysis.cli._global_fit``, MIGRAD checked by Newton, before the inference package was
    split), else plain ``fit_model`` (MIGRAD + HESSE)."""
    found = getattr(inference, "global_fit", None)
    if found is not None:
        return "analysis.inference.global_fit(model, data, init, fixed, ()) (diffana fit)", found
    try:
        from analysis.cli import _global_fit  # type: ignore[attr-defined]
    except ImportError:
        from analysis.fit import fit_model

        def plain(model, data, init, fixed, minos):
            return fit_model(model, data, init=init, fixed=fixed, minos=minos)

        return "analysis.fit.fit_model (MIGRAD + HESSE; no global_fit found)", plain
    return "analysis.cli._global_fit(model, data, init, fixed, ()) (diffana fit)", _global_fit


class PublishedBench:
    """Fit, hypotest at mu = 1 and limit of one pyhf JSON workspace with every tool."""

    def __init__(self, name: str, path: pathlib.Path, limit_upper: float, args, ns: Any):
        self.name, self.path, self.limit_upper, self.ns = name, path, limit_upper, ns
        self.repeat, self.device = args.repeat, torch.device(args.device)
        self.pyhf_limit = args.pyhf_limit
        self.diffana = _executable("diffana")
        self.pyhf_cli = _executable("pyhf")
        self.nextstat_cli = _executable("nextstat") if ns is not None else None
        text = path.read_text()
        start = time.perf_counter()
        workspace = Workspace.load(path)
        self.model = workspace.model(device=self.device)
        self.data = workspace.data(self.model)
        self.ours_load_s = time.perf_counter() - start
        start = time.perf_counter()
        ref_ws = pyhf.Workspace(json.loads(text))
        self.ref_model = ref_ws.model()
        self.ref_data = ref_ws.data(self.ref_model)
        self.pyhf_load_s = time.perf_counter() - start
        self.ref_names = list(self.ref_model.config.par_names)
        self.tight = args.tight == "all" or (args.tight == "small" and self._small())
        self.ns_model, self.ns_load_s = None, None
        if ns is not None:
            start = time.perf_counter()
            self.ns_model = ns.from_pyhf(text)
            self.ns_load_s = time.perf_counter() - start
        # the numpy backend (what the default CLI runs up to AUTO_MAX_PARAMETERS parameters):
        # above that slow, so built and timed (once) only with --numpy-susy
        self.numpy_small = int(self.model.npars) <= AUTO_MAX_PARAMETERS
        self.numpy_model: Any = None
        self.numpy_load_s: float | None = None
        if self.numpy_small or args.numpy_susy:
            self.numpy_model = _attempt(self._numpy_model)
        else:
            self.numpy_model = (
                f"skipped: {int(self.model.npars)} > {AUTO_MAX_PARAMETERS} parameters "
                "(--numpy-susy times it)"
            )
        # which engine the default CLI runs this workspace on (diffana fit -v, untimed)
        self.cli_backend = _attempt(lambda: _cli_backend(self._ours_cli("fit")))

    # --- helpers -----------------------------------------------------------------------------

    def _numpy_model(self) -> tuple[NumpyModel, np.ndarray]:
        """The numpy model and observed data as ``diffana`` builds them
        (``analysis.cli.stats._numpy_output`` and ``_numpy_data``: the first measurement, its
        POI, pyhf's default interpolation codes); Unsupported where the CLI falls back to torch."""
        start = time.perf_counter()
        workspace = Workspace.load(self.path)
        meas = workspace.measurement(None)
        model = NumpyModel(
            workspace.model_spec(meas["name"]),
            poi_name=meas["config"].get("poi") or None,
            source=workspace.source,
        )
        data = _numpy_data(workspace, model, False)
        self.numpy_load_s = time.perf_counter() - start
        return model, data

    def _numpy(self, func: Callable[[NumpyModel, np.ndarray], Any]) -> Any:
        """The numpy backend's in-process call ``func(model, data)``: best of ``repeat`` (a
        first call under WARMUP_BELOW_S a warm-up), once above AUTO_MAX_PARAMETERS parameters
        (--numpy-susy); an error dict where the model did not build or the call raised
        (``Unsupported``: the CLI would run torch), a string where it was skipped."""
        built = self.numpy_model
        if isinstance(built, str) or not _ok(built):
            return built
        model, data = built
        repeat = self.repeat if self.numpy_small else 1
        with np.errstate(all="ignore"):
            return _attempt(lambda: _measure(lambda: func(model, data), repeat))

    def _command_backend(self, *args: str) -> Any:
        """``cli_backend`` of ``diffana ARGS WS``: the one found at start-up for ``fit``."""
        if args == ("fit",):
            return self.cli_backend
        return _attempt(lambda: _cli_backend(self._ours_cli(*args)))

    def _ours_torch_cli(self, backend: Any, *args: str) -> Any:
        """``diffana ARGS WS --backend torch`` timed as the default command, where the default
        ran on numpy (the small workspaces); None elsewhere (the default is torch already)."""
        if backend != "numpy":
            return None
        return _attempt(
            lambda: _measure_process([*self._ours_cli(*args), "--backend", "torch"], self.repeat)
        )

    def _with_engines(
        self,
        times: dict,
        *,
        numpy_side: Any = None,
        numpy_call: str | None = None,
        torch_cli: Any = None,
        torch_call: str | None = None,
        backend: Any = None,
    ) -> dict:
        """``times`` (a :meth:`_times` block) with the other engine added: in-process the numpy
        backend (``ours_numpy_s``, ratios pyhf / numpy and torch / numpy), whole process the
        command with ``--backend torch`` (``ours_torch_process_s``, ratios pyhf / it and it /
        the default command) and which engine the default command ran on (``cli_backend``)."""
        if numpy_call is not None:
            times["calls"]["ours_numpy"] = numpy_call
            _side(times, "ours_numpy", numpy_side)
            times["ratio_pyhf_over_ours_numpy"] = _ratio(
                _number(times["pyhf_s"]), times["ours_numpy_s"]
            )
            times["ratio_ours_over_ours_numpy"] = _ratio(times["ours_s"], times["ours_numpy_s"])
        if torch_call is not None:
            times["cli_backend"] = backend if _ok(backend) else None
            if not _ok(backend):
                times["cli_backend_error"] = backend["error"]
            if torch_cli is None:
                times["calls"]["ours_torch_process"] = (
                    "not run: the default command ran on torch (ours_s)"
                )
            else:
                times["calls"]["ours_torch_process"] = torch_call
            _side(times, "ours_torch_process", torch_cli)
            times["ratio_pyhf_over_ours_torch_process"] = _ratio(
                _number(times["pyhf_s"]), times["ours_torch_process_s"]
            )
            times["ratio_ours_torch_process_over_ours"] = _ratio(
                times["ours_torch_process_s"], times["ours_s"]
            )
        return times

    def _ours(self, func: Callable[[], Any]):
        """Our in-process call: no autograd graphs and one intra-op thread, as the CLI."""
        default = torch.get_num_threads()

        def call():
            with torch.no_grad():
                return func()

        try:
            torch.set_num_threads(1)
            return _measure(call, self.repeat)
        finally:
            torch.set_num_threads(default)

    def _pyhf_order(self, names: list[str], values: Any) -> np.ndarray:
        index = {n: i for i, n in enumerate(names)}
        values = np.asarray(values, dtype=float)
        return np.array([values[index[n]] for n in self.ref_names])

    def _pyhf_twice_nll(self, names: list[str], values: Any) -> float:
        """-2 pyhf ``model.logpdf`` at a parameter point given in another tool's order."""
        pars = self._pyhf_order(names, values)
        return -2.0 * float(self.ref_model.logpdf(pars, self.ref_data)[0])

    def _ours_cli(self, *args: str) -> list[str]:
        return [self.diffana, *args, str(self.path), "--device", str(self.device)]

    def _ns_cli(self, command: str, *args: str) -> list[str]:
        return [
            self.nextstat_cli,
            command,
            "--input",
            str(self.path),
            *args,
            "--threads",
            "1",
        ]

    def workspace_info(self) -> dict:
        return {
            "path": str(self.path),
            "channels": len(self.model.channels),
            "bins": int(self.model.nmain),
            "parameters": int(self.model.npars),
            "poi": self.model.poi_name,
            "load_s": {
                "ours": self.ours_load_s,
                "ours_numpy": self.numpy_load_s,
                "pyhf": self.pyhf_load_s,
                "nextstat": self.ns_load_s,
            },
            "cli_backend": self.cli_backend if _ok(self.cli_backend) else None,
            **({} if _ok(self.cli_backend) else {"cli_backend_error": self.cli_backend["error"]}),
            "numpy_model": (
                "built"
                if isinstance(self.numpy_model, tuple)
                else self.numpy_model
                if isinstance(self.numpy_model, str)
                else self.numpy_model["error"]
            ),
        }

    # --- fit -----------------------------------------------------------------------------

    def fit(self) -> dict:
        model, data = self.model, self.data
        call, global_fit = _diffana_fit_call()

        def ours_fit():
            init, fixed = model.suggested_init().clone(), model.suggested_fixed().clone()
            return global_fit(model, data, init, fixed, ())

        ours = _attempt(lambda: self._ours(ours_fit))
        ours_cli = _attempt(lambda: _measure_process(self._ours_cli("fit"), self.repeat))
        backend = self._command_backend("fit")
        torch_cli = self._ours_torch_cli(backend, "fit")

        def numpy_fit(np_model: NumpyModel, np_data: np.ndarray) -> dict:
            init, fixed = np_model.suggested_init().copy(), np_model.suggested_fixed().copy()
            return numpy_infer.global_fit(np_model, np_data, init, fixed)

        ours_numpy = self._numpy(numpy_fit)
        pyhf_cli = _attempt(
            lambda: _measure_process(
                [self.pyhf_cli, "fit", str(self.path), "--value"], self.repeat, ONCE_ABOVE_S
            )
        )

        def pyhf_fit():
            return pyhf.infer.mle.fit(self.ref_data, self.ref_model, return_fitted_val=True)

        ref = _attempt(lambda: _measure(pyhf_fit, self.repeat, ONCE_ABOVE_S))
        tight = None
        if self.tight:

            def tight_fit():
                with _pyhf_tight():
                    return _measure(pyhf_fit, 1)

            tight = _attempt(tight_fit)
        ns_in = ns_cli = None
        if self.ns is not None:
            ns_in = _attempt(
                lambda: _measure(lambda: self.ns.fit(self.ns_model), self.repeat, ONCE_ABOVE_S)
            )
            if self.nextstat_cli:
                ns_cli = _attempt(
                    lambda: _measure_process(self._ns_cli("fit"), self.repeat, ONCE_ABOVE_S)
                )
        # agreement
        poi = self.ref_names.index(self.model.poi_name) if self.model.poi_name else None
        agree: dict[str, Any] = {
            "pyhf_timed": PYHF_DEFAULT,
            "pyhf_tight": PYHF_TIGHT if self.tight else "not run here (--tight)",
        }
        ours_x = None
        if _ok(ours):
            result = ours[2]
            ours_x = self._pyhf_order(list(result.labels), result.bestfit.cpu().numpy())
            agree["twice_nll_ours"] = float(result.twice_nll)
            agree["twice_nll_pyhf_logpdf_at_ours_bestfit"] = self._pyhf_twice_nll(
                list(result.labels), result.bestfit.cpu().numpy()
            )
            agree["ours_converged"] = bool(result.converged)
        if _ok(ours_cli):
            agree["twice_nll_ours_cli"] = float(ours_cli[2]["twice_nll"])
        if _result(torch_cli) is not None:
            agree["twice_nll_ours_torch_cli"] = float(torch_cli[2]["twice_nll"])
        numpy_x = None
        if (r := _result(ours_numpy)) is not None:
            numpy_x = self._pyhf_order(list(r["labels"]), r["bestfit"])
            agree["twice_nll_ours_numpy"] = float(r["twice_nll"])
            agree["twice_nll_pyhf_logpdf_at_ours_numpy_bestfit"] = self._pyhf_twice_nll(
                list(r["labels"]), r["bestfit"]
            )
        if _ok(ref):
            agree["twice_nll_pyhf"] = float(ref[2][1])
        if _ok(pyhf_cli):
            agree["twice_nll_pyhf_cli"] = float(pyhf_cli[2]["twice_nll"])
        if tight is not None and _ok(tight):
            agree["twice_nll_pyhf_tight"] = float(tight[2][1])
            if ours_x is not None:
                agree["twice_nll_ours_minus_pyhf_tight"] = (
                    agree["twice_nll_pyhf_logpdf_at_ours_bestfit"] - agree["twice_nll_pyhf_tight"]
                )
                agree["max_abs_bestfit_diff_ours_vs_pyhf_tight"] = float(
                    np.max(np.abs(ours_x - np.asarray(tight[2][0])))
                )
        elif tight is not None:
            agree["pyhf_tight_error"] = tight["error"]
        if ours_x is not None and _ok(ref):
            agree["twice_nll_ours_minus_pyhf"] = (
                agree["twice_nll_pyhf_logpdf_at_ours_bestfit"] - agree["twice_nll_pyhf"]
            )
            agree["max_abs_bestfit_diff_ours_vs_pyhf"] = float(
                np.max(np.abs(ours_x - np.asarray(ref[2][0])))
            )
        if numpy_x is not None:
            twice_nll_numpy = agree["twice_nll_ours_numpy"]
            for ref_key in ("ours", "pyhf", "pyhf_tight"):
                if f"twice_nll_{ref_key}" in agree:
                    agree[f"twice_nll_rel_diff_ours_numpy_vs_{ref_key}"] = _rel_diff(
                        twice_nll_numpy, agree[f"twice_nll_{ref_key}"]
                    )
            if ours_x is not None:
                agree["max_abs_bestfit_diff_ours_numpy_vs_ours"] = float(
                    np.max(np.abs(numpy_x - ours_x))
                )
            if _ok(ref):
                agree["max_abs_bestfit_diff_ours_numpy_vs_pyhf"] = float(
                    np.max(np.abs(numpy_x - np.asarray(ref[2][0])))
                )
        if poi is not None:
            agree["poi_hat"] = {
                "ours": float(ours_x[poi]) if ours_x is not None else None,
                "ours_numpy": float(numpy_x[poi]) if numpy_x is not None else None,
                "pyhf": float(ref[2][0][poi]) if _ok(ref) else None,
                "pyhf_tight": float(tight[2][0][poi]) if tight is not None and _ok(tight) else None,
            }
        if ns_cli is not None and _ok(ns_cli):
            r = ns_cli[2]
            agree["twice_nll_nextstat_cli"] = float(r["twice_nll"])
            agree["twice_nll_pyhf_logpdf_at_nextstat_cli_bestfit"] = self._pyhf_twice_nll(
                list(r["parameter_names"]), r["bestfit"]
            )
        if ns_in is not None and _ok(ns_in):
            r = ns_in[2]
            names = list(self.ns_model.parameter_names())
            agree["twice_nll_nextstat"] = float(r.twice_nll)
            agree["twice_nll_pyhf_logpdf_at_nextstat_bestfit"] = self._pyhf_twice_nll(
                names, r.parameters
            )
            agree["nextstat_converged"] = bool(r.converged)
            if poi is not None:
                agree["poi_hat"]["nextstat"] = float(self._pyhf_order(names, r.parameters)[poi])
        return {
            "whole_process": self._with_engines(
                self._times(
                    ours_cli,
                    pyhf_cli,
                    ns_cli,
                    ours=f"diffana fit WS --device {self.device}",
                    pyhf="pyhf fit WS --value",
                    nextstat="nextstat fit --input WS --threads 1",
                ),
                torch_cli=torch_cli,
                torch_call=f"diffana fit WS --device {self.device} --backend torch",
                backend=backend,
            ),
            "in_process": self._with_engines(
                self._times(
                    ours,
                    ref,
                    ns_in,
                    ours=call,
                    pyhf="pyhf.infer.mle.fit(data, model, return_fitted_val=True)",
                    nextstat="nextstat.fit(model)",
                ),
                numpy_side=ours_numpy,
                numpy_call="analysis.numpy_backend.infer.global_fit(model, data, init, fixed) "
                "(diffana fit on numpy)",
            ),
            "pyhf_tight_s": tight[0] if tight is not None and _ok(tight) else None,
            "agreement": agree,
        }

    def _times(self, ours_side, pyhf_side, ns_side, /, **calls: str) -> dict:
        """Best times, runs and ratios (pyhf / ours, nextstat / ours) of one measurement."""
        out: dict[str, Any] = {"calls": calls}
        for key, side in (("ours", ours_side), ("pyhf", pyhf_side), ("nextstat", ns_side)):
            if side is None:
                out[f"{key}_s"] = "not installed" if key == "nextstat" and self.ns is None else None
            elif _ok(side):
                out[f"{key}_s"], out[f"{key}_runs_s"] = side[0], side[1]
            else:
                out[f"{key}_s"], out[f"{key}_error"] = None, side["error"]
        for key in ("pyhf", "nextstat"):
            value = out[f"{key}_s"]
            out[f"ratio_{key}_over_ours"] = (
                _ratio(value, out["ours_s"]) if not isinstance(value, str) else None
            )
        return out

    # --- hypotest ----------------------------------------------------------------------------

    def hypotest(self) -> dict:
        model, data = self.model, self.data

        def ours_test():
            return inference.hypotest(model, data, POI_TEST, "qtilde")

        def pyhf_test():
            return pyhf.infer.hypotest(
                POI_TEST,
                self.ref_data,
                self.ref_model,
                test_stat="qtilde",
                return_expected_set=True,
            )

        ours = _attempt(lambda: self._ours(ours_test))
        ours_cli = _attempt(
            lambda: _measure_process(
                self._ours_cli("hypotest", "--poi-value", f"{POI_TEST:g}"), self.repeat
            )
        )
        hypotest_args = ("hypotest", "--poi-value", f"{POI_TEST:g}")
        backend = self._command_backend(*hypotest_args)
        torch_cli = self._ours_torch_cli(backend, *hypotest_args)
        ours_numpy = self._numpy(
            lambda np_model, np_data: numpy_infer.hypotest(np_model, np_data, POI_TEST, "qtilde")
        )
        pyhf_cli = _attempt(
            lambda: _measure_process(
                [
                    self.pyhf_cli,
                    "cls",
                    str(self.path),
                    "--test-poi",
                    f"{POI_TEST:g}",
                    "--test-stat",
                    "qtilde",
                ],
                self.repeat,
                ONCE_ABOVE_S,
            )
        )
        ref = _attempt(lambda: _measure(pyhf_test, self.repeat, ONCE_ABOVE_S))
        tight = None
        if self.tight:

            def tight_test():
                with _pyhf_tight():
                    return _measure(pyhf_test, 1)

            tight = _attempt(tight_test)
        ns_in = ns_cli = None
        if self.ns is not None:
            ns_in = _attempt(
                lambda: _measure(
                    lambda: self.ns.hypotest(POI_TEST, self.ns_model, return_tail_probs=True),
                    self.repeat,
                    ONCE_ABOVE_S,
                )
            )
            if self.nextstat_cli:
                ns_cli = _attempt(
                    lambda: _measure_process(
                        self._ns_cli("hypotest", "--mu", f"{POI_TEST:g}", "--expected-set"),
                        self.repeat,
                        ONCE_ABOVE_S,
                    )
                )
        cls: dict[str, Any] = {}
        if _ok(ours):
            cls["ours"] = [float(ours[2].cls_obs), [float(x) for x in ours[2].cls_exp]]
        if _ok(ours_cli):
            cls["ours_cli"] = [ours_cli[2]["cls_obs"], ours_cli[2]["cls_exp"]]
        if (r := _result(torch_cli)) is not None:
            cls["ours_torch_cli"] = [r["cls_obs"], r["cls_exp"]]
        if (r := _result(ours_numpy)) is not None:
            cls["ours_numpy"] = [float(r["cls_obs"]), [float(x) for x in r["cls_exp"]]]
        if _ok(ref):
            cls["pyhf"] = [float(ref[2][0]), [float(x) for x in ref[2][1]]]
        if _ok(pyhf_cli):
            cls["pyhf_cli"] = [pyhf_cli[2]["CLs_obs"], pyhf_cli[2]["CLs_exp"]]
        if tight is not None and _ok(tight):
            cls["pyhf_tight"] = [float(tight[2][0]), [float(x) for x in tight[2][1]]]
        if ns_in is not None and _ok(ns_in):
            cls["nextstat"] = [float(ns_in[2][0]), None]
        if ns_cli is not None and _ok(ns_cli):
            cls["nextstat_cli"] = [ns_cli[2]["cls"], ns_cli[2]["expected_set"]["cls"]]
        agree: dict[str, Any] = {
            "pyhf_timed": PYHF_DEFAULT,
            "pyhf_tight": PYHF_TIGHT if self.tight else "not run here (--tight)",
            "expected_order": "-2 sigma .. +2 sigma (ascending CLs)",
            "cls_obs": {k: v[0] for k, v in cls.items()},
            "cls_exp": {k: v[1] for k, v in cls.items() if v[1] is not None},
        }
        if tight is not None and not _ok(tight):
            agree["pyhf_tight_error"] = tight["error"]
        if "ours" in cls:
            for ref_key in ("pyhf", "pyhf_tight", "nextstat", "nextstat_cli"):
                if ref_key in cls:
                    agree[f"cls_obs_rel_diff_ours_vs_{ref_key}"] = _rel_diff(
                        cls["ours"][0], cls[ref_key][0]
                    )
                    if cls[ref_key][1] is not None:
                        agree[f"cls_exp_max_rel_diff_ours_vs_{ref_key}"] = _rel_diff(
                            cls["ours"][1], cls[ref_key][1]
                        )
        if "ours_numpy" in cls:
            for ref_key in ("ours", "pyhf", "pyhf_tight", "nextstat", "nextstat_cli"):
                if ref_key in cls:
                    agree[f"cls_obs_rel_diff_ours_numpy_vs_{ref_key}"] = _rel_diff(
                        cls["ours_numpy"][0], cls[ref_key][0]
                    )
                    if cls[ref_key][1] is not None:
                        agree[f"cls_exp_max_rel_diff_ours_numpy_vs_{ref_key}"] = _rel_diff(
                            cls["ours_numpy"][1], cls[ref_key][1]
                        )
        return {
            "poi_value": POI_TEST,
            "test_stat": "qtilde",
            "whole_process": self._with_engines(
                self._times(
                    ours_cli,
                    pyhf_cli,
                    ns_cli,
                    ours=f"diffana hypotest WS --poi-value {POI_TEST:g} --device {self.device}",
                    pyhf=f"pyhf cls WS --test-poi {POI_TEST:g} --test-stat qtilde",
                    nextstat=f"nextstat hypotest --input WS --mu {POI_TEST:g} --expected-set "
                    "--threads 1",
                ),
                torch_cli=torch_cli,
                torch_call=f"diffana hypotest WS --poi-value {POI_TEST:g} --device "
                f"{self.device} --backend torch",
                backend=backend,
            ),
            "in_process": self._with_engines(
                self._times(
                    ours,
                    ref,
                    ns_in,
                    ours=f'analysis.inference.hypotest(model, data, {POI_TEST:g}, "qtilde")',
                    pyhf=f'pyhf.infer.hypotest({POI_TEST:g}, data, model, test_stat="qtilde", '
                    "return_expected_set=True)",
                    nextstat=f"nextstat.hypotest({POI_TEST:g}, model, return_tail_probs=True) "
                    "(observed CLs only; its expected set from the command)",
                ),
                numpy_side=ours_numpy,
                numpy_call=f"analysis.numpy_backend.infer.hypotest(model, data, {POI_TEST:g}, "
                '"qtilde")',
            ),
            "pyhf_tight_s": tight[0] if tight is not None and _ok(tight) else None,
            "agreement": agree,
        }

    # --- limit -------------------------------------------------------------------------------

    def limit(self) -> dict:
        model, data = self.model, self.data
        upper = self.limit_upper

        def ours_limit():
            return inference.upper_limit(model, data, cl=CL)

        ours = _attempt(lambda: self._ours(ours_limit))
        ours_cli = _attempt(lambda: _measure_process(self._ours_cli("limit"), self.repeat))
        backend = self._command_backend("limit")
        torch_cli = self._ours_torch_cli(backend, "limit")
        ours_numpy = self._numpy(
            lambda np_model, np_data: numpy_infer.upper_limit_with_curve(np_model, np_data, CL)
        )
        # the numpy call computes the 31-point CLs curve too (as diffana limit): the torch
        # engine's same call, for a like-for-like in-process ratio, where numpy was timed
        ours_curve = None
        if _result(ours_numpy) is not None:
            ours_curve = _attempt(
                lambda: self._ours(lambda: inference.upper_limit_with_curve(model, data, CL))
            )
        pyhf_argv = [sys.executable, "-c", PYHF_LIMIT_SCRIPT, str(self.path), f"{upper:g}"]
        run_pyhf = self.pyhf_limit == "all" or (self.pyhf_limit == "small" and self._small())
        pyhf_proc = tight = None
        if run_pyhf:
            pyhf_proc = _attempt(
                lambda: _measure_process([*pyhf_argv, "default"], self.repeat, ONCE_ABOVE_S)
            )
        if run_pyhf and self.tight and self._small():  # on SUSY: dozens of minutes-long tests
            tight = _attempt(lambda: _process([*pyhf_argv, "tight"]))
        ns_in = ns_cli = None
        if self.ns is not None:
            ns_in = _attempt(
                lambda: _measure(
                    lambda: self.ns.upper_limit(
                        self.ns_model, method="root", alpha=1 - CL, hi=upper
                    ),
                    self.repeat,
                    ONCE_ABOVE_S,
                )
            )
            if self.nextstat_cli:
                ns_cli = _attempt(
                    lambda: _measure_process(
                        self._ns_cli(
                            "upper-limit",
                            "--expected",
                            "--alpha",
                            f"{1 - CL:g}",
                            "--hi",
                            f"{upper:g}",
                        ),
                        self.repeat,
                        ONCE_ABOVE_S,
                    )
                )
        limits: dict[str, Any] = {}
        if _ok(ours):
            limits["ours"] = [ours[2].observed, list(ours[2].expected)]
        if _ok(ours_cli):
            limits["ours_cli"] = [ours_cli[2]["observed"], ours_cli[2]["expected"]]
        if (r := _result(torch_cli)) is not None:
            limits["ours_torch_cli"] = [r["observed"], r["expected"]]
        if (r := _result(ours_numpy)) is not None:
            limits["ours_numpy"] = [float(r["observed"]), [float(x) for x in r["expected"]]]
        if pyhf_proc is not None and _ok(pyhf_proc):
            limits["pyhf"] = [pyhf_proc[2]["observed"], pyhf_proc[2]["expected"]]
        if tight is not None and _ok(tight):
            limits["pyhf_tight"] = [tight[1]["observed"], tight[1]["expected"]]
        if ns_in is not None and _ok(ns_in):
            limits["nextstat"] = [float(ns_in[2][0]), [float(x) for x in ns_in[2][1]]]
        if ns_cli is not None and _ok(ns_cli):
            limits["nextstat_cli"] = [ns_cli[2]["obs_limit"], ns_cli[2]["exp_limits"]]
        agree: dict[str, Any] = {
            "cl": CL,
            "pyhf_timed": f"toms748_scan(data, model, 0, {upper:g}, level={1 - CL:g}) "
            f"(rtol 1e-4), {PYHF_DEFAULT}",
            "expected_order": "-2 sigma .. +2 sigma",
            "observed": {k: v[0] for k, v in limits.items()},
            "expected": {k: v[1] for k, v in limits.items()},
        }
        if tight is not None:
            agree["pyhf_tight"] = f"the same with {PYHF_TIGHT}"
            if not _ok(tight):
                agree["pyhf_tight_error"] = tight["error"]
        if "ours" in limits:
            for ref_key in ("pyhf", "pyhf_tight", "nextstat"):
                if ref_key in limits:
                    agree[f"observed_rel_diff_ours_vs_{ref_key}"] = _rel_diff(
                        limits["ours"][0], limits[ref_key][0]
                    )
                    agree[f"expected_max_rel_diff_ours_vs_{ref_key}"] = _rel_diff(
                        limits["ours"][1], limits[ref_key][1]
                    )
        if "ours_numpy" in limits:
            for ref_key in ("ours", "pyhf", "pyhf_tight", "nextstat"):
                if ref_key in limits:
                    agree[f"observed_rel_diff_ours_numpy_vs_{ref_key}"] = _rel_diff(
                        limits["ours_numpy"][0], limits[ref_key][0]
                    )
                    agree[f"expected_max_rel_diff_ours_numpy_vs_{ref_key}"] = _rel_diff(
                        limits["ours_numpy"][1], limits[ref_key][1]
                    )
        # pyhf's in-process time is the one its script measured around toms748_scan
        pyhf_in = None
        if pyhf_proc is not None:
            pyhf_in = (
                (pyhf_proc[2]["seconds"], [pyhf_proc[2]["seconds"]], None)
                if _ok(pyhf_proc)
                else pyhf_proc
            )
        skipped = f"skipped (--pyhf-limit {self.pyhf_limit})" if pyhf_proc is None else None
        whole = self._times(
            ours_cli,
            pyhf_proc,
            ns_cli,
            ours=f"diffana limit WS --device {self.device} (limits + a "
            "31-point CLs scan for the Brazil plot)",
            pyhf="python -c <pyhf toms748_scan script>",
            nextstat=f"nextstat upper-limit --input WS --expected --alpha {1 - CL:g} "
            f"--hi {upper:g} --threads 1",
        )
        inproc = self._times(
            ours,
            pyhf_in,
            ns_in,
            ours=f"analysis.inference.upper_limit(model, data, cl={CL:g})",
            pyhf=f"pyhf.infer.intervals.upper_limits.toms748_scan(data, model, 0, {upper:g}, "
            f"level={1 - CL:g}) (timed inside the script above)",
            nextstat=f'nextstat.upper_limit(model, method="root", alpha={1 - CL:g}, hi={upper:g})',
        )
        if skipped:
            whole["pyhf_s"] = inproc["pyhf_s"] = skipped
        self._with_engines(
            whole,
            torch_cli=torch_cli,
            torch_call=f"diffana limit WS --device {self.device} --backend torch",
            backend=backend,
        )
        self._with_engines(
            inproc,
            numpy_side=ours_numpy,
            numpy_call=f"analysis.numpy_backend.infer.upper_limit_with_curve(model, data, "
            f"{CL:g}) (the limits and the 31-point CLs curve, as diffana limit)",
        )
        if ours_curve is not None:
            inproc["calls"]["ours_with_curve"] = (
                f"analysis.inference.upper_limit_with_curve(model, data, {CL:g}) (the torch "
                "engine's call of diffana limit: the numpy call's counterpart)"
            )
            _side(inproc, "ours_with_curve", ours_curve)
            inproc["ratio_ours_with_curve_over_ours_numpy"] = _ratio(
                inproc["ours_with_curve_s"], inproc["ours_numpy_s"]
            )
        return {
            "whole_process": whole,
            "in_process": inproc,
            "pyhf_tight_s": tight[1]["seconds"] if tight is not None and _ok(tight) else None,
            "agreement": agree,
        }

    # --- ranking -----------------------------------------------------------------------------

    def ranking(self) -> dict:
        """``diffana ranking`` (4 refits per nuisance parameter) and its library call, ours only:
        pyhf has no ranking, and cabinetry's (pyhf MINUIT fits, 4 x 218 on the SUSY workspace
        at ~15 s each) would take hours. A run over ONCE_ABOVE_S is timed once."""
        model, data = self.model, self.data

        def ours_ranking():
            init, fixed = model.suggested_init(), model.suggested_fixed()
            best = inference.global_fit(model, data, init, fixed, ())
            return inference.ranking(model, data, best)

        def timed_once_above() -> Any:
            default = torch.get_num_threads()
            try:
                torch.set_num_threads(1)
                with torch.no_grad():
                    return _measure(ours_ranking, self.repeat, ONCE_ABOVE_S)
            finally:
                torch.set_num_threads(default)

        ours = _attempt(timed_once_above)
        ours_cli = _attempt(
            lambda: _measure_process(self._ours_cli("ranking"), self.repeat, ONCE_ABOVE_S)
        )
        return {
            "whole_process": self._times(
                ours_cli, None, None, ours=f"diffana ranking WS --device {self.device}"
            ),
            "in_process": self._times(
                ours,
                None,
                None,
                ours="analysis.inference.ranking(model, data, global_fit(model, data, ...))",
            ),
            "refits": 4 * (int(model.npars) - 1),
        }

    def _small(self) -> bool:
        """A workspace whose pyhf limit takes seconds, not an hour (pyhf's validation ones)."""
        return int(self.model.npars) <= SMALL_PARAMETERS

    def run(self) -> dict:
        out: dict[str, Any] = {"workspace": self.workspace_info()}
        for case in ("fit", "hypotest", "limit", "ranking"):
            start = time.perf_counter()
            out[case] = _attempt(getattr(self, case))
            print(
                f"[bench_stats] {self.name} {case}: {time.perf_counter() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        return out


def published(args) -> dict:
    """The --published section: one entry per workspace, and what was measured how."""
    ns = _import_nextstat()
    if ns is not None:
        ns.set_threads(1)  # Rayon's pool: one thread, like our side and pyhf's numpy
    reference = pathlib.Path(args.reference_dir)
    # our package's bytecode, as pip writes it for an installed package (pyhf's is): without
    # it an editable install under PYTHONDONTWRITEBYTECODE=1 compiles every module per process
    compileall.compile_dir(str(pathlib.Path(analysis.__file__).parent), quiet=1)
    out: dict[str, Any] = {
        "bytecode": "analysis compiled with compileall before the whole-process timings",
        "nextstat": getattr(ns, "__version__", "?") if ns is not None else "not installed",
        "reference_dir": str(reference),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_start": list(os.getloadavg()),
        "threads": "one on every side: our in-process calls torch.set_num_threads(1) (the CLI's "
        "--threads default), NextStat set_threads(1) and --threads 1, pyhf numpy under "
        "OMP_NUM_THREADS",
        "timing": f"ours: best of {args.repeat} (in-process: a first call under "
        f"{WARMUP_BELOW_S:g} s is a warm-up); pyhf and NextStat the same, but a call or "
        f"command over {ONCE_ABOVE_S:g} s is timed once; whole process = wall time of the "
        "command in a subprocess",
        "pyhf_timed": PYHF_DEFAULT,
        "pyhf_agreement_reference": f"{PYHF_TIGHT} on {TIGHT_WHERE[args.tight]} (--tight "
        f"{args.tight}); everywhere: pyhf's model.logpdf at each tool's best fit",
    }
    cases: list[tuple[str, pathlib.Path, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench_stats_") as tmp:
        if "susy" in args.workspaces:
            cases.append(("ANA-SUSY-2018-16", reference / SUSY_WORKSPACE, SUSY_LIMIT_BRACKET))
        chosen = [
            c for c in VALIDATION_CASES if "validation" in args.workspaces or c in args.workspaces
        ]
        if chosen:
            for case in chosen:
                source = reference / "pyhf_validation" / "reference_cases" / f"{case}.json"
                if not source.exists():
                    out[f"pyhf_validation/{case}"] = {"error": f"{source} not found"}
                    continue
                path = pathlib.Path(tmp) / f"{case}.json"
                path.write_text(json.dumps(json.loads(source.read_text())["workspace"]))
                cases.append((f"pyhf_validation/{case}", path, 5.0))
        for name, path, upper in cases:
            if not path.exists():
                out[name] = {"error": f"{path} not found"}
                continue
            bench = _attempt(lambda: PublishedBench(name, path, upper, args, ns))  # noqa: B023
            out[name] = bench.run() if isinstance(bench, PublishedBench) else bench
    out["load_average_end"] = list(os.getloadavg())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller pyhf subsets, fewer runs")
    parser.add_argument(
        "--cases",
        default=None,
        help="which of the cases (a)-(d) to run (letters); default abcd, none with --published",
    )
    published_args = parser.add_argument_group("--published")
    published_args.add_argument(
        "--published",
        action="store_true",
        help="the published SUSY likelihood and pyhf's validation workspaces against pyhf (and "
        "NextStat), whole process and in-process",
    )
    published_args.add_argument(
        "--workspaces",
        default="susy,validation",
        help="comma-separated: susy, validation (all four) or validation case names "
        "(default: susy,validation)",
    )
    published_args.add_argument(
        "--reference-dir",
        default=str(REFERENCE_DIR),
        help="the shared reference folder (default: ../shared/reference of the project)",
    )
    published_args.add_argument(
        "--repeat", type=int, default=None, help="timed runs of our side (default 3, 1 --quick)"
    )
    published_args.add_argument(
        "--tight",
        choices=tuple(TIGHT_WHERE),
        default="small",
        help="where pyhf's tight-MINUIT agreement reference runs (fit, hypotest; limit on "
        "small workspaces only): all, small workspaces (default; a tight MINUIT fit of the "
        "SUSY workspace takes over half an hour), none",
    )
    published_args.add_argument(
        "--numpy-susy",
        action="store_true",
        help=f"also time the numpy backend in-process on workspaces above "
        f"{AUTO_MAX_PARAMETERS} parameters (the SUSY one: slow, timed once); without it "
        "numpy runs on the small workspaces only",
    )
    published_args.add_argument(
        "--pyhf-limit",
        choices=("all", "small", "none"),
        default="all",
        help="where to run pyhf's toms748 limit (~80 minutes on the SUSY workspace): all "
        "(default), small workspaces only, none",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    repeat = 1 if args.quick else 3
    if args.repeat is None:
        args.repeat = repeat
    if args.cases is None:
        args.cases = "" if args.published else "abcd"
    args.workspaces = {w.strip() for w in args.workspaces.split(",") if w.strip()}
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
    if args.published:
        out["published"] = published(args)
    out["total_s"] = time.perf_counter() - start
    print(json.dumps(_strict(out), indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
