"""Workflow scale-out (README, "Scale-out: the workflow"): a small analysis run by the workflow
through the local-batch profile (Snakemake's cluster-generic executor plugin: every job script
submitted to the stand-in batch system workflows/profiles/local-batch/submit.sh, with the
profile's resources), with the optimize rule on 2 torchrun processes (gloo,
``optimize_processes: 2``) and the reading rules on a Dask scheduler (``dask: ADDRESS``, 2
workers, several partitions per tree). Its numbers equal the single-process CLI's on the same
analysis: result.json to 1e-9 relative, histograms and workspace to 1e-12.

The scheduler is a LocalCluster of threads in this process (`dask: local` would start one of 2
worker processes per command, importing torch in each, ~4 s of CPU each on this small machine);
``dask: local`` is checked on the commands the workflow plans, and `--dask` alone runs in
tests/test_dask.py."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from analysis.cli import main
from analysis.dask_histograms import LOCAL_WORKERS
from tests.conftest import write_tree

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROFILES = ROOT / "workflows" / "profiles"
BIN = pathlib.Path(sys.executable).parent
PARTITION = 700  # entries per Dask task: 2 to 5 partitions per tree
EDGES = [0.0, 20.0, 40.0, 70.0, 120.0]
STEPS = 3
# what the run makes: the optimization, and the histograms and workspace at its cuts (the cut
# flow rule reads as the workspace rule does: its planned command is checked below)
TARGETS = ["optimize/result.json", "optimized/workspace.json"]


def _events(rng: np.random.Generator, n: int, mass_scale: float) -> dict[str, np.ndarray]:
    """m: the observable; iso: a cut variable; nj: a jet count (Definitions, Filter); w: a
    weight with 5% negative entries."""
    return {
        "m": rng.gamma(2.0, mass_scale, n).clip(0.0, 119.9),
        "iso": rng.exponential(0.3, n),
        "nj": rng.poisson(1.5, n).astype(np.int32),
        "w": rng.uniform(0.2, 1.2, n) * np.where(rng.uniform(size=n) < 0.05, -1.0, 1.0),
    }


def _analysis(folder: pathlib.Path) -> pathlib.Path:
    """A small analysis unlike the demo: three trees in two files (1100 to 3300 entries, so
    several Dask partitions each), a Definition, per-region Filters on it, a trainable cut in
    one region and a fixed one in the other, a shape systematic from a weight."""
    rng = np.random.default_rng(23)
    inputs = folder / "inputs"
    inputs.mkdir()
    write_tree(inputs / "mc.root", "higgs", _events(rng, 1100, 12.0))
    write_tree(inputs / "mc.root", "top", _events(rng, 3300, 25.0))
    data = {k: v for k, v in _events(rng, 2400, 22.0).items() if k != "w"}
    write_tree(inputs / "data.root", "observed", data)
    analysis = {
        "General": {"Measurement": "scaleout", "POI": "mu",
                    "InputPath": str(inputs / "{SamplePath}")},
        "Definitions": [{"Name": "jets", "Expression": "nj + 0"}],
        "Regions": [
            {
                "Name": "SR",
                "Variable": "m",
                "Binning": EDGES,
                "Filter": "jets >= 1",
                "Cuts": [{"Name": "iso_sr", "Variable": "iso", "Direction": "<", "Value": 0.5,
                          "Bounds": [0.1, 1.5]}],
            },
            {
                "Name": "CR",
                "Type": "Control",
                "Variable": "m",
                "Binning": EDGES,
                "Filter": "jets == 0",
                "Cuts": [{"Name": "iso_cr", "Variable": "iso", "Direction": "<", "Value": 0.8,
                          "Trainable": False}],
            },
        ],
        "Samples": [
            {"Name": "Data", "Tree": "observed", "SamplePath": "data.root", "Data": True},
            {"Name": "Higgs", "Tree": "higgs", "SamplePath": "mc.root", "Weight": "w"},
            {"Name": "Top", "Tree": "top", "SamplePath": "mc.root", "Weight": "w"},
        ],
        "NormFactors": [{"Name": "mu", "Samples": "Higgs", "Nominal": 1, "Bounds": [0, 10]}],
        "Systematics": [
            {
                "Name": "Reweight",
                "Type": "NormPlusShape",
                "Samples": "Top",
                "Up": {"Weight": "w * (1 + 0.002 * m)"},
                "Down": {"Symmetrize": True},
            },
        ],
        "Optimization": {"Steps": 3, "EvaluateEvery": 1, "Seed": 5},
    }  # fmt: skip
    path = folder / "scaleout.yaml"
    path.write_text(yaml.safe_dump(analysis))
    return path


def _snakemake(folder: pathlib.Path, *options: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ["PATH"]]))
    env["OMP_NUM_THREADS"] = "1"
    command = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(folder), *options]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _require_stand_in() -> None:
    if not all(shutil.which(tool) for tool in ("setsid", "timeout", "pkill")):
        pytest.skip("the local-batch stand-in needs setsid, timeout (coreutils) and pkill")


@pytest.fixture(scope="module")
def batch(tmp_path_factory, dask_scheduler):
    """The scaled-out run: (its working directory, the analysis YAML, the Dask scheduler's
    address)."""
    if importlib.util.find_spec("snakemake_executor_plugin_cluster_generic") is None:
        pytest.fail("snakemake-executor-plugin-cluster-generic is not installed (make setup)")
    _require_stand_in()
    folder = tmp_path_factory.mktemp("scaleout")
    analysis = _analysis(folder)
    settings = [f"analysis={analysis}", "device=cpu", f"steps={STEPS}", "unblind=true"]
    settings += ["optimize_processes=2", f"dask={dask_scheduler}"]
    settings += [f"dask_partition_size={PARTITION}"]
    proc = _snakemake(
        folder / "run",
        "--workflow-profile",
        str(PROFILES / "local-batch"),
        "--config",
        *settings,
        "--",
        *(f"results/scaleout/{target}" for target in TARGETS),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder / "run", analysis, dask_scheduler


def _read(folder: pathlib.Path, target: str) -> dict:
    return json.loads((folder / "results" / "scaleout" / target).read_text())


def _single_process(*args: str) -> dict:
    """What the single-process CLI writes to stdout (JSON), run here."""
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--no-cache"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_close(single, scaled, rel: float, where: str = "", skip: tuple[str, ...] = ()) -> None:
    """Equal structure, strings and integers; floats to ``rel`` relative (``skip``: the paths
    left out, e.g. timing)."""
    if where in skip:
        return
    if isinstance(single, dict):
        assert isinstance(scaled, dict) and single.keys() == scaled.keys(), where
        for key in single:
            assert_close(single[key], scaled[key], rel, f"{where}.{key}", skip)
    elif isinstance(single, list):
        assert isinstance(scaled, list) and len(single) == len(scaled), where
        for i, (a, b) in enumerate(zip(single, scaled, strict=True)):
            assert_close(a, b, rel, f"{where}[{i}]", skip)
    elif isinstance(single, float):
        assert scaled == pytest.approx(single, rel=rel, abs=1e-300), where
    else:
        assert single == scaled, where


def test_distributed_optimization_equals_the_single_process_one(batch, tmp_path):
    """optimize_processes=2: the optimize rule ran `diffana optimize --distributed` on 2 gloo
    ranks; its result.json equals one process's to 1e-9 (all but timing and the device)."""
    folder, analysis, _ = batch
    out = tmp_path / "single"
    single = _single_process("optimize", str(analysis), "--steps", str(STEPS), "--out", str(out))
    scaled = _read(folder, "optimize/result.json")
    assert "distributed" not in single
    assert scaled.pop("distributed") == {"world_size": 2, "backend": "gloo"}
    assert_close(single, scaled, 1e-9, skip=(".seconds", ".device"))
    assert len(single["history"]) == STEPS and single["final"]["cuts"] != single["initial"]["cuts"]
    assert _read(folder, "optimize/cuts.json") == scaled["best"]["cuts"]


