"""Soft cuts + KDE histograms and one full optimization step, timed, as JSON figures.

    python benchmarks/bench_pipeline.py [--quick] [--device cpu|cuda] [--output FILE]
        [--skip-ops] [--skip-step] [--threads N ...] [--step-events N] [--step-dtypes float64]

(e.g. only the step, float64 events, one thread: ``--skip-ops --threads 1 --step-dtypes
float64``; ``--workdir DIR`` keeps the generated demo data for the next run.)

1. ``ops``: forward and backward of the differentiable selection and histogram for N events
   (default 1e5, 1e6, 1e7) in float32 and float64: 6 soft cuts on 5 columns (``>`` and ``<``
   cuts and a window as two cuts on one column, :func:`analysis.selection.selection_weight`, the
   product of sigmoids the pipeline uses), weights ``w * prod_k sigmoid``, a 20-bin KDE
   histogram with bandwidth 0.5 bin widths (yields and sum of w^2), loss
   ``sum_b n_b^2 / (s_b + 1)`` and its gradient with respect to the 6 thresholds. Three
   histogram implementations in the same run: ``windowed`` (:func:`kde_histogram` on unsorted
   values), ``windowed_sorted`` (the same op on values sorted ascending, the path
   :class:`~analysis.pipeline.AnalysisPipeline` uses) and ``dense`` (:func:`kde_histogram_dense`,
   all N x 21 CDFs with plain autograd). The dense op is skipped, with the reason, when its
   estimated peak memory (``DENSE_BYTES`` per event and edge and byte of the dtype, measured:
   about 50 B per event and edge in float64) exceeds ``--dense-max-bytes`` (6 GB). Windowed and
   dense are compared: largest relative difference of a bin (yields, sum of w^2) and of the
   gradient (relative to its largest component).
2. ``step``: one full optimization step on the demo analysis (``models/dimuon.yaml``) with
   ``--step-events`` Monte Carlo events in total (generated with :func:`analysis.generate.generate`
   into a temporary folder, read once), as :func:`analysis.optimize.relaxed_loss` takes it:
   ``pipeline.histograms_and_selected_counts(tau, bandwidth, background)`` at the configured
   initial temperature and bandwidth (the soft cuts evaluated once for the KDE histograms of
   every template and the MC-statistics guard's selected counts of the background),
   ``pipeline.likelihood(histograms)`` (the float64 model, its structure built on the first
   call and fed new numbers afterwards), the configured objective (fit), the guard factor,
   backward and an Adam step. Events in each of ``--step-dtypes`` (default float64 and
   float32), with each of ``--threads`` (default 1 and 2). Breakdown per step: soft cuts, KDE
   histograms and selected counts (``soft_cuts_and_histograms``), model build
   (``pipeline.likelihood``: floors, spec, HistFactory model), objective (fit), guard factor
   (``mc_statistics_guard``: n_eff and the discount) and backward + Adam step; first at fixed
   knobs (``seconds``: ``--step-repeats`` steps after a warm-up, the initial temperature and
   bandwidth), then as a run takes them (``annealed_run``: ``Steps`` steps of the configured
   schedule from the configured cuts, the bandwidth in ``BandwidthLevels`` levels, so the
   kernel values are computed again at each level; ``step_mean`` is what a step of a run
   costs, without the hard evaluations every ``EvaluateEvery`` steps). The pipeline
   applies the fixed (``Trainable: false``) cuts of the control regions as a boolean selection
   when it is built: ``input_template_rows`` counts the Monte Carlo rows read (after the
   regions' Filter), ``template_rows`` those the pipeline keeps and softens.

Times are medians over ``--repeats`` after one warm-up, in milliseconds (``ops``) and seconds
(``step``; ``step_min`` the fastest step); CUDA is synchronised around each timed part. The first
step at a bandwidth computes the KDE's kernel values, the later ones reuse them
(:class:`analysis.histograms.KDELayout`): the warm-up is such a first step. Like ``diffana
optimize``, the script asks glibc's malloc to keep freed memory (``keep_freed_memory``;
``--default-malloc``: not), and records the page faults per step
(``minor_page_faults_per_step``). ``--model FILE``: another analysis on the same generated
ntuples (e.g. an older, one-region version of the demo). ``machine_reference_at_start`` and
``_at_end``: two fixed workloads (``erfc`` of 4e6 numbers; 64 MiB of fresh memory written), to
compare runs of different days on a shared machine. On a shared machine wall times include
time spent descheduled: the load average is recorded at the start and the end, and the step's
CPU time of the calling thread (``step_thread_cpu``; with one thread the whole step's work) is
recorded beside its wall time. The micro
benchmark runs with the first of ``--threads`` (default 1: on small shared machines OpenMP with
as many threads as cores stalls whenever another process takes a core).
``--quick``: 1e4 and 1e5 events, a 1e5-event demo, 2 repeats (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch
import yaml

from analysis import config as configuration
from analysis import generate, mc_statistics
from analysis.cli._common import keep_freed_memory
from analysis.histograms import kde_histogram, kde_histogram_dense
from analysis.io import read_events
from analysis.objectives import get_objective
from analysis.optimize import schedule
from analysis.pipeline import AnalysisPipeline
from analysis.selection import SoftCut, cut_temperature, selection_weight

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_BINS = 20
RANGE = (0.0, 100.0)
BANDWIDTH_BIN_WIDTHS = 0.5
TAU_RELATIVE = 0.1
COLUMNS = ("exponential", "exponential", "normal", "uniform", "normal")
CUTS = ((0, ">", 20.0), (1, "<", 60.0), (3, ">", 0.2), (4, "<", 1.0))  # (column, dir, value)
WINDOW = (2, -1.5, 1.5)  # column 2 inside (low, high)
DENSE_BYTES = 7
"""Peak memory of a dense forward + backward per event, edge and byte of the dtype (measured
at 1e6 events: 50 B in float64, 26 B in float32, per event and edge)."""
TARGET_STEP_SECONDS = 0.12


# ----------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 3)


def progress(args, text: str) -> None:
    if args.verbose:
        print(text, file=sys.stderr, flush=True)


def max_relative(got: torch.Tensor, ref: torch.Tensor, per_element: bool) -> float:
    """Largest ``|got - ref|`` relative to ``|ref|`` (per element) or to ``max |ref|``."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    diff = (got - ref).abs()
    scale = ref.abs() if per_element else ref.abs().max()
    return float((diff / torch.clamp(scale, min=1e-300)).max())


