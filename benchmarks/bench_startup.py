"""The fixed costs of a ``diffana`` process, as JSON figures.

    python benchmarks/bench_startup.py [--repeat 5] [--sections startup threads validation]
                                       [--reference ../shared/reference]

- ``startup``: whole-process wall times of ``diffana --help``, ``python -c "import
  analysis.cli"``, ``python -c "import torch"`` and ``python -c pass`` (best of ``--repeat``);
  the cumulative ``-X importtime`` of ``analysis.cli`` (microseconds); the heavy modules that
  ``--help`` loaded (none expected: commands import what they need when they run);
- ``threads``: whole-process wall times of ``diffana hypotest`` (pyhf's 2-bin validation
  workspace, ``--poi-value 1``) and ``diffana fit`` (cabinetry's example workspace) with
  ``--threads 1`` (the CLI's default) and ``--threads 0`` (torch's default: one thread per
  core; OMP_NUM_THREADS is unset for these runs), best of 3; and the same commands in process
  (repeated calls in one process: the computation without start-up and imports);
- ``validation``: in process, on the published ``ANA-SUSY-2018-16_with_signal.json`` (44
  channels, 219 parameters): ``Workspace.load`` + ``Workspace.model`` and
  :func:`analysis.likelihood.workspace.validate` alone, with an empty validation memo (every
  load validates: the cost before the memo, and the first load of a process) and with the
  content already validated (the memo hit), best of 3.

Run with OMP_NUM_THREADS=1 on a quiet machine; the ``threads`` figures are only meaningful on
the machine (and load) they describe.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "scipy", "pyhf", "jsonschema", "iminuit", "matplotlib", "uproot")


def diffana() -> list[str]:
    """The installed entry point next to this interpreter, else ``python -m analysis.cli``."""
    script = pathlib.Path(sys.executable).with_name("diffana")
    return [str(script)] if script.exists() else [sys.executable, "-m", "analysis.cli"]


def wall(command: list[str], repeat: int, omp_threads: str | None = "1") -> float:
    """Best wall time of ``repeat`` runs of ``command`` (which must exit 0), with
    ``OMP_NUM_THREADS=omp_threads`` (``None``: unset, so that torch's default is its own)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = omp_threads
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def best_of(func: Callable[[], object], repeat: int, before: Callable[[], object]) -> float:
    best = math.inf
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def startup(repeat: int) -> dict:
    python = [sys.executable]
    trace = subprocess.run(
        [*python, "-X", "importtime", "-c", "import analysis.cli"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    cumulative = re.search(r"\|\s*(\d+)\s*\|\s*analysis\.cli\s*$", trace, re.MULTILINE)
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom analysis.cli import main\n"
        "CliRunner().invoke(main, ['--help'])\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [*python, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    return {
        "help_seconds": round(wall([*diffana(), "--help"], repeat), 3),
        "import_cli_seconds": round(wall([*python, "-c", "import analysis.cli"], repeat), 3),
        "import_cli_importtime_us": int(cumulative.group(1)) if cumulative else None,
        "import_torch_seconds": round(wall([*python, "-c", "import torch"], repeat), 3),
        "python_seconds": round(wall([*python, "-c", "pass"], repeat), 3),
        "heavy_modules_after_help": loaded.split(",") if loaded else [],
    }


def threads(reference: pathlib.Path) -> dict:
    cases = {
        "hypotest_2bin": [
            "hypotest",
            str(reference / "pyhf_validation" / "2-bin_1-channel.json"),
            "--poi-value",
            "1",
        ],
        "fit_cabinetry": ["fit", str(reference / "cabinetry" / "example_workspace.json")],
    }
    out = {}
    for name, args in cases.items():
        one = wall([*diffana(), *args, "--threads", "1"], 3, omp_threads=None)
        default = wall([*diffana(), *args, "--threads", "0"], 3, omp_threads=None)
        inside = {n: _in_process(args, n) for n in ("1", "0")}
        out[name] = {
            "threads_1_seconds": round(one, 3),
            "threads_default_seconds": round(default, 3),
            "default_over_1": round(default / one, 2),
            "in_process_threads_1_seconds": round(inside["1"], 4),
            "in_process_threads_default_seconds": round(inside["0"], 4),
            "in_process_default_over_1": round(inside["0"] / inside["1"], 2),
        }
    return out


def _in_process(args: list[str], threads: str) -> float:
    """The command's own time without the process start and imports: best of 3 repeated calls
    in one fresh process (after a warm-up call), OMP_NUM_THREADS unset."""
    code = f"""
import math, time
from click.testing import CliRunner
from analysis.cli import main
args = {[*args, "--threads", threads]!r}
assert CliRunner().invoke(main, args).exit_code == 0
best = math.inf
for _ in range(3):
    start = time.perf_counter()
    CliRunner().invoke(main, args)
    best = min(best, time.perf_counter() - start)
print(best)
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return float(run.stdout)


def validation(reference: pathlib.Path) -> dict:
    import torch

    from analysis.likelihood import Workspace
    from analysis.likelihood import workspace as ws

    torch.set_num_threads(1)
    path = reference / "published" / "ANA-SUSY-2018-16_with_signal.json"
    spec = json.loads(path.read_text())

    def load_and_build() -> None:
        Workspace.load(path).model()

    load_and_build()  # warm-up: imports, pyhf's schema files
    forget = ws._VALIDATED.clear
    keep = lambda: None  # noqa: E731
    return {
        "workspace": path.name,
        "load_and_model_unvalidated_seconds": round(best_of(load_and_build, 3, forget), 3),
        "load_and_model_memo_hit_seconds": round(best_of(load_and_build, 3, keep), 3),
        "validate_unvalidated_seconds": round(
            best_of(lambda: ws.validate(spec, path.name), 3, forget), 3
        ),
        "validate_memo_hit_seconds": round(
            best_of(lambda: ws.validate(spec, path.name), 3, keep), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=("startup", "threads", "validation"),
        default=["startup", "threads", "validation"],
    )
    parser.add_argument(
        "--reference", type=pathlib.Path, default=ROOT.parent / "shared" / "reference"
    )
    args = parser.parse_args()
    out: dict = {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count()}
    if "startup" in args.sections:
        out["startup"] = startup(args.repeat)
    if "threads" in args.sections:
        out["threads"] = threads(args.reference)
    if "validation" in args.sections:
        out["validation"] = validation(args.reference)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
