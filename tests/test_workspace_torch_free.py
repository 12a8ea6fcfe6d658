"""Reading a pyhf workspace does not import torch (analysis.likelihood.workspace).

``import torch`` takes 1.5 to 3 s, longer than a whole pyhf fit of a small workspace, so the
numpy-backend path (load, patch, validate, read the measurement and model spec, write back) must
not reach it. Each check runs in a fresh interpreter, since this test process has torch
imported already. The results are compared with pyhf's own workspace and patchset handling.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import warnings

import jsonpatch
import pyhf
import pytest

from tests.conftest import reference_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, sys
from analysis.likelihood.workspace import Workspace
from analysis.errors import ConfigError

out = []
for job in json.loads(sys.argv[1]):
    try:
        ws = Workspace.load(job["path"], patches=job["patches"])
    except ConfigError as exc:
        out.append({"error": str(exc)})
        continue
    ws.measurement(None)
    out.append({
        "names": list(ws.measurement_names),
        "measurement": ws.measurement(None),
        "model_spec": ws.model_spec(None),
        "signal": list(ws.signal_samples()),
        "json": ws.to_json(),
    })
print(json.dumps({"results": out, "torch": "torch" in sys.modules,
                  "model": "analysis.likelihood.model" in sys.modules}))
"""


def run_fresh(jobs: list[dict]) -> dict:
    """Run :data:`SCRIPT` on ``jobs`` in a new interpreter; its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(jobs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def reference_workspaces() -> dict[str, dict]:
    """The ``workspace`` of every pyhf validation case, by case name."""
    folder = reference_path("pyhf_validation", "reference_cases")
    return {
        path.stem: json.loads(path.read_text())["workspace"]
        for path in sorted(folder.glob("*.json"))
    }


def extra_sample_patch(spec: dict) -> list[dict]:
    """A JSON Patch adding a background sample (with a normsys) to channel 0 and a measurement
    parameter setting for it."""
    nbins = len(spec["channels"][0]["samples"][0]["data"])
    sample = {
        "name": "extra_bkg",
        "data": [1.5 + i for i in range(nbins)],
        "modifiers": [{"name": "extra_norm", "type": "normsys", "data": {"hi": 1.1, "lo": 0.9}}],
    }
    setting = {"name": "extra_norm", "bounds": [[-4.0, 4.0]]}
    return [
        {"op": "add", "path": "/channels/0/samples/-", "value": sample},
        {"op": "add", "path": "/measurements/0/config/parameters/-", "value": setting},
    ]


def pyhf_digest(spec: dict) -> str:
    """pyhf's workspace digest (``pyhf.utils.digest``), computed here independently."""
    text = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf8")).hexdigest()