# ----------------------------------------------------------------------------- 1. ops
def make_problem(n: int, dtype: torch.dtype, device: torch.device, seed: int = 1) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    columns = []
    for kind in COLUMNS:
        col = torch.empty(n, dtype=dtype, device=device)
        if kind == "exponential":
            col.exponential_(1 / 30.0, generator=gen)
        elif kind == "normal":
            col.normal_(generator=gen)
        else:
            col.uniform_(generator=gen)
        columns.append(col)
    weight = torch.rand(n, dtype=dtype, device=device, generator=gen) + 0.5
    low, high = RANGE
    span = high - low
    # some events outside the range, whose kernels reach in partly or not at all
    values = (
        torch.rand(n, dtype=dtype, device=device, generator=gen) * 1.1 * span + low - 0.05 * span
    )
    sub = slice(0, 1_000_000)  # the temperatures are a property of the distributions
    taus = [cut_temperature(col[sub], weight[sub], TAU_RELATIVE) for col in columns]
    thresholds = [value for _, _, value in CUTS] + list(WINDOW[1:])
    return {
        "columns": columns,
        "weight": weight,
        "values": values,
        "edges": torch.linspace(low, high, N_BINS + 1, dtype=dtype, device=device),
        "bandwidth": BANDWIDTH_BIN_WIDTHS * span / N_BINS,
        "taus": taus,
        "thresholds": torch.nn.Parameter(torch.tensor(thresholds, dtype=dtype, device=device)),
    }


def sorted_problem(problem: dict) -> dict:
    """The same events ordered by the observable (as the pipeline stores them)."""
    order = torch.argsort(problem["values"], stable=True)
    return problem | {
        "columns": [col[order] for col in problem["columns"]],
        "weight": problem["weight"][order],
        "values": problem["values"][order],
        "thresholds": torch.nn.Parameter(problem["thresholds"].detach().clone()),
    }


def forward(problem: dict, histogram):
    """Soft cuts -> weights -> histogram -> loss."""
    p, c = problem, problem["thresholds"]
    cuts = [
        SoftCut(p["columns"][k], c[i], p["taus"][k], direction)
        for i, (k, direction, _) in enumerate(CUTS)
    ]
    k = WINDOW[0]  # the window low < x < high as two cuts
    cuts += [
        SoftCut(p["columns"][k], c[len(CUTS)], p["taus"][k], ">"),
        SoftCut(p["columns"][k], c[len(CUTS) + 1], p["taus"][k], "<"),
    ]
    hist = histogram(p["values"], p["weight"] * selection_weight(cuts), p["edges"], p["bandwidth"])
    loss = (hist.yields.double() ** 2 / (hist.sumw2.double() + 1.0)).sum()
    return hist, loss


