"""Generation and reading throughput, and the column-cache speed-up, as JSON figures.

    python benchmarks/bench_io.py [--events 1000000] [--workdir DIR]

Generates the demo ntuples with N MC events, then reads every template of models/dimuon.yaml
(nominal, tree- and weight-based variations, data: Definitions, Filter, Weight, observable and
cut variables) once from ROOT and once from the cache, and reports events/s.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import tempfile
import time

import uproot

from analysis import config as configuration
from analysis import generate
from analysis.histograms import hard_histograms
from analysis.io import read_events

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="diffana-bench-"))
    data_dir = workdir / "data" / "generated"

    start = time.perf_counter()
    paths = generate.generate(data_dir, events=args.events, seed=1)
    t_generate = time.perf_counter() - start

    os.chdir(workdir)  # the model's InputPath is relative to the working directory
    cfg = configuration.load(ROOT / "models" / "dimuon.yaml")
    distinct_trees = {(t.paths, t.tree) for t in cfg.templates()}
    tree_entries = sum(uproot.open(p)[tree].num_entries for ps, tree in distinct_trees for p in ps)

    cache = workdir / "cache"
    start = time.perf_counter()
    events = read_events(cfg, cache_dir=cache)
    t_read = time.perf_counter() - start
    start = time.perf_counter()
    read_events(cfg, cache_dir=cache)
    t_cached = time.perf_counter() - start
    start = time.perf_counter()
    hard_histograms(cfg, events)
    t_hist = time.perf_counter() - start

    print(
        json.dumps(
            {
                "mc_events_generated": args.events,
                "generate_seconds": round(t_generate, 3),
                "generate_events_per_second": round(args.events / t_generate),
                "files": [p.name for p in paths],
                "trees_read": len(distinct_trees),
                "tree_entries_read": tree_entries,
                "templates": sum(1 for _ in cfg.templates()),
                "read_seconds": round(t_read, 3),
                "read_events_per_second": round(tree_entries / t_read),
                "cached_read_seconds": round(t_cached, 3),
                "cache_speedup": round(t_read / t_cached, 1),
                "hard_histograms_seconds": round(t_hist, 4),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
