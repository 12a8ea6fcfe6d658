"""Sharded optimization on torch.distributed (analysis.distributed): real torchrun launches with
2 gloo processes on CPU against the single-process run, and a lost rank."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from click.testing import CliRunner

from analysis import config as config_module
from analysis.cli import main
from analysis.distributed import shard_partitions
from analysis.objectives import get_objective
from analysis.optimize import relaxed_loss
from analysis.pipeline import AnalysisPipeline
from analysis.selection import column_spread

REPO = pathlib.Path(__file__).resolve().parents[1]
DIFFANA = shutil.which("diffana") or str(pathlib.Path(sys.executable).parent / "diffana")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
OPTIMIZATION = {
    "Objective": "discovery_significance",
    "Steps": 3,
    "LearningRate": 0.05,
    "Bandwidth": 0.3,
    "Temperature": {"Initial": 0.3, "Final": 0.1, "Schedule": "exponential"},
    "EvaluateEvery": 2,
    "CheckpointEvery": 2,
    "Seed": 3,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    return subprocess.run(
        command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def assert_results_equal(single: dict, distributed: dict, rel: float = 1e-9) -> None:
    """Every entry equal (numbers to ``rel``), except timing, device and the distributed
    run's record (world size, backend)."""

    def walk(a, b, path):
        if path in (".seconds", ".device"):
            return
        if isinstance(a, dict):
            assert a.keys() == b.keys(), path
            for key in a:
                walk(a[key], b[key], f"{path}.{key}")
        elif isinstance(a, list):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(a, float) and isinstance(b, float):
            assert b == pytest.approx(a, rel=rel, abs=0), path
        else:
            assert a == b, path

    distributed = dict(distributed)
    assert distributed.pop("distributed") == {"world_size": 2, "backend": "gloo"}
    walk(single, distributed, "")


@pytest.fixture
def toy_config(toy) -> pathlib.Path:
    return toy.write_config(dict(toy.config, Optimization=OPTIMIZATION))