def test_dask_histograms_and_workspace_equal_the_single_process_ones(batch):
    """dask=ADDRESS: the workspace rule filled its histograms on the scheduler, in partitions
    of PARTITION entries; equal to one process's reading to 1e-12, at the cuts the optimize
    rule found."""
    folder, analysis, address = batch
    cuts = str(folder / "results" / "scaleout" / "optimize" / "cuts.json")
    for command in ("histograms", "workspace"):
        single = _single_process(command, str(analysis), "--cuts", cuts)
        assert_close(single, _read(folder, f"optimized/{command}.json"), 1e-12, command)
    # unblinded: the signal region's data are there
    assert _read(folder, "optimized/histograms.json")["SR"]["Data"]["nominal"]["yields"]
    # the jobs ran the scaled-out commands
    jobs = _jobs(folder)
    dask = f"--dask {address} --dask-partition-size {PARTITION} -v"
    assert jobs["workspace"]["command"].count(dask) == 2  # histograms and workspace
    torchrun = f"{BIN / 'torchrun'} --standalone --nproc-per-node 2 --no-python diffana optimize"
    assert jobs["optimize"]["command"].startswith(torchrun)
    assert "--distributed" in jobs["optimize"]["command"]


def _jobs(folder: pathlib.Path) -> dict[str, dict[str, str]]:
    """The local-batch jobs (submit.sh's spool): rule -> the request submit.sh recorded, the
    job's exit code, its script and the shell command its Snakemake ran (from its output)."""
    jobs = {}
    for spool in (folder / ".snakemake" / "local-batch").iterdir():
        lines = (spool / "request").read_text().splitlines()
        job = dict(line.split("=", 1) for line in lines)
        job["exit_code"] = (spool / "exit_code").read_text().strip()
        job["script"] = (spool / "jobscript").read_text()
        output = (spool / "output").read_text()
        job["command"] = output.split("Shell command: ", 1)[1].splitlines()[0]
        jobs[job["job_name"].removeprefix("smk-")] = job
    return jobs