def pyhf_workspace(spec: dict) -> pyhf.Workspace:
    """pyhf's own workspace of ``spec`` (its schema check's RefResolver warning ignored)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RefResolver.*", category=DeprecationWarning)
        return pyhf.Workspace(spec)


def pyhf_workspace_patched(spec: dict, patch: list[dict]) -> dict:
    """``spec`` with ``patch`` applied as pyhf does (``jsonpatch.apply_patch`` on a copy)."""
    return jsonpatch.apply_patch(copy.deepcopy(spec), patch)


def test_load_patch_and_read_without_torch(tmp_path):
    """Every pyhf validation workspace, loaded with a JSON Patch, and one with a patchset patch
    (``FILE:NAME``): torch and the model module are never imported, and the measurement, the
    model spec, the signal samples and the written JSON are pyhf's."""
    pyhf.set_backend("numpy")
    cases = reference_workspaces()
    assert len(cases) == 9
    jobs, expected = [], []
    for name, spec in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(spec))
        patch = extra_sample_patch(spec)
        patch_path = tmp_path / f"{name}.patch.json"
        patch_path.write_text(json.dumps(patch))
        jobs.append({"path": str(path), "patches": [str(patch_path)]})
        expected.append(pyhf_workspace_patched(spec, patch))

    name, spec = next(iter(cases.items()))
    patchset = {
        "metadata": {
            "name": "extra",
            "description": "an added background",
            "digests": {"sha256": pyhf_digest(spec)},
            "labels": ["scale"],
            "references": {"hepdata": "ins0000000"},
        },
        "patches": [
            {"metadata": {"name": "extra_bkg", "values": [1.0]}, "patch": extra_sample_patch(spec)}
        ],
        "version": "1.0.0",
    }
    patchset_path = tmp_path / "patchset.json"
    patchset_path.write_text(json.dumps(patchset))
    jobs.append({"path": str(tmp_path / f"{name}.json"), "patches": [f"{patchset_path}:extra_bkg"]})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RefResolver.*", category=DeprecationWarning)
        expected.append(dict(pyhf.PatchSet(patchset).apply(pyhf_workspace(spec), "extra_bkg")))

    answer = run_fresh(jobs)
    assert answer["torch"] is False
    assert answer["model"] is False
    for job, result, reference in zip(jobs, answer["results"], expected, strict=True):
        assert "error" not in result, (job, result)
        ref = pyhf_workspace(reference)
        assert result["json"] == dict(reference), job
        assert result["names"] == ref.measurement_names
        assert result["measurement"] == ref.get_measurement()
        model = ref.model()
        assert result["model_spec"]["channels"] == reference["channels"]
        assert result["model_spec"]["parameters"] == ref.get_measurement()["config"]["parameters"]
        assert sorted(c["name"] for c in result["model_spec"]["channels"]) == model.config.channels
        assert "extra_norm" in model.config.parameters
        poi = ref.get_measurement()["config"]["poi"]
        assert result["signal"] == [
            s["name"]
            for c in reference["channels"]
            for s in c["samples"]
            if any(m["type"] == "normfactor" and m["name"] == poi for m in s["modifiers"])
        ]
        assert result["signal"]


def test_validation_errors_without_torch(tmp_path):
    """A modifier without ``type`` and one of an unknown type give the one-line messages they
    gave when validation imported the modifier registry, still without torch."""
    spec = reference_workspaces()["2bin_histosys_mu1"]
    jobs = []
    for tag, change in (
        ("missing", lambda m: m.pop("type")),
        ("unknown", lambda m: m.__setitem__("type", "normsyst")),
        ("no_hi", lambda m: m["data"].pop("hi_data")),
    ):
        broken = copy.deepcopy(spec)
        change(broken["channels"][0]["samples"][1]["modifiers"][0])
        path = tmp_path / f"{tag}.json"
        path.write_text(json.dumps(broken))
        jobs.append({"path": str(path), "patches": []})
    answer = run_fresh(jobs)
    assert answer["torch"] is False
    where = "channels[0].samples[1].modifiers[0]"
    assert [r["error"] for r in answer["results"]] == [
        f"{tmp_path / 'missing.json'}: {where}: 'type' is a required property",
        f"{tmp_path / 'unknown.json'}: {where}: unknown modifier type 'normsyst'; valid types: "
        "histosys, lumi, normfactor, normsys, shapefactor, shapesys, staterror",
        f"{tmp_path / 'no_hi.json'}: {where}.data: 'hi_data' is a required property",
    ]


def test_modifier_type_names_match_the_registry():
    """The torch-free list of type names is the registry's, in its (pyhf's) order."""
    from analysis.likelihood.modifiers import REGISTRY
    from analysis.likelihood.workspace import MODIFIER_TYPES

    assert MODIFIER_TYPES == tuple(REGISTRY)
    assert set(MODIFIER_TYPES) == set(pyhf.modifiers.histfactory_set)


@pytest.mark.parametrize("module", ["analysis.errors", "analysis.files"])
def test_shared_leaves_do_not_import_torch(module):
    answer = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert answer.stdout.strip() == "False"