def time_op(problem: dict, histogram, repeats: int, device: torch.device) -> dict:
    """Median forward and backward times (ms) after one warm-up; the last result."""
    fwd, bwd = [], []
    for i in range(repeats + 1):
        problem["thresholds"].grad = None
        sync(device)
        start = time.perf_counter()
        hist, loss = forward(problem, histogram)
        sync(device)
        middle = time.perf_counter()
        loss.backward()
        sync(device)
        end = time.perf_counter()
        if i:  # the first pass is the warm-up
            fwd.append(middle - start)
            bwd.append(end - middle)
    total = [f + b for f, b in zip(fwd, bwd, strict=True)]
    return {
        "forward_ms": median_ms(fwd),
        "backward_ms": median_ms(bwd),
        "total_ms": median_ms(total),
        "result": (hist.yields.detach(), hist.sumw2.detach(), problem["thresholds"].grad.clone()),
    }


def dense_skip_reason(n: int, dtype: torch.dtype, device: torch.device, limit: float) -> str | None:
    need = DENSE_BYTES * torch.finfo(dtype).bits // 8 * n * (N_BINS + 1)
    if device.type == "cuda":
        limit = min(limit, 0.8 * torch.cuda.mem_get_info(device)[0])
    if need > limit:
        return (
            f"estimated peak memory {need / 1e9:.1f} GB (N x {N_BINS + 1} CDFs and their autograd "
            f"buffers) > {limit / 1e9:.1f} GB"
        )
    return None


def bench_ops(args, device: torch.device) -> list[dict]:
    results = []
    for n in args.events:
        for dtype_name in ("float32", "float64"):
            dtype = getattr(torch, dtype_name)
            problem = make_problem(n, dtype, device)
            repeats = args.repeats if n < 10_000_000 else max(2, args.repeats - 2)
            windowed = time_op(problem, kde_histogram, repeats, device)
            ordered = time_op(sorted_problem(problem), kde_histogram, repeats, device)
            entry = {
                "events": n,
                "dtype": dtype_name,
                "repeats": repeats,
                "windowed": {k: v for k, v in windowed.items() if k != "result"},
                "windowed_sorted": {k: v for k, v in ordered.items() if k != "result"},
            }
            reason = dense_skip_reason(n, dtype, device, args.dense_max_bytes)
            if reason is None:
                dense = time_op(problem, kde_histogram_dense, max(1, repeats - 1), device)
                entry["dense"] = {k: v for k, v in dense.items() if k != "result"}
                entry["speedup_dense_over_windowed"] = round(
                    dense["total_ms"] / windowed["total_ms"], 2
                )
                got, ref = windowed["result"], dense["result"]
                entry["agreement_windowed_vs_dense"] = {
                    "yields_max_rel": max_relative(got[0], ref[0], per_element=True),
                    "sumw2_max_rel": max_relative(got[1], ref[1], per_element=True),
                    "gradient_max_rel": max_relative(got[2], ref[2], per_element=False),
                }
            else:
                entry["dense"] = None
                entry["dense_skipped"] = reason
            entry["agreement_sorted_vs_unsorted"] = {
                "yields_max_rel": max_relative(ordered["result"][0], windowed["result"][0], True),
                "gradient_max_rel": max_relative(
                    ordered["result"][2], windowed["result"][2], False
                ),
            }
            results.append(entry)
            progress(args, f"ops: {n} events, {dtype_name}")
            del problem
    return results


# ----------------------------------------------------------------------------- 2. step
def demo_config(data_dir: pathlib.Path, model: pathlib.Path | None = None) -> configuration.Config:
    """The analysis ``model`` (default: the demo, ``models/dimuon.yaml``) on the generated
    ntuples in ``data_dir``."""
    model = model or ROOT / "models" / "dimuon.yaml"
    raw = yaml.safe_load(model.read_text())
    raw["General"]["InputPath"] = str(data_dir / "{SamplePath}")
    return configuration.from_dict(raw, source=f"{model} (benchmark data)")