def test_local_batch_jobs_received_the_profile_resources(batch):
    """Every rule was one job of the stand-in batch system, which received the profile's
    resources (the SLURM profile's runtime and memory) and the rule's threads as sbatch
    options, and ran Snakemake's job script to exit code 0."""
    profile = yaml.safe_load((PROFILES / "local-batch" / "config.yaml").read_text())
    slurm = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())

    def requested(config: dict, rule: str, key: str):
        return config["set-resources"].get(rule, {}).get(key, config["default-resources"][key])

    for rule in {*profile["set-resources"], *slurm["set-resources"], "fit"}:  # fit: defaults
        for key in ("runtime", "mem_mb"):  # the same requests as on SLURM
            assert requested(profile, rule, key) == requested(slurm, rule, key), (rule, key)

    jobs = _jobs(batch[0])
    assert sorted(jobs) == ["optimize", "workspace"]
    for rule, cpus in (("optimize", 2), ("workspace", 1)):  # optimize: 2 torchrun processes
        job = jobs[rule]
        assert job["cpus_per_task"] == str(cpus), rule
        assert job["mem_mb"] == str(requested(profile, rule, "mem_mb")), rule
        assert job["runtime"] == str(requested(profile, rule, "runtime")), rule
        assert job["exit_code"] == "0", rule
        # Snakemake's job script: the rule run by a Snakemake of its own, in the job
        assert "snakemake" in job["script"] and f"--target-jobs '{rule}:" in job["script"]