def test_shards_are_balanced_entry_ranges_that_cover_every_file_once(toy_config):
    config = config_module.load(toy_config)
    shards = [shard_partitions(config, rank, 3) for rank in range(3)]
    entries = {"mc.root:sig": 3000, "mc.root:bkg": 5000, "mc.root:bkg_up": 5000}
    entries["data.root:data"] = 4000
    for parts in zip(*shards, strict=True):
        (name,) = {f"{p.path.name}:{p.tree}" for p in parts}
        assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]]
        assert parts[-1].stop == entries.pop(name)
        sizes = [p.stop - p.start for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert not entries


def single_process_run(config: pathlib.Path, out: pathlib.Path) -> dict:
    run = CliRunner().invoke(main, ["optimize", str(config), "--out", str(out), "--device", "cpu"])
    assert run.exit_code == 0, run.output
    return json.loads((out / "result.json").read_text())


RANKS_SCRIPT = """
import json, shutil, sys
import torch
import torch.distributed as dist
from analysis import config as config_module
from analysis.distributed import DistributedPipeline, init_process_group
from analysis.distributed import optimize_distributed, read_shard
from analysis.objectives import get_objective
from analysis.optimize import relaxed_loss

config, out = config_module.load(sys.argv[1]), sys.argv[2]
init_process_group(torch.device("cpu"), timeout=60)
rank, world = dist.get_rank(), dist.get_world_size()
# one step's loss and gradient
pipeline = DistributedPipeline(config, read_shard(config, rank, world))
_, _, loss = relaxed_loss(pipeline, get_objective("discovery_significance"), 0.2, 0.3)
loss.backward()
share = pipeline.cut_parameters.grad.clone()
pipeline.synchronize_gradients()
counts = torch.tensor(list(pipeline.event_counts().values()), dtype=torch.float64)


def gathered(tensor):  # every rank's tensor (equal shapes), in rank order
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.stack(parts).tolist()


record = {
    "loss": float(loss.detach()), "gradient": pipeline.cut_parameters.grad.tolist(),
    "shares": gathered(share),
    "counts": gathered(counts),
    "spread": pipeline.cut_spread.tolist(),
}
# column_spread_all_ranks on columns unlike the toy's: each rank holds rows [cut_r, cut_r+1)
from analysis.distributed import column_spread_all_ranks
from spread_columns import spread_columns
record["spreads"] = [
    float(column_spread_all_ranks(x[cuts[rank]:cuts[rank + 1]], w[cuts[rank]:cuts[rank + 1]]))
    for x, w, cuts in spread_columns()
]
# resume the single-process run's checkpoint in its folder
optimize_distributed(config, out_dir=out, resume=True, progress=False)
if rank == 0:
    with open(sys.argv[3], "w") as f:
        json.dump(record, f)
dist.destroy_process_group()
"""


SPREAD_COLUMNS = """
import torch

def spread_columns():
    \"\"\"(x, w, rank boundaries) of columns that stress the quartile search.\"\"\"
    g = torch.Generator().manual_seed(5)
    n = 4001
    falling = 20.0 - 20.0 * torch.log(torch.rand(n, generator=g, dtype=torch.float64))  # pT-like
    weights = torch.rand(n, generator=g) * 2 - 0.3  # some negative and some zero weights
    weights[::97] = 0.0
    iso = torch.where(torch.rand(n, generator=g) < 0.6, 0.0, torch.rand(n, generator=g))
    spike = torch.where(torch.rand(n, generator=g) < 0.35, 7.0, torch.randn(n, generator=g))
    signed = torch.randn(n, generator=g) * 1e-300  # subnormal-scale values around +-0
    signed[::5] = -0.0
    signed[1::7] = float("nan")
    ints = torch.randint(0, 4, (n,), generator=g)
    constant = torch.full((n,), -3.5)
    even, uneven, one_sided = [0, n // 2, n], [0, 17, n], [0, n, n]
    return [
        (falling, weights, even), (falling, torch.ones(n), uneven),
        (iso, torch.rand(n, generator=g), even), (spike, weights.abs(), uneven),
        (signed, torch.ones(n), even), (ints, torch.ones(n), one_sided),
        (constant, weights, even), (torch.zeros(n), weights, uneven),
    ]
"""


def test_torchrun_optimize_gradients_and_resume_equal_single_process(toy_config, tmp_path):
    """2 gloo ranks against one process (same seed): ``diffana optimize --distributed`` under
    torchrun (result.json), one step's gradient and the temperature scales, and a resumed run."""
    reference = single_process_run(toy_config, tmp_path / "single")
    out = tmp_path / "distributed"
    launch = torchrun(
        DIFFANA, "optimize", str(toy_config), "--out", str(out), "--device", "cpu",
        "--distributed", "--dist-timeout", "60", "-o", str(tmp_path / "summary.json"),
    )  # fmt: skip
    assert launch.returncode == 0, launch.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert_results_equal(reference, result)
    assert json.loads((out / "cuts.json").read_text()) == result["best"]["cuts"]
    assert json.loads((tmp_path / "summary.json").read_text()) == result  # rank 0's summary
    assert result["final"]["cuts"] != result["initial"]["cuts"]  # not an idle run
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "cuts.json", "result.json"]

    resumed = tmp_path / "resumed"  # the checkpoint at step 2 of 3, finished by 2 ranks
    shutil.copytree(tmp_path / "single", resumed)
    (resumed / "result.json").unlink()
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANKS_SCRIPT))
    out = tmp_path / "gradient.json"
    (tmp_path / "spread_columns.py").write_text(textwrap.dedent(SPREAD_COLUMNS))
    launch = torchrun(str(script), str(toy_config), str(resumed), str(out))
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert_results_equal(reference, json.loads((resumed / "result.json").read_text()))
    record = json.loads(out.read_text())

    pipeline = AnalysisPipeline.from_config(config_module.load(toy_config))
    _, _, loss = relaxed_loss(pipeline, get_objective("discovery_significance"), 0.2, 0.3)
    loss.backward()
    gradient = pipeline.cut_parameters.grad
    assert record["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert torch.allclose(
        torch.tensor(record["gradient"], dtype=torch.float64), gradient, rtol=1e-10, atol=0
    )
    assert record["spread"] == pytest.approx(pipeline.cut_spread.tolist(), rel=1e-12)
    # the quartile search over the ranks' columns gives the single-process spread
    sys.path.insert(0, str(tmp_path))
    try:
        from spread_columns import spread_columns
    finally:
        sys.path.remove(str(tmp_path))
    expected = [float(column_spread(x, w)) for x, w, _ in spread_columns()]
    assert record["spreads"] == pytest.approx(expected, rel=1e-12, abs=0)
    # each rank held a part of the events and contributed a part of the gradient
    counts = torch.tensor(record["counts"])
    assert counts.sum(0).tolist() == list(pipeline.event_counts().values())
    assert bool((counts > 0).all()) and bool((counts < counts.sum(0)).all())
    shares = torch.tensor(record["shares"], dtype=torch.float64)
    assert torch.allclose(shares.sum(0), gradient, rtol=1e-10, atol=0)
    assert not torch.allclose(shares[0], gradient, rtol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for NCCL")
def test_nccl_on_cuda_equals_single_process(toy_config, tmp_path):
    """Each rank on its GPU (cuda:LOCAL_RANK), histograms and gradients all-reduced by NCCL."""
    run = CliRunner().invoke(
        main, ["optimize", str(toy_config), "--out", str(tmp_path / "one"), "--device", "cuda"]
    )
    assert run.exit_code == 0, run.output
    reference = json.loads((tmp_path / "one" / "result.json").read_text())
    out = tmp_path / "nccl"
    launch = torchrun(
        DIFFANA, "optimize", str(toy_config), "--out", str(out), "--device", "cuda",
        "--distributed", "--dist-timeout", "120",
    )  # fmt: skip
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert_results_equal(reference, json.loads((out / "result.json").read_text()))


def test_lost_rank_is_a_one_line_error_within_the_timeout(toy_config, tmp_path):
    """Rank 0 of 2 whose partner never comes (it died before joining): exit 2 with one line
    naming the rank, the group and the timeout, after about the timeout, not a hang."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = ["optimize", str(toy_config), "--out", str(tmp_path / "out")]
    command += ["--device", "cpu", "--distributed", "--dist-timeout", "2"]
    start = time.perf_counter()
    run = CliRunner().invoke(main, command, env=env)
    elapsed = time.perf_counter() - start
    assert run.exit_code == 2, run.output
    lines = run.output.strip().splitlines()
    assert len(lines) == 1, run.output
    assert "rank 0 of 2" in lines[0] and "within 2 s" in lines[0] and "gloo" in lines[0]
    assert 2 <= elapsed < 30
    assert not (tmp_path / "out" / "result.json").exists()


def test_outside_torchrun_is_a_one_line_error(toy_config, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["optimize", str(toy_config), "--out", str(tmp_path / "o"), "--distributed"],
        env={k: None for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
    )
    assert result.exit_code == 2
    assert "MASTER_PORT not set" in result.output and "torchrun --nproc-per-node" in result.output


def test_output_folder_held_by_another_run_stops_every_rank_before_reading(toy_config, tmp_path):
    """Rank 0 claims ``--out`` before any rank reads: with the folder held by another run (here
    this process) and the input files gone, every rank stops on the claim (rank 0 with the
    lock's one-line error, the other saying why), not on the reading."""
    from analysis.optimize import claim_output_folder

    raw = yaml.safe_load(toy_config.read_text())
    raw["General"]["InputPath"] = str(tmp_path / "missing" / "{SamplePath}")
    config = tmp_path / "moved.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    with claim_output_folder(out):
        launch = torchrun(
            DIFFANA, "optimize", str(config), "--out", str(out), "--device", "cpu",
            "--distributed", "--dist-timeout", "30",
        )  # fmt: skip
    assert launch.returncode != 0
    errors = [line for line in launch.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2, launch.stderr[-3000:]
    assert any(str(out) in line and "another" in line for line in errors), errors
    assert any("rank 1: rank 0 could not claim the output folder" in line for line in errors)
    assert "missing" not in launch.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, the lock file gone
