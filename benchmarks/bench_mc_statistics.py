"""Honest optimization: reported significance against an independent recomputation.

    OMP_NUM_THREADS=1 python benchmarks/bench_mc_statistics.py [--events 200000] [--steps N]
        [--workdir DIR] [--output FILE]

For two problems, with the MC-statistics guard at its default (``Optimization.
MinEffectiveEvents`` = 10) and switched off (0), runs ``analysis.optimize.optimize`` and
reports: the hard expected discovery significance at the start and at the reported best point;
the independent recomputation, pyhf 0.7.6 (numpy, scipy) on the workspace written at the best
cuts (``analysis.workspace.build``) after merging every bin whose background has fewer than 10
effective MC events into its thinner neighbour (``tests.test_mc_statistics.merge_thin_bins``:
the test suite's reference, which uses the workspace alone); their ratio; the smallest
background n_eff per bin at the best point; and the relaxed and hard values at the final point
with their relative gap.

1. ``demo``: ``models/dimuon.yaml`` on ``--events`` generated events (the workflow's 200,000
   by default), as configured (100 steps).
2. ``thin_tail``: the test problem of ``tests/test_mc_statistics.py`` (a falling background
   whose simulation runs out under a harder signal tail), as configured there.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import tempfile
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import config as configuration  # noqa: E402
from analysis import generate, workspace  # noqa: E402
from analysis.histograms import hard_histograms  # noqa: E402
from analysis.optimize import optimize  # noqa: E402
from tests import test_mc_statistics as reference  # noqa: E402


def measure(raw: dict, out: pathlib.Path, minimum: float) -> dict:
    raw = copy.deepcopy(raw)
    raw.setdefault("Optimization", {})["MinEffectiveEvents"] = minimum
    config = configuration.from_dict(raw, source="bench")
    start = time.perf_counter()
    result = optimize(config, out_dir=out, progress=False)
    seconds = time.perf_counter() - start
    best = config.with_cut_values(result.best.cuts)
    spec = workspace.build(best, hard_histograms(best))
    background = reference.background_names(spec)
    n_eff = min(
        float(reference.background_n_eff(channel, background).min()) for channel in spec["channels"]
    )
    merged = reference.merge_thin_bins(spec)
    recomputed = reference.pyhf_discovery_z(merged)
    final = result.final
    gap = None
    if final.relaxed is not None and final.hard:
        gap = abs(final.relaxed - final.hard) / abs(final.hard)
    return {
        "min_effective_events": minimum,
        "start_hard": result.initial.hard,
        "reported_best_hard": result.best.hard,
        "pyhf_merged": recomputed,
        "ratio_reported_over_pyhf_merged": result.best.hard / recomputed if recomputed else None,
        "bins_before_merge": sum(len(c["samples"][0]["data"]) for c in spec["channels"]),
        "bins_after_merge": sum(len(c["samples"][0]["data"]) for c in merged["channels"]),
        "best_min_background_n_eff": n_eff,
        "best_below_guard": len(result.best.below_guard),
        "final_relaxed": final.relaxed,
        "final_hard": final.hard,
        "final_relaxed_hard_gap": gap,
        "best_cuts": dict(result.best.cuts),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    parser.add_argument("--output", type=pathlib.Path, default=None)
    parser.add_argument(
        "--bandwidth-levels",
        type=int,
        default=None,
        help="Optimization.BandwidthLevels of both problems (default: as configured)",
    )
    args = parser.parse_args()
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="bench_mcstat_"))
    out: dict = {"load_average_start": os.getloadavg()[0], "events": args.events}

    demo_files = workdir / "demo"
    if not (demo_files / "done").exists():
        generate.generate(demo_files, events=args.events)
        (demo_files / "done").write_text("")
    demo = yaml.safe_load((ROOT / "models" / "dimuon.yaml").read_text())
    demo["General"]["InputPath"] = str(demo_files / "{SamplePath}")

    tail_dir = workdir / "thin_tail"
    tail_dir.mkdir(parents=True, exist_ok=True)
    thin_tail = reference.thin_tail_config(tail_dir)

    if args.bandwidth_levels is not None:
        out["bandwidth_levels"] = args.bandwidth_levels
        for raw in (demo, thin_tail):
            raw.setdefault("Optimization", {})["BandwidthLevels"] = args.bandwidth_levels
    for name, raw in (("demo", demo), ("thin_tail", thin_tail)):
        out[name] = {
            label: measure(raw, workdir / f"{name}_{label}", minimum)
            for label, minimum in (("guarded", 10.0), ("unguarded", 0.0))
        }
        print(f"{name}: done", file=sys.stderr)
    out["load_average_end"] = os.getloadavg()[0]
    text = json.dumps(out, indent=2, default=float)
    if args.output:
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
