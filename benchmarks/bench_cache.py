"""The cost of keying the column cache on file content, as JSON figures.

    python benchmarks/bench_cache.py [--events 1000000 10000000] [--workdir DIR]

For each number of MC events N it generates the demo ntuples (reused when ``DIR/N`` already
holds them), then reads every template of models/dimuon.yaml with the cache:

- ``digest_seconds``: :func:`analysis.cache.file_digest` of every input file (what one
  ``read_events`` call hashes: each distinct file once), files in the page cache;
  ``digest_cold_seconds``: the same after evicting the files from the page cache
  (``posix_fadvise(DONTNEED)`` on these files only), i.e. read from disk;
- ``cold_read_seconds``: ``read_events`` with an empty cache (digest, ROOT reading, store);
- ``warm_read_seconds``: ``read_events`` on a full cache (digest, ``.npz`` load), inputs in
  the page cache; ``warm_read_cold_files_seconds``: the same with the inputs evicted first;
- ``digest_fraction_of_cold`` / ``digest_fraction_of_warm``: the digest's share of those.

``hash_choices`` times other content hashes over the same bytes (one pass each, page cache hot):
hashlib's blake2b/sha1/sha256/md5 with several read sizes, ``hashlib.file_digest``, BLAKE2b over
an ``mmap``, and xxh3-128 (what :func:`file_digest` uses). Times are the
minimum of ``--repeat`` runs; run with OMP_NUM_THREADS=1 on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import pathlib
import resource
import shutil
import tempfile
import time
from collections.abc import Callable

from analysis import config as configuration
from analysis import generate
from analysis.cache import file_digest
from analysis.io import read_events

ROOT = pathlib.Path(__file__).resolve().parents[1]
MB = 1 << 20


def _best(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def _evict(paths: list[pathlib.Path]) -> None:
    """Drop these files' pages from the page cache (written back first), nothing else."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _chunked(name: str, chunk: int) -> Callable[[pathlib.Path], str]:
    def digest(path: pathlib.Path) -> str:
        state = hashlib.new(name)
        with path.open("rb", buffering=0) as handle:
            while block := handle.read(chunk):
                state.update(block)
        return state.hexdigest()

    return digest


def _file_digest(name: str) -> Callable[[pathlib.Path], str]:
    def digest(path: pathlib.Path) -> str:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, name).hexdigest()

    return digest


def _mmap_blake2b(path: pathlib.Path) -> str:
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return hashlib.blake2b(m, digest_size=16).hexdigest()


def _hash_choices(paths: list[pathlib.Path], total: int, repeat: int) -> dict[str, float]:
    choices: dict[str, Callable[[pathlib.Path], str]] = {
        "file_digest (xxh3-128, 4 MiB reads)": file_digest,
    }
    for name in ("blake2b", "sha1", "sha256", "md5"):
        for chunk in (1 * MB, 16 * MB):
            choices[f"{name}, {chunk // MB} MiB reads"] = _chunked(name, chunk)
        choices[f"hashlib.file_digest {name}"] = _file_digest(name)
    choices["blake2b over mmap"] = _mmap_blake2b
    out = {}
    for label, digest in choices.items():
        seconds = _best(lambda d=digest: [d(p) for p in paths], repeat)
        out[label] = round(total / MB / seconds)
    return {"unit": "MB/s", **out}


def measure(events: int, workdir: pathlib.Path, repeat: int) -> dict[str, object]:
    data_dir = workdir / str(events) / "data" / "generated"
    marker = data_dir / "generated.json"
    start = time.perf_counter()
    if not (marker.is_file() and json.loads(marker.read_text()) == {"events": events, "seed": 1}):
        generate.generate(data_dir, events=events, seed=1)
        marker.write_text(json.dumps({"events": events, "seed": 1}))
    t_generate = time.perf_counter() - start

    os.chdir(workdir / str(events))  # the model's InputPath is relative to the working directory
    cfg = configuration.load(ROOT / "models" / "dimuon.yaml")
    paths = sorted({p.resolve() for t in cfg.templates() for p in t.paths})
    total = sum(p.stat().st_size for p in paths)

    [file_digest(p) for p in paths]  # page cache hot
    t_digest = _best(lambda: [file_digest(p) for p in paths], repeat)
    _evict(paths)
    start = time.perf_counter()
    [file_digest(p) for p in paths]
    t_digest_cold = time.perf_counter() - start

    cache = workdir / str(events) / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    read_events(cfg, cache_dir=cache, progress=False)
    t_cold = time.perf_counter() - start
    t_warm = _best(lambda: read_events(cfg, cache_dir=cache, progress=False), repeat)
    _evict(paths)
    start = time.perf_counter()
    read_events(cfg, cache_dir=cache, progress=False)
    t_warm_cold_files = time.perf_counter() - start
    cache_bytes = sum(p.stat().st_size for p in cache.glob("*.npz"))

    return {
        "mc_events": events,
        "files": len(paths),
        "file_bytes": total,
        "cache_bytes": cache_bytes,
        "generate_seconds": round(t_generate, 2),
        "digest_seconds": round(t_digest, 4),
        "digest_mb_per_second": round(total / MB / t_digest),
        "digest_cold_seconds": round(t_digest_cold, 4),
        "cold_read_seconds": round(t_cold, 3),
        "warm_read_seconds": round(t_warm, 4),
        "warm_read_cold_files_seconds": round(t_warm_cold_files, 4),
        "digest_fraction_of_cold": round(t_digest / t_cold, 4),
        "digest_fraction_of_warm": round(t_digest / t_warm, 3),
        "digest_cold_fraction_of_warm_cold_files": round(t_digest_cold / t_warm_cold_files, 3),
        "hash_choices": _hash_choices(paths, total, repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    workdir = (args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="diffana-bench-"))).resolve()
    results = [measure(n, workdir, args.repeat) for n in args.events]
    print(
        json.dumps(
            {
                "results": results,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
