"""Strong scaling of one sharded optimization step on torch.distributed, as JSON.

    python benchmarks/bench_scaling.py [--events 1e6,1e7] [--processes 1,2] [--device cpu|cuda]
        [--steps 5] [--warmup 1] [--workdir DIR] [--output FILE] [-v]

For each number of generated Monte Carlo events E of the demo analysis (``models/dimuon.yaml``,
data from :func:`analysis.generate.generate`, kept in ``--workdir`` and reused by later runs:
generation is outside every timed region) and each number of processes N, this script launches N
real ranks with ``torchrun --standalone --nproc-per-node N`` on itself (``--worker``), gloo on CPU
and NCCL on CUDA (``--device cuda``: rank r on ``cuda:r``), ``OMP_NUM_THREADS=1`` and one torch
thread per rank. Each rank builds what ``diffana optimize --distributed`` builds, from the public
pieces of :mod:`analysis.distributed`: :func:`init_process_group`, :func:`read_shard` (its
balanced entry ranges of every tree), :class:`DistributedPipeline`. It takes ``--warmup`` steps
(the first builds the likelihood's structure) and then times ``--steps`` steps of the relaxed
loss of :func:`analysis.optimize.relaxed_loss` (the configured initial temperature and
bandwidth, the configured objective and MC-statistics guard) with backward and Adam, in parts:

- ``local_soft_cuts_kde``: soft cuts, KDE histograms and the guard's selected counts of this
  rank's events (``AnalysisPipeline.histograms_and_selected_counts``: the local half of
  ``DistributedPipeline.histograms_and_selected_counts``);
- ``all_reduce_histograms``: its other half, :func:`all_reduce_histograms` of the histograms
  and of the counts (two all-reduces of the bins; this includes waiting for the slowest rank);
- ``likelihood_objective``: the float64 model (``pipeline.likelihood``), the objective (its
  fit) and the guard factor, the same on every rank;
- ``backward``: ``loss.backward()`` (each rank's share of the cut gradients);
- ``all_reduce_gradients``: ``pipeline.synchronize_gradients()``;
- ``adam``: the optimizer step.

Per configuration: ``step_s``, the median over the timed steps of the slowest rank's step;
``speedup`` (``step_s`` of 1 process over that of N) and ``efficiency`` (speed-up / N), the
parts (median over steps of the mean over ranks), ``all_reduce_bytes_per_step`` (values of the
three collectives x bytes of the dtype) and ``all_reduce_isolated_s`` (the same three
collectives, after a barrier, median of 50: the communication alone, without load imbalance),
and per rank: entries read (``events_read``: the tree entries of its shard, MC and data, each
tree-based variation being a tree of its own; ``mc_events_read`` of the MC files), the template
rows the pipeline keeps, its event buffers in bytes, ``peak_rss_mb``
(``getrusage(RUSAGE_SELF).ru_maxrss``: the whole process, reading included), ``step_peak_rss_mb``
(the peak resident memory during the steps: ``VmHWM`` reset through ``/proc/self/clear_refs``
after the pipeline was built; ``null`` where the kernel does not allow it) and on CUDA
``torch.cuda.max_memory_allocated``. ``first_step_loss`` and its relative difference to the
1-process run (``first_step_loss_rel_diff``, and the gradient's, relative to its largest
component) show that every configuration computes the same step.

``model``: ``t_step(N) = t_fixed + c_events * E / N + t_allreduce`` (README, "Scale-out:
step-time model"), ``t_fixed`` and ``c_events`` from a least-squares fit of ``step_s`` on E / N
over all configurations (cross-checks: from the parts, and from the ranks' CPU time), the
memory per event (event buffers + the steps' peak increase) and predictions for 1e9 events.
The GPU figures in it are extrapolated from the CPU measurements under stated assumptions
(``--gpu-speedup`` 100: event-level work per event against one CPU core; ``--gpu-allreduce-us``
100: the step's NCCL all-reduces; ``--gpu-memory-gb`` 80), not measured.

The load average is recorded at the start and the end: on a shared machine the other processes
take cores from the ranks: each rank's CPU time of a step (``parts_s.step_thread_cpu``, the
mean over ranks) is recorded beside the wall times, and ``cpu_time_speedup`` is the speed-up it
gives (what a free core per rank would give). ``--events 1e5 --processes 1,2`` is a quick smoke
run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import yaml

from analysis import config as configuration
from analysis import generate, mc_statistics
from analysis.distributed import (
    DistributedPipeline,
    all_reduce_histograms,
    init_process_group,
    read_shard,
    shard_partitions,
)
from analysis.objectives import get_objective
from analysis.pipeline import AnalysisPipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED = 1
PARTS = (
    "local_soft_cuts_kde",
    "all_reduce_histograms",
    "likelihood_objective",
    "backward",
    "all_reduce_gradients",
    "adam",
)
EVENT_PARTS = ("local_soft_cuts_kde", "backward")
"""The parts whose work is linear in the events of a rank (the rest is fixed per step)."""
ISOLATED_REPEATS = 50
PREDICT_EVENTS = 1_000_000_000
PREDICT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)


# ----------------------------------------------------------------------------- shared
def demo_config(data_dir: pathlib.Path):
    """``models/dimuon.yaml`` reading the ntuples in ``data_dir``."""
    raw = yaml.safe_load((ROOT / "models" / "dimuon.yaml").read_text())
    raw["General"]["InputPath"] = str(data_dir / "{SamplePath}")
    return configuration.from_dict(raw, source="models/dimuon.yaml (benchmark data)")


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def resident_kb(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in kB (None where /proc is not there)."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_resident() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux ``clear_refs`` 5)."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- worker (a rank)
def timed_step(pipeline, objective, optimizer, tau, bandwidth, device) -> tuple[float, dict]:
    """One step of :func:`analysis.optimize.relaxed_loss` + backward + gradient all-reduce +
    Adam, in the parts of the module docstring: ``(loss, {part: seconds})``."""
    config = pipeline.config
    minimum = config.optimization.min_effective_events
    keys = mc_statistics.background_templates(config) if minimum > 0 else []
    marks = [clock(device)]
    local = AnalysisPipeline.histograms_and_selected_counts(pipeline, tau, bandwidth, keys)
    marks.append(clock(device))
    histograms, counts = (all_reduce_histograms(h, pipeline.cut_parameters) for h in local)
    marks.append(clock(device))
    value = objective(pipeline.likelihood(histograms), None)
    guard = None
    if minimum > 0:
        n_eff = mc_statistics.background_effective_events(config, counts)
        guard = mc_statistics.guard_factor(n_eff, minimum)
    penalised = mc_statistics.guarded(value, guard, objective.maximize)
    loss = -penalised if objective.maximize else penalised
    marks.append(clock(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    marks.append(clock(device))
    pipeline.synchronize_gradients()
    marks.append(clock(device))
    optimizer.step()
    marks.append(clock(device))
    parts = {name: b - a for name, a, b in zip(PARTS, marks[:-1], marks[1:], strict=True)}
    return float(loss.detach()), parts


def collective_sizes(pipeline, tau, bandwidth) -> list[int]:
    """Numbers of values of the step's three all-reduces: histograms (yields and sums of w^2
    of every template), the guard's counts, the cut gradients."""
    config = pipeline.config
    keys = mc_statistics.background_templates(config)
    keys = keys if config.optimization.min_effective_events > 0 else []
    with torch.no_grad():
        local = AnalysisPipeline.histograms_and_selected_counts(pipeline, tau, bandwidth, keys)
    sizes = [sum(h.yields.numel() + h.sumw2.numel() for h in part.values()) for part in local]
    return [n for n in sizes if n] + [pipeline.cut_parameters.numel()]