def machine_reference(dtype: torch.dtype = torch.float64) -> dict:
    """Milliseconds (best of 5) of two fixed workloads on one thread, to compare runs made on
    different days of a shared machine: ``erfc`` of 4e6 numbers (compute) and writing 64 MiB
    of fresh memory (page faults and memory bandwidth, what the step's temporaries cost)."""
    x = torch.linspace(0.0, 6.0, 4_000_000, dtype=dtype)
    out = {}
    for name, work in (
        ("erfc_4e6_ms", lambda: torch.special.erfc(x)),
        ("fresh_64MiB_ms", lambda: torch.empty(8 << 20, dtype=torch.float64).fill_(1.0)),
    ):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        out[name] = round(1e3 * min(times), 2)
    return out


def time_steps(
    pipeline,
    objective,
    settings,
    knobs: list[tuple[float, float]],
    device: torch.device,
    warm_up: bool = True,
) -> dict:
    """Seconds of the steps at ``knobs`` (``(tau, bandwidth)`` per step; with ``warm_up`` the
    first is not counted): per part the median, and the mean and largest of whole steps."""
    optimizer = torch.optim.Adam([pipeline.cut_parameters], lr=settings.learning_rate)
    config = pipeline.config
    minimum = settings.min_effective_events
    keys = mc_statistics.background_templates(config)
    parts: dict[str, list[float]] = {}
    faults = []
    for i, (tau, bandwidth) in enumerate(knobs):
        sync(device)
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0, cpu0 = time.perf_counter(), time.thread_time()
        histograms, counts = pipeline.histograms_and_selected_counts(  # as relaxed_loss
            tau, bandwidth, keys, variation_sumw2=False
        )
        sync(device)
        t1 = time.perf_counter()
        model = pipeline.likelihood(histograms)
        sync(device)
        t2 = time.perf_counter()
        value = objective(model, None)  # the objectives use Asimov data of the model
        sync(device)
        t3 = time.perf_counter()
        guard = mc_statistics.guard_factor(  # the MC-statistics guard
            mc_statistics.background_effective_events(config, counts), minimum
        )
        penalised = mc_statistics.guarded(value, guard, objective.maximize)
        loss = -penalised if objective.maximize else penalised
        sync(device)
        t35 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        t4, cpu4 = time.perf_counter(), time.thread_time()
        if i or not warm_up:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
            for name, seconds in (
                ("step", t4 - t0),
                ("step_thread_cpu", cpu4 - cpu0),
                ("soft_cuts_and_histograms", t1 - t0),
                ("model_build", t2 - t1),
                ("objective_fit", t3 - t2),
                ("mc_statistics_guard", t35 - t3),
                ("backward_and_adam", t4 - t35),
            ):
                parts.setdefault(name, []).append(seconds)
    out: dict = {name: round(statistics.median(v), 4) for name, v in parts.items()}
    out["step_min"] = round(min(parts["step"]), 4)
    out["step_mean"] = round(statistics.mean(parts["step"]), 4)
    out["step_max"] = round(max(parts["step"]), 4)
    out["minor_page_faults_per_step"] = int(statistics.median(faults))
    return out


