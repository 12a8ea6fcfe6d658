"""The tuning notebook runs top to bottom (nbclient, a real kernel) on a small event count, shows
its figures, and its final significance is the one `diffana optimize` gives for the same data,
steps and seed (the Snakemake `notebook:` rule is run in tests/test_workflow.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import nbclient
import nbformat
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "workflows" / "notebooks" / "tuning.ipynb"
MODEL = ROOT / "models" / "dimuon.yaml"
EVENTS, STEPS, SEED = 20000, 50, 3


def _outputs(cell, kind: str) -> list:
    return [o for o in cell.get("outputs", []) if o["output_type"] == kind]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(working directory, executed notebook)."""
    folder = tmp_path_factory.mktemp("tuning")
    settings = {
        "DIFFANA_TUNING_WORKDIR": str(folder),
        "DIFFANA_TUNING_ANALYSIS": str(MODEL),
        "DIFFANA_TUNING_EVENTS": str(EVENTS),
        "DIFFANA_TUNING_STEPS": str(STEPS),
        "DIFFANA_TUNING_SEED": str(SEED),
        "DIFFANA_TUNING_DEVICE": "cpu",
        "DIFFANA_TUNING_CUTS": str(folder / "tuned" / "cuts.json"),
    }
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    saved = dict(os.environ)
    os.environ.update(settings)  # the kernel inherits this process' environment
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": folder}}
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return folder, notebook


def test_notebook_runs_and_shows_its_figures(executed):
    _, notebook = executed
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not _outputs(cell, "error") for cell in code)
    images = [
        o["data"]["image/png"]
        for cell in code
        for o in _outputs(cell, "display_data") + _outputs(cell, "update_display_data")
        if "image/png" in o.get("data", {})
    ]
    # distributions per region, the live optimization history, the hand-cut curve
    assert len(images) >= 3
    for png in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(png)))
        assert pixels.shape[0] > 200 and float(np.std(pixels[..., :3])) > 0.05


def test_final_significance_equals_diffana_optimize(executed):
    folder, notebook = executed
    final = json.loads(_outputs(notebook.cells[-1], "stream")[-1]["text"].strip().splitlines()[-1])
    written = json.loads(pathlib.Path(final["cuts"]).read_text())
    out = folder / "cli"
    diffana = pathlib.Path(sys.executable).parent / "diffana"
    command = [str(diffana), "optimize", str(MODEL), "--steps", str(STEPS), "--seed", str(SEED)]
    command += ["--out", str(out), "--device", "cpu", "--no-cache"]
    proc = subprocess.run(
        command, cwd=folder, capture_output=True, text=True, check=False, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert written == result["best"]["cuts"]
    assert final["significance"] == pytest.approx(result["best"]["hard"], rel=1e-6)
    # at 20,000 events the demo's background MC is below the default guard already at the
    # starting cuts, so the initial point is reported (with its thin bins named)
    assert final["significance"] >= result["initial"]["hard"] * (1 - 1e-9)
    if result["best"]["cuts"] == result["initial"]["cuts"]:
        assert result["initial"]["below_guard"]


def test_short_names_are_the_stage_functions():
    """``import analysis as da``: each short name is the object of its stage module, none is
    shadowed by a submodule once every stage is imported, unknown names raise AttributeError."""
    import importlib

    import analysis as da

    modules = {module for module, _ in da._EXPORTS.values()}
    for module in modules | {"analysis.plotting", "analysis.cli"}:
        importlib.import_module(module)  # binds the submodules on the package
    for name, (module, attribute) in da._EXPORTS.items():
        assert getattr(da, name) is getattr(importlib.import_module(module), attribute), name
    assert da.plotting is importlib.import_module("analysis.plotting")
    assert set(da.__all__) <= set(dir(da))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        da.nope  # noqa: B018