def isolated_all_reduce(sizes: list[int], dtype: torch.dtype, device: torch.device) -> float:
    """Median seconds of the step's all-reduces alone (after a barrier, no load imbalance)."""
    buffers = [torch.ones(n, dtype=dtype, device=device) for n in sizes]
    times = []
    for _ in range(ISOLATED_REPEATS + 1):
        dist.barrier()
        start = clock(device)
        for buffer in buffers:
            dist.all_reduce(buffer)
        times.append(clock(device) - start)
    return statistics.median(times[1:])


def run_rank(args, device: torch.device, rank: int, world: int) -> dict:
    config = demo_config(args.data)
    data_name = config.data_sample.name
    data_files = {p for t in config.templates() if t.sample.name == data_name for p in t.paths}
    partitions = shard_partitions(config, rank, world)
    start = time.perf_counter()
    events = read_shard(config, rank, world, device=device)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    pipeline = DistributedPipeline(config, events, device=device)
    build_s = time.perf_counter() - start
    del events
    gc.collect()
    rows = pipeline.event_counts()
    buffers = {b.data_ptr(): b.numel() * b.element_size() for b in pipeline.buffers()}
    settings = config.optimization
    tau, bandwidth = settings.temperature.initial, settings.bandwidth
    objective = get_objective(settings.objective)
    optimizer = torch.optim.Adam([pipeline.cut_parameters], lr=settings.learning_rate)

    rss_before_steps = resident_kb("VmRSS")
    peak_reset = reset_peak_resident()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_loss, first_gradient = None, None
    steps: list[dict] = []
    for i in range(args.warmup + args.steps):
        cpu = time.thread_time()
        loss, parts = timed_step(pipeline, objective, optimizer, tau, bandwidth, device)
        parts["step"] = sum(parts.values())
        parts["step_thread_cpu"] = time.thread_time() - cpu
        if i == 0:
            first_loss = loss
            first_gradient = pipeline.cut_parameters.grad.tolist()
        if i >= args.warmup:
            steps.append(parts)
    step_hwm = resident_kb("VmHWM") if peak_reset else None
    sizes = collective_sizes(pipeline, tau, bandwidth)
    dtype = pipeline.cut_parameters.dtype
    record = {
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend(),
        "device": str(device),
        "events_read": sum(p.stop - p.start for p in partitions),
        "mc_events_read": sum(p.stop - p.start for p in partitions if p.path not in data_files),
        "template_rows": sum(n for key, n in rows.items() if key[1] != data_name),
        "event_buffer_bytes": sum(buffers.values()),
        "read_s": read_s,
        "pipeline_build_s": build_s,
        "first_step_loss": first_loss,
        "first_step_gradient": first_gradient,
        "steps": steps,
        "all_reduce_values": sizes,
        "all_reduce_bytes_per_step": sum(sizes) * dtype.itemsize,
        "all_reduce_isolated_s": isolated_all_reduce(sizes, dtype, device),
        "rss_before_steps_mb": None if rss_before_steps is None else rss_before_steps / 1024,
        "step_peak_rss_mb": None if step_hwm is None else step_hwm / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        record["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return record


def worker(args) -> None:
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # only before any inter-op work
        torch.set_num_interop_threads(1)
    device = init_process_group(torch.device(args.device), args.dist_timeout)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        record = run_rank(args, device, rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (args.result_dir / f"rank{rank}.json").write_text(json.dumps(record))


# ----------------------------------------------------------------------------- driver
def number_list(text: str) -> list[int]:
    """``"1e6,1e7"`` -> ``[1000000, 10000000]``."""
    try:
        values = [int(float(item)) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def prepared_data(workdir: pathlib.Path, events: int) -> tuple[pathlib.Path, float | None]:
    """The demo ntuples with ``events`` MC events under ``workdir`` (generated unless a previous
    run left them complete) and the generation's seconds (None: reused)."""
    folder = workdir / f"events_{events}"
    marker = folder / "generated.json"
    identity = {"events": events, "seed": SEED}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == identity:
            return folder, None
    start = time.perf_counter()
    generate.generate(folder, events=events, seed=SEED)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps(identity))
    return folder, seconds


def launch(args, data: pathlib.Path, processes: int, result_dir: pathlib.Path) -> list[dict]:
    """Run ``processes`` ranks under torchrun; their records in rank order."""
    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    command = (
        [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    command += ["--standalone", "--nproc-per-node", str(processes), str(pathlib.Path(__file__))]
    command += ["--worker", "--data", str(data), "--result-dir", str(result_dir)]
    command += ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--dist-timeout", str(args.dist_timeout)]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path)
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=args.launch_timeout
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise SystemExit(
            f"torchrun with {processes} process(es) failed ({done.returncode}):\n{tail}"
        )
    return [json.loads((result_dir / f"rank{r}.json").read_text()) for r in range(processes)]


def summary(ranks: list[dict]) -> dict:
    """One configuration's figures from its ranks' records (module docstring)."""
    n_steps = len(ranks[0]["steps"])
    per_step = [[rank["steps"][i] for rank in ranks] for i in range(n_steps)]
    parts = {
        name: statistics.median(statistics.fmean(r[name] for r in step) for step in per_step)
        for name in (*PARTS, "step_thread_cpu")
    }
    return {
        "step_s": statistics.median(max(r["step"] for r in step) for step in per_step),
        "parts_s": parts,
        "all_reduce_in_step_s": parts["all_reduce_histograms"] + parts["all_reduce_gradients"],
        "all_reduce_isolated_s": max(rank["all_reduce_isolated_s"] for rank in ranks),
        "all_reduce_values": ranks[0]["all_reduce_values"],
        "all_reduce_bytes_per_step": ranks[0]["all_reduce_bytes_per_step"],
        "backend": ranks[0]["backend"],
        "first_step_loss": ranks[0]["first_step_loss"],
        "first_step_gradient": ranks[0]["first_step_gradient"],
        "ranks": [rank_summary(rank) for rank in ranks],
    }


RANK_FIELDS = (
    "rank",
    "device",
    "events_read",
    "mc_events_read",
    "template_rows",
    "event_buffer_bytes",
    "read_s",
    "pipeline_build_s",
    "all_reduce_isolated_s",
    "rss_before_steps_mb",
    "step_peak_rss_mb",
    "peak_rss_mb",
    "cuda_max_memory_allocated_mb",
)


def rank_summary(rank: dict) -> dict:
    """One rank's figures: its record's ``RANK_FIELDS`` and medians of its steps."""
    steps = rank["steps"]
    return {key: rank[key] for key in RANK_FIELDS if key in rank} | {
        f"{name}_s": statistics.median(step[name] for step in steps)
        for name in ("step", "local_soft_cuts_kde", "step_thread_cpu")
    }


def compare(run: dict, reference: dict) -> None:
    """Speed-up, efficiency and agreement of ``run`` with the 1-process ``reference``."""
    run["speedup"] = reference["step_s"] / run["step_s"]
    run["efficiency"] = run["speedup"] / run["processes"]
    # the same from the ranks' CPU time: the speed-up with a free core per rank
    cpu, ref_cpu = run["parts_s"]["step_thread_cpu"], reference["parts_s"]["step_thread_cpu"]
    run["cpu_time_speedup"] = ref_cpu / cpu
    loss, ref = run["first_step_loss"], reference["first_step_loss"]
    run["first_step_loss_rel_diff"] = abs(loss - ref) / abs(ref)
    grad, ref_grad = run["first_step_gradient"], reference["first_step_gradient"]
    scale = max(abs(g) for g in ref_grad) or 1.0
    run["first_step_gradient_max_rel_diff"] = max(
        abs(a - b) / scale for a, b in zip(grad, ref_grad, strict=True)
    )


def least_squares(x: list[float], y: list[float]) -> tuple[float, float]:
    """``(a, b)`` of ``y ~ a + b x``."""
    mean_x, mean_y = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((v - mean_x) ** 2 for v in x)
    b = sum((u - mean_x) * (v - mean_y) for u, v in zip(x, y, strict=True)) / sxx if sxx else 0.0
    return mean_y - b * mean_x, b


def step_model(runs: list[dict], gpu: argparse.Namespace) -> dict:
    """README, "Scale-out: step-time model": fit, cross-check, predictions for 1e9 events."""
    per_rank = [run["mc_events_generated"] / run["processes"] for run in runs]
    t_fixed, c_events = least_squares(per_rank, [run["step_s"] for run in runs])
    event_parts = [sum(run["parts_s"][p] for p in EVENT_PARTS) for run in runs]
    _, c_parts = least_squares(per_rank, event_parts)
    cpu_fixed, c_cpu = least_squares(per_rank, [run["parts_s"]["step_thread_cpu"] for run in runs])
    fixed_parts = statistics.median(
        sum(v for p, v in run["parts_s"].items() if p in PARTS and p not in EVENT_PARTS)
        - run["all_reduce_in_step_s"]
        for run in runs
    )
    multi = [run for run in runs if run["processes"] > 1]
    t_allreduce = max((run["all_reduce_isolated_s"] for run in multi), default=0.0)
    largest = max(runs, key=lambda run: (run["mc_events_generated"], -run["processes"]))
    bytes_per_event = max(
        (
            rank["event_buffer_bytes"]
            + 2**20 * max(0.0, (rank["step_peak_rss_mb"] or 0) - rank["rss_before_steps_mb"])
        )
        / (largest["mc_events_generated"] / largest["processes"])
        for rank in largest["ranks"]
    )
    c_gpu = c_events / gpu.gpu_speedup
    gpus_for_memory = math.ceil(PREDICT_EVENTS * bytes_per_event / (gpu.gpu_memory_gb * 1e9))
    t_allreduce_gpu = 1e-6 * gpu.gpu_allreduce_us
    return {
        "formula": "t_step(N) = t_fixed + c_events * E / N + t_allreduce",
        "fit": "least squares of step_s on E / N (MC events generated per rank), all runs",
        "t_fixed_s": t_fixed,
        "c_events_s_per_event": c_events,
        "fit_usable": t_fixed >= 0 and c_events > 0,  # false: E / N too close together or noise
        "t_allreduce_s": t_allreduce,
        "t_allreduce_source": "all_reduce_isolated_s of the multi-process runs (largest)",
        "residuals_s": {
            f"{run['mc_events_generated']:.0e}_x{run['processes']}": run["step_s"]
            - (t_fixed + c_events * e)
            for run, e in zip(runs, per_rank, strict=True)
        },
        "from_parts": {
            "t_fixed_s": fixed_parts,
            "c_events_s_per_event": c_parts,
            "event_parts": list(EVENT_PARTS),
        },
        "from_thread_cpu": {"t_fixed_s": cpu_fixed, "c_events_s_per_event": c_cpu},
        "memory_bytes_per_event": bytes_per_event,
        "memory_source": (
            "event buffers + step peak RSS increase of a rank, per MC event generated in its "
            "share, largest run (CPU)"
        ),
        "cpu_1e9_events": {
            "measured": False,
            "note": "extrapolated from this machine's cores, one rank per core",
            "step_s": {
                str(n): t_fixed + c_events * PREDICT_EVENTS / n + (t_allreduce if n > 1 else 0)
                for n in PREDICT_RANKS
            },
        },
        "gpu_1e9_events": {
            "measured": False,
            "assumption": (
                f"event-level work {gpu.gpu_speedup:g}x faster per event on one GPU than on one "
                "of these CPU cores (memory-bound ops: HBM ~3 TB/s against ~10-30 GB/s per "
                "core); t_fixed as on the CPU (the fit of a small model is latency-bound and "
                f"runs on every rank); the step's three NCCL all-reduces of kilobytes "
                f"{gpu.gpu_allreduce_us:g} us together; float64 events in GPU memory"
            ),
            "gpu_speedup_assumed": gpu.gpu_speedup,
            "c_events_s_per_event": c_gpu,
            "t_allreduce_s_assumed": t_allreduce_gpu,
            "gpu_memory_gb": gpu.gpu_memory_gb,
            "min_gpus_for_memory": gpus_for_memory,
            "step_s": {
                str(n): t_fixed + c_gpu * PREDICT_EVENTS / n + (t_allreduce_gpu if n > 1 else 0)
                for n in sorted({gpus_for_memory, *PREDICT_RANKS})
                if n >= gpus_for_memory
            },
        },
    }


def driver(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < max(args.processes):
        raise SystemExit(
            f"--device cuda: {max(args.processes)} processes need as many GPUs, "
            f"{torch.cuda.device_count()} available"
        )
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    out: dict = {
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name(0)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads_per_rank": 1,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "load_average_at_start": load_start,
    }
    runs, generated = [], {}
    with tempfile.TemporaryDirectory(prefix="diffana-scaling-") as tmp:
        workdir = args.workdir or pathlib.Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for events in args.events:
            data, seconds = prepared_data(workdir, events)
            generated[str(events)] = None if seconds is None else round(seconds, 1)
            reference = None
            for processes in sorted(set(args.processes)):
                if args.verbose:
                    print(f"{events:.0e} events, {processes} process(es)", file=sys.stderr)
                with tempfile.TemporaryDirectory(dir=workdir) as result_dir:
                    ranks = launch(args, data, processes, pathlib.Path(result_dir))
                run = {"mc_events_generated": events, "processes": processes} | summary(ranks)
                if processes == 1:
                    reference = run
                if reference is not None:
                    compare(run, reference)
                runs.append(run)
    out["generate_seconds"] = generated
    out["runs"] = runs
    if len({run["mc_events_generated"] / run["processes"] for run in runs}) >= 2:
        out["model"] = step_model(runs, args)
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(out, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    else:
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events",
        type=number_list,
        default=[1_000_000, 10_000_000],
        help="MC events generated, comma-separated (default 1e6,1e7)",
    )
    parser.add_argument("--processes", type=number_list, default=[1, 2], help="ranks (default 1,2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (default 1)")
    parser.add_argument("--workdir", type=pathlib.Path, help="generated data (default: temp)")
    parser.add_argument("--output", type=pathlib.Path, help="write the JSON here, not stdout")
    parser.add_argument("--dist-timeout", type=float, default=300.0, help="seconds (collectives)")
    parser.add_argument("--launch-timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--gpu-speedup", type=float, default=100.0, help="model: GPU / CPU core")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="model: per GPU")
    parser.add_argument(
        "--gpu-allreduce-us", type=float, default=100.0, help="model: NCCL, per step"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