def test_stand_in_batch_system_reports_failures_and_cancels(tmp_path):
    """submit.sh runs a job script in the background and prints its id at once; status.sh says
    success for exit code 0, failed otherwise; cancel.sh ends a running job's processes, which
    is then failed."""
    _require_stand_in()
    scripts = PROFILES / "local-batch"
    env = dict(os.environ, LOCAL_BATCH_SPOOL=str(tmp_path / "spool"))

    def submit(body: str) -> str:
        script = tmp_path / f"job{len(list(tmp_path.iterdir()))}.sh"
        script.write_text(f"#!/bin/sh\n{body}\n")
        command = [str(scripts / "submit.sh"), "--mem=100", "--time=1", str(script)]
        return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout

    def status(job: str, wait: bool = True) -> str:
        for _ in range(100):
            command = [str(scripts / "status.sh"), job]
            state = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            if state.stdout != "running\n" or not wait:
                return state.stdout.strip()
            time.sleep(0.1)
        return "running"

    good, bad, long = submit("echo done"), submit("exit 3"), submit("sleep 60")
    good, bad, long = good.strip(), bad.strip(), long.strip()
    assert (status(good), status(bad), status(long, wait=False)) == ("success", "failed", "running")
    assert (tmp_path / "spool" / good / "output").read_text() == "done\n"
    pid_file = tmp_path / "spool" / long / "pid"
    for _ in range(100):  # the job has started when its pid is written
        if pid_file.is_file() and pid_file.read_text().strip():
            break
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    subprocess.run([str(scripts / "cancel.sh"), long], env=env, check=True)
    assert status(long) == "failed"
    for _ in range(100):  # every process of the job's session ends (timeout's group too)
        if subprocess.run(["pgrep", "-s", str(pid)], capture_output=True).returncode == 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"processes of the cancelled job remain: pgrep -s {pid}")
    unknown = subprocess.run([str(scripts / "status.sh"), "nope"], env=env, capture_output=True)
    assert unknown.returncode != 0


def test_dask_local_and_processes_plan_the_scaled_out_commands(tmp_path):
    """`dask: local` gives `--dask` without an address to the reading rules, which reserve
    one core per worker process it starts; `optimize_processes: 3` launches 3 ranks with the
    torchrun next to `diffana` and reserves 3 cores (a dry run: the plan only)."""
    proc = _snakemake(
        tmp_path, "-n", "-p", "-c4", "--config", "device=cpu", "dask=local",
        "optimize_processes=3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {}
    for block in proc.stdout.split("\n\n"):
        lines = block.strip().splitlines()
        name = next((line.split()[-1].rstrip(":") for line in lines if "rule " in line), None)
        if name in ("optimize", "workspace", "cutflow") and name not in jobs:
            jobs[name] = block
    assert sorted(jobs) == ["cutflow", "optimize", "workspace"], proc.stdout[-3000:]
    torchrun = f"{BIN / 'torchrun'} --standalone --nproc-per-node 3 --no-python diffana optimize"
    assert torchrun in jobs["optimize"] and "--distributed" in jobs["optimize"]
    assert "threads: 3" in jobs["optimize"]
    for rule in ("workspace", "cutflow"):
        assert "--dask --dask-partition-size 500000 -v" in jobs[rule]
        assert f"threads: {LOCAL_WORKERS}" in jobs[rule]


@pytest.mark.parametrize(
    ("setting", "valid"),
    [
        ({"optimize_processes": 4}, True),
        ({"optimize_processes": 0}, False),
        ({"optimize_processes": "2"}, False),
        ({"dask": "local"}, True),
        ({"dask": "tcp://10.1.2.3:8786"}, True),
        ({"dask": None}, True),  # `--config dask=`
        ({"dask": "tcp://a b"}, False),
        ({"dask_partition_size": 0}, False),
    ],
)
def test_config_schema_checks_the_scale_out_settings(setting, valid):
    import jsonschema

    schema = yaml.safe_load((ROOT / "workflows" / "schemas" / "config.schema.yaml").read_text())
    config = yaml.safe_load((ROOT / "workflows" / "config.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(config)  # the defaults
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(config | setting))
    assert not errors if valid else [list(e.path) for e in errors] == [list(setting)]