def bench_step(args, device: torch.device, workdir: pathlib.Path) -> dict:
    data_dir = workdir / "data"
    start = time.perf_counter()
    generate.generate(data_dir, events=args.step_events, seed=1)
    t_generate = time.perf_counter() - start
    config = demo_config(data_dir, args.model)
    start = time.perf_counter()
    events = read_events(config, cache_dir=workdir / "cache")
    t_read = time.perf_counter() - start
    objective = get_objective(config.optimization.objective)
    data_name = config.data_sample.name
    runs = []
    for dtype_name in args.step_dtypes:
        dtype = getattr(torch, dtype_name)
        start = time.perf_counter()
        pipeline = AnalysisPipeline.from_config(config, events, device=device, dtype=dtype)
        t_build = time.perf_counter() - start
        counts = pipeline.event_counts()
        for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            settings = config.optimization
            pipeline.set_cut_values({c.name: c.value for c in config.cuts})  # same start
            fixed = [(settings.temperature.initial, settings.bandwidth)] * (args.step_repeats + 1)
            seconds = time_steps(pipeline, objective, settings, fixed, device)
            pipeline.set_cut_values({c.name: c.value for c in config.cuts})
            steps = args.annealed_steps or settings.steps
            levels = settings.bandwidth_levels
            annealed = [
                schedule(i, steps, settings.temperature, settings.bandwidth, levels)
                for i in range(steps)
            ]
            pipeline._kde_layouts.clear()  # a run starts without kernel values
            annealed_seconds = time_steps(pipeline, objective, settings, annealed, device, False)
            runs.append(
                {
                    "event_dtype": dtype_name,
                    "threads": torch.get_num_threads(),
                    "pipeline_construction_seconds": round(t_build, 3),
                    "seconds": seconds,
                    "annealed_run": {
                        "steps": steps,
                        "bandwidth_levels": levels,
                        "seconds": annealed_seconds,
                    },
                    "target_seconds": TARGET_STEP_SECONDS,
                    "target_met": seconds["step"] < TARGET_STEP_SECONDS,
                    "annealed_target_met": annealed_seconds["step_mean"] < TARGET_STEP_SECONDS,
                }
            )
            progress(args, f"step: {dtype_name} events, {threads} thread(s)")
        del pipeline
    return {
        "model": str(args.model or "models/dimuon.yaml"),
        "regions": [region.name for region in config.regions],
        "mc_events_generated": args.step_events,
        "input_template_rows": sum(
            len(ev.weight) for key, ev in events.items() if key[1] != data_name
        ),
        "template_rows": sum(n for key, n in counts.items() if key[1] != data_name),
        "data_events": sum(n for key, n in counts.items() if key[1] == data_name),
        "templates": len(counts),
        "objective": objective.name,
        "tau": config.optimization.temperature.initial,
        "bandwidth_bin_widths": config.optimization.bandwidth,
        "likelihood_dtype": "float64",
        "generate_seconds": round(t_generate, 2),
        "read_seconds": round(t_read, 2),
        "repeats": args.step_repeats,
        "runs": runs,
    }


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats (smoke run)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N (default: cuda when available)",
    )
    parser.add_argument("--output", type=pathlib.Path, help="write the JSON here, not to stdout")
    parser.add_argument("--events", type=int, nargs="+", help="ops: event counts")
    parser.add_argument("--step-events", type=int, help="step: MC events of the demo")
    parser.add_argument("--repeats", type=int, help="ops: timed repeats (default 5)")
    parser.add_argument("--step-repeats", type=int, help="step: timed steps (default 5)")
    parser.add_argument(
        "--annealed-steps",
        type=int,
        help="step: length of the annealed run (default: the analysis' Steps; --quick: 10)",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="CPU intra-op threads (step)"
    )
    parser.add_argument("--dense-max-bytes", type=float, default=6e9)
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument(
        "--step-dtypes",
        nargs="+",
        choices=["float64", "float32"],
        default=["float64", "float32"],
        help="step: dtypes of the events (the likelihood is float64 in every case)",
    )
    parser.add_argument("--workdir", type=pathlib.Path, help="for the demo data (default: temp)")
    parser.add_argument(
        "--model",
        type=pathlib.Path,
        help="step: another analysis on the generated ntuples (default: models/dimuon.yaml)",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (the CLI calls keep_freed_memory)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args()
    quick = args.quick
    args.events = args.events or ([10_000, 100_000] if quick else [100_000, 1_000_000, 10_000_000])
    args.step_events = args.step_events or (100_000 if quick else 1_000_000)
    args.repeats = args.repeats or (2 if quick else 5)
    args.step_repeats = args.step_repeats or (2 if quick else 5)
    args.annealed_steps = args.annealed_steps or (10 if quick else None)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    torch.set_num_threads(args.threads[0])
    # the CLI's policy (diffana optimize): freed memory is kept for reuse, no page faults
    malloc_kept = False if args.default_malloc else keep_freed_memory()
    out: dict = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "quick": quick,
        "load_average_at_start": load_start,
        "malloc_keeps_freed_memory": malloc_kept,
        "machine_reference_at_start": machine_reference(),
    }
    if not args.skip_ops:
        out["ops"] = {
            "threads": torch.get_num_threads(),
            "bins": N_BINS,
            "cuts": len(CUTS) + 1,
            "window_cuts": 1,
            "bandwidth_bin_widths": BANDWIDTH_BIN_WIDTHS,
            "tau_relative": TAU_RELATIVE,
            "gradient_wrt": "cut thresholds (6: 4 one-sided cuts and a window)",
            "results": bench_ops(args, device),
        }
    if not args.skip_step:
        with tempfile.TemporaryDirectory(prefix="diffana-bench-") as tmp:
            workdir = args.workdir or pathlib.Path(tmp)
            out["step"] = bench_step(args, device, workdir)
    out["machine_reference_at_end"] = machine_reference()
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(out, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
