"""``--dask``: hard histograms, workspaces and cut flows computed per partition on a real
``distributed.LocalCluster`` (2 worker processes) equal the single-process results.

The toy analysis (tests/conftest.py: jagged muons, Definitions, a Filter, 10% negative weights,
tree and weight variations, trees of 3000 to 5000 entries) is split into partitions of 700
entries (5 to 8 per tree, several per file), unlike the demo's one tree per file.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from analysis.cli import main
from analysis.dask_histograms import partitions

PARTITION = "700"


@pytest.fixture(scope="module")
def scheduler(dask_scheduler):
    """conftest's LocalCluster of threads (:func:`test_local_cluster_without_address` runs the
    worker processes that ``--dask`` alone starts)."""
    return dask_scheduler


def run(*args: str) -> tuple[int, object, str]:
    result = CliRunner().invoke(main, [*args, "--no-cache"])
    if result.exit_code not in (0, 2):
        raise result.exception  # type: ignore[misc]
    output = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, output, result.stderr


def assert_close(single: object, distributed: object, where: str = "") -> None:
    """Equal structure and strings; numbers to 1e-12 relative (float64 sums in another order)."""
    if isinstance(single, dict):
        assert isinstance(distributed, dict) and single.keys() == distributed.keys(), where
        for key in single:
            assert_close(single[key], distributed[key], f"{where}/{key}")
    elif isinstance(single, list):
        assert isinstance(distributed, list) and len(single) == len(distributed), where
        for i, (a, b) in enumerate(zip(single, distributed, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(single, float | int) and not isinstance(single, bool):
        assert distributed == pytest.approx(single, rel=1e-12, abs=1e-300), where
    else:
        assert single == distributed, where


def test_partitions_are_balanced_and_cover_the_tree(tmp_path):
    parts = partitions(tmp_path / "f.root", "t", 3000, 700)
    assert [(p.start, p.stop) for p in parts] == [(i * 600, (i + 1) * 600) for i in range(5)]
    parts = partitions(tmp_path / "f.root", "t", 10, 3)  # 4 ranges of 2 or 3 entries
    assert [p.stop - p.start for p in parts] == [2, 3, 2, 3]
    assert parts[0].start == 0 and parts[-1].stop == 10
    assert [(p.start, p.stop) for p in partitions(tmp_path / "f.root", "t", 0, 5)] == [(0, 0)]


def test_histograms_and_workspace_equal_single_process(toy, scheduler):
    config = str(toy.write_config())
    for command in ("histograms", "workspace"):
        code, single, _ = run(command, config)
        assert code == 0
        code, distributed, err = run(
            command, config, "--dask", scheduler, "--dask-partition-size", PARTITION
        )
        assert code == 0, err
        assert_close(single, distributed, command)
        if command == "histograms":  # weighted sums over several partitions per bin
            yields = np.array(single["SR"]["Background"]["nominal"]["yields"])
            assert np.all(yields > 0) and np.any(yields != np.round(yields))


def test_cutflow_equals_single_process_at_two_cut_sets(toy, scheduler, tmp_path):
    config = str(toy.write_config())
    cuts = tmp_path / "cuts.json"
    cuts.write_text(json.dumps({"SR:lead_pt>": 22.5, "SR:met<": 41.0}))
    code, single, _ = run("cutflow", config, "--cuts", str(cuts))
    assert code == 0 and {"start", "optimized", "mc_statistics"} <= set(single)
    code, distributed, err = run(
        "cutflow",
        config,
        "--cuts",
        str(cuts),
        "--dask",
        scheduler,
        "--dask-partition-size",
        PARTITION,
    )
    assert code == 0, err
    assert_close(single, distributed, "cutflow")


def test_worker_error_is_the_single_process_one_line_error(toy, scheduler):
    raw = toy.config
    raw["Regions"][0]["Cuts"][1]["Variable"] = "mett"  # no such branch
    config = str(toy.write_config(raw))
    code, _, single = run("histograms", config)
    assert code == 2 and "no branch 'mett'" in single
    code, _, distributed = run("histograms", config, "--dask", scheduler)
    assert code == 2 and distributed == single and distributed.count("\n") == 1
    assert "Traceback" not in distributed


def test_local_cluster_without_address(toy):
    """``--dask`` alone starts (and closes) a LocalCluster of its own."""
    raw = yaml.safe_load(toy.write_config().read_text())
    raw["Systematics"] = raw["Systematics"][:1]  # nominal templates only: a shorter run
    config = str(toy.write_config(raw))
    code, single, _ = run("histograms", config)
    code_dask, distributed, err = run(
        "histograms", config, "--dask", "--dask-partition-size", "2000"
    )
    assert code == code_dask == 0, err
    assert_close(single, distributed)


def test_unreachable_scheduler_is_a_one_line_error(toy):
    start = time.perf_counter()
    code, _, err = run(
        "histograms", str(toy.write_config()), "--dask", "tcp://127.0.0.1:9", "--dask-timeout", "1"
    )
    assert code == 2 and time.perf_counter() - start < 6
    assert err.startswith("Error: --dask tcp://127.0.0.1:9: cannot connect to a Dask scheduler")
    assert err.count("\n") == 1 and "Traceback" not in err
