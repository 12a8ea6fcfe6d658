"""Dask histogramming throughput against the single-process reader, as JSON.

    python benchmarks/bench_dask.py [--events 1000000] [--partition-size 250000] [--workdir DIR]

Generates the demo ntuples with N MC events, then fills the hard histograms of every template of
models/dimuon.yaml (nominal and variations: Definitions, Filter, Weight, observable and cut
variables) from ROOT, without the column cache:

- ``single``: :func:`analysis.histograms.hard_histograms` in this process (one torch thread);
- ``dask_1``, ``dask_2``: :func:`analysis.dask_histograms.hard_histograms_dask` on the
  ``LocalCluster`` of ``--dask`` (:func:`analysis.dask_histograms.dask_client`) with 1 and 2
  worker processes (one thread each), partitions of
  ``--partition-size`` entries; timed from a started, warmed-up cluster (worker start-up and
  imports are reported apart as ``startup_s``).

Throughput is the events of the trees read (each distinct (file, tree) once, as the reader
reads them) per second of wall time. The load average before and after is quoted: on a shared
machine the other processes take cores from the workers. The results must equal the
single-process histograms to 1e-12 relative (checked, reported as ``max_rel_diff``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import torch
import uproot

from analysis import config as configuration
from analysis import generate
from analysis.dask_histograms import dask_client, hard_histograms_dask
from analysis.histograms import hard_histograms

ROOT = pathlib.Path(__file__).resolve().parents[1]


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for key, h in a.items():
        for x, y in ((h.yields, b[key].yields), (h.sumw2, b[key].sumw2)):
            scale = torch.clamp(torch.abs(x), min=1e-300)
            worst = max(worst, float(torch.max(torch.abs(x - y) / scale)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partition-size", type=int, default=250_000)
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="diffana-bench-"))
    generate.generate(workdir / "data" / "generated", events=args.events, seed=1)
    os.chdir(workdir)  # the model's InputPath is relative to the working directory
    cfg = configuration.load(ROOT / "models" / "dimuon.yaml")
    trees = {(p.resolve(), t.tree) for t in cfg.templates() for p in t.paths}
    entries = sum(uproot.open(p)[tree].num_entries for p, tree in trees)
    load_before = os.getloadavg()

    start = time.perf_counter()
    reference = hard_histograms(cfg, cache_dir=None)
    t_single = time.perf_counter() - start
    runs: dict[str, dict] = {"single": {"seconds": t_single, "events_per_s": entries / t_single}}
    for workers in (1, 2):
        start = time.perf_counter()
        with dask_client(None, workers=workers) as client:  # as diffana ... --dask
            client.run(__import__, "analysis.dask_histograms")  # imports, as a first task would
            startup = time.perf_counter() - start
            start = time.perf_counter()
            result = hard_histograms_dask(
                cfg, client, partition_size=args.partition_size, cache_dir=None
            )
            seconds = time.perf_counter() - start
        runs[f"dask_{workers}"] = {
            "seconds": seconds,
            "events_per_s": entries / seconds,
            "speedup_vs_single": t_single / seconds,
            "startup_s": startup,
            "max_rel_diff": max_rel_diff(reference, result),
        }
    print(
        json.dumps(
            {
                "events_generated": args.events,
                "tree_entries_read": entries,
                "partition_size": args.partition_size,
                "templates": len(reference),
                "cpu_count": os.cpu_count(),
                "load_average_before": list(load_before),
                "load_average_after": list(os.getloadavg()),
                **runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
