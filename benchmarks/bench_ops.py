"""Soft cuts + KDE histogram, forward and backward, as JSON figures.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--events 100000 1000000 10000000]

For each number of events N and dtype (float32, float64) it times one forward+backward pass of
the differentiable selection and histogram, as in an optimisation step: 5 soft cuts with
trainable thresholds (``log_selection_weight``), event weights ``w * exp(log w)``, a 20-bin KDE
histogram (bandwidth 0.36 bin widths) and a loss of the yields and ``sumw2``; gradients with
respect to the thresholds. It reports the cuts alone, the cuts with the windowed
``kde_histogram`` and with the per-bin ``kde_histogram_dense``, and the ratio dense/windowed.
Times are the minimum over repeats after one warm-up pass (CUDA synchronised around each pass);
on CPU the process CPU time of the windowed pass is given too (with one thread it is the work
done, while wall time also counts time spent descheduled on a loaded machine).
The dense op is skipped above ``--dense-max-events`` (its N x 21 CDFs and their autograd buffers
take tens of seconds and several GiB per pass on a small CPU); the JSON says so.

On CPU the default is one intra-op thread (``--threads 0`` keeps torch's default): on a small
shared machine OpenMP with as many threads as cores stalls whenever another process takes a core
(measured here: 100 s instead of 2.7 s for one pass at 1e7 events), which makes figures
meaningless. The temperatures are measured on the first 1e6 events (a property of the
distribution, and sorting 1e7 values five times would dominate the set-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from analysis.histograms import kde_histogram, kde_histogram_dense
from analysis.selection import SoftCut, cut_temperature, log_selection_weight

N_BINS = 20
BANDWIDTH_BIN_WIDTHS = 0.36
TAU_RELATIVE = 0.1
CUTS = (  # (distribution, threshold, direction)
    ("exponential", 20.0, ">"),
    ("exponential", 60.0, "<"),
    ("normal", -1.5, ">"),
    ("normal", 1.5, "<"),
    ("uniform", 0.2, ">"),
)


def make_problem(n: int, dtype: torch.dtype, device: torch.device, seed: int = 1) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    columns = []
    for kind, _, _ in CUTS:
        if kind == "exponential":
            col = torch.empty(n, dtype=dtype, device=device).exponential_(1 / 30.0, generator=gen)
        elif kind == "normal":
            col = torch.randn(n, dtype=dtype, device=device, generator=gen)
        else:
            col = torch.rand(n, dtype=dtype, device=device, generator=gen)
        columns.append(col)
    weight = torch.rand(n, dtype=dtype, device=device, generator=gen) + 0.5
    values = torch.rand(n, dtype=dtype, device=device, generator=gen) * 100.0
    edges = torch.linspace(0.0, 100.0, N_BINS + 1, dtype=dtype, device=device)
    thresholds = torch.nn.Parameter(
        torch.tensor([c for _, c, _ in CUTS], dtype=dtype, device=device)
    )
    sub = slice(0, 1_000_000)
    taus = torch.stack([cut_temperature(col[sub], weight[sub], TAU_RELATIVE) for col in columns])
    bandwidth = torch.tensor(BANDWIDTH_BIN_WIDTHS * 100.0 / N_BINS, dtype=dtype, device=device)
    return {
        "columns": columns,
        "weight": weight,
        "values": values,
        "edges": edges,
        "thresholds": thresholds,
        "taus": taus,
        "bandwidth": bandwidth,
    }


def step(problem: dict, histogram) -> None:
    """One forward+backward pass; ``histogram`` None times the cuts alone."""
    p = problem
    cuts = [
        SoftCut(col, p["thresholds"][k], p["taus"][k], CUTS[k][2])
        for k, col in enumerate(p["columns"])
    ]
    w = p["weight"] * torch.exp(log_selection_weight(cuts))
    if histogram is None:
        loss = w.sum()
    else:
        h = histogram(p["values"], w, p["edges"], p["bandwidth"])
        loss = (h.yields.double() ** 2 / (h.sumw2.double() + 1.0)).sum()
    loss.backward()
    p["thresholds"].grad = None


def timed(problem: dict, histogram, repeats: int, device: torch.device) -> dict:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(problem, histogram)  # warm-up
    times, cpu_times = [], []
    for _ in range(repeats):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(problem, histogram)
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "min": min(times),
        "median": statistics.median(times),
        "cpu": min(cpu_times),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dense-max-events",
        type=int,
        default=None,
        help="largest N timed with the dense op (default 1e6 on CPU, 1e7 on CUDA)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default 1 on CPU; 0: torch's)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    dense_max = args.dense_max_events or (10_000_000 if device.type == "cuda" else 1_000_000)

    load_average = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    results = []
    for n in args.events:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            problem = make_problem(n, dtype, device)
            repeats = args.repeats if n < 10_000_000 else max(1, args.repeats - 1)
            cuts = timed(problem, None, repeats, device)
            windowed = timed(problem, kde_histogram, repeats, device)
            entry = {
                "events": n,
                "dtype": dtype_name,
                "cuts_seconds": round(cuts["min"], 5),
                "cuts_kde_seconds": round(windowed["min"], 5),
                "cuts_kde_median_seconds": round(windowed["median"], 5),
                "cuts_kde_process_cpu_seconds": round(windowed["cpu"], 5),
                "cuts_kde_events_per_second": round(n / windowed["min"]),
                "repeats": windowed["repeats"],
            }
            if n <= dense_max:
                dense = timed(problem, kde_histogram_dense, max(1, repeats - 1), device)
                entry["cuts_dense_kde_seconds"] = round(dense["min"], 5)
                entry["dense_over_windowed"] = round(dense["min"] / windowed["min"], 2)
                # the histogram alone, by difference with the cuts alone
                entry["kde_only_dense_over_windowed"] = round(
                    (dense["min"] - cuts["min"]) / (windowed["min"] - cuts["min"]), 2
                )
            else:
                entry["cuts_dense_kde_seconds"] = None
                entry["dense_skipped"] = (
                    f"N = {n} > --dense-max-events = {dense_max}: N x {N_BINS + 1} CDFs per pass"
                )
            results.append(entry)
            del problem

    print(
        json.dumps(
            {
                "device": str(device),
                "device_name": (
                    torch.cuda.get_device_name(device)
                    if device.type == "cuda"
                    else platform.processor() or platform.machine()
                ),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load_average_at_start": load_average,
                "bins": N_BINS,
                "cuts": len(CUTS),
                "bandwidth_bin_widths": BANDWIDTH_BIN_WIDTHS,
                "tau_relative": TAU_RELATIVE,
                "gradients_wrt": "cut thresholds",
                "results": results,
                "total_seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
