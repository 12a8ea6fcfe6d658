"""The Snakemake workflow runs end to end (real snakemake, small event count)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pyhf
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_snakemake_workflow_end_to_end(tmp_path):
    snakemake = shutil.which(
        "snakemake",
        path=os.pathsep.join(
            [str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]
        ),
    )
    if snakemake is None:
        pytest.fail("snakemake is not installed in this environment")
    bin_dir = pathlib.Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [snakemake, "-c2", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
               "--config", "events=20000", "device=cpu"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "results" / "dimuon"
    for name in ("signal", "drell_yan", "ttbar", "multijet", "data"):
        assert (tmp_path / "data" / "generated" / f"{name}.root").is_file()
    workspace = json.loads((results / "workspace.json").read_text())
    histograms = json.loads((results / "histograms.json").read_text())
    fit = json.loads((results / "fit.json").read_text())
    # the workspace's yields are the histograms' nominal yields
    for sample in workspace["channels"][0]["samples"]:
        np.testing.assert_allclose(
            sample["data"], histograms["SR"][sample["name"]]["nominal"]["yields"], rtol=1e-12
        )
    # the fit rule's result is pyhf's fit of that workspace
    ws = pyhf.Workspace(workspace)
    model = ws.model()
    bestfit = pyhf.infer.mle.fit(ws.data(model), model)
    assert fit["mle_parameters"]["mu"][0] == pytest.approx(
        bestfit[model.config.poi_index], abs=1e-3
    )
    # a second run has nothing to do
    again = subprocess.run(command + ["--dry-run"], capture_output=True, text=True, env=env,
                           check=False, timeout=300)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
