"""ROOT reading against an independent uproot + numpy computation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import uproot

from analysis import config as configuration
from analysis.errors import ConfigError
from analysis.io import read_events


def _expected(toy, tree: str, weight: str | None) -> dict[str, np.ndarray]:
    """Filter, Definitions and Weight of the toy config, computed event by event in Python."""
    file, name = tree.split(":")
    arrays = uproot.open(toy.folder / file)[name].arrays(library="np")
    x, lead_pt, met, w = [], [], [], []
    for i in range(len(arrays["x"])):
        etas, pts = arrays["Muon_eta"][i], arrays["Muon_pt"][i]
        if sum(abs(e) < 1.5 for e in etas) >= 1:
            x.append(arrays["x"][i])
            lead_pt.append(pts[0])
            met.append(arrays["met"][i])
            w.append(
                1.0
                if weight is None
                else eval(weight, {}, {k: arrays[k][i] for k in ("weight", "weight_up")})
            )
    return {
        "x": np.array(x),
        "lead_pt": np.array(lead_pt),
        "met": np.array(met),
        "weight": np.array(w),
    }


def test_read_events_equals_independent_computation(toy):
    cfg = configuration.from_dict(toy.config)
    events = read_events(cfg)
    cases = {
        ("SR", "Data", "nominal"): ("data.root:data", None),
        ("SR", "Signal", "nominal"): ("mc.root:sig", "weight"),
        ("SR", "Background", "nominal"): ("mc.root:bkg", "weight"),
        ("SR", "Background", "Modeling_Up"): ("mc.root:bkg_up", "weight"),
        ("SR", "Background", "WeightSys_Up"): ("mc.root:bkg", "weight_up"),
        ("SR", "Background", "WeightSys_Down"): ("mc.root:bkg", "0.95*weight"),
        ("SR", "Signal", "WeightSys_Down"): ("mc.root:sig", "0.95*weight"),
    }
    assert set(cases) <= set(events)
    assert ("SR", "Background", "Modeling_Down") not in events  # symmetrized: read from no file
    for key, (tree, weight) in cases.items():
        expected = _expected(toy, tree, weight)
        got = events[key]
        assert got.weight.dtype == torch.float64
        np.testing.assert_allclose(got.weight.numpy(), expected["weight"], rtol=1e-12)
        np.testing.assert_array_equal(got.observable.numpy(), expected["x"])
        np.testing.assert_array_equal(
            got.columns["lead_pt"].numpy(), expected["lead_pt"].astype(np.float64)
        )
        np.testing.assert_array_equal(got.columns["met"].numpy(), expected["met"])


def test_small_chunks_give_the_same_columns(toy):
    cfg = configuration.from_dict(toy.config)
    whole = read_events(cfg)
    chunked = read_events(cfg, step_size=700)
    for key, events in whole.items():
        torch.testing.assert_close(chunked[key].weight, events.weight, rtol=0, atol=0)
        torch.testing.assert_close(chunked[key].observable, events.observable, rtol=0, atol=0)


def test_dtype_and_device_follow_request(toy):
    cfg = configuration.from_dict(toy.config)
    events = read_events(cfg, dtype=torch.float32, device="cpu")
    ev = events[("SR", "Signal", "nominal")]
    assert ev.weight.dtype == torch.float32 and ev.observable.dtype == torch.float32


def test_cache_skips_root_reading_and_ignores_mtime(toy, tmp_path, monkeypatch):
    cfg = configuration.from_dict(toy.config)
    cache = tmp_path / "cache"
    first = read_events(cfg, cache_dir=cache)
    entries = sorted(cache.glob("*.npz"))
    assert len(entries) == 4  # one per (files, tree): data, sig, bkg, bkg_up
    # a second run must not open any ROOT file
    with monkeypatch.context() as patch:
        patch.setattr(
            uproot, "open", lambda *a, **k: pytest.fail("ROOT file opened on a cache hit")
        )
        second = read_events(cfg, cache_dir=cache)
    for key in first:
        assert torch.equal(first[key].weight, second[key].weight)
        assert torch.equal(first[key].observable, second[key].observable)
    # the key is the content, not the mtime: a touched file is still a hit (content changes:
    # tests/test_cache.py)
    stat = (toy.folder / "data.root").stat()
    os.utime(toy.folder / "data.root", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with monkeypatch.context() as patch:
        patch.setattr(
            uproot, "open", lambda *a, **k: pytest.fail("ROOT file opened on a cache hit")
        )
        read_events(cfg, cache_dir=cache)
    assert sorted(cache.glob("*.npz")) == entries


def test_vector_definition(toy):
    """A vector expression (invariant mass of the two leading muons) against numpy."""
    muons = "vector.zip({'pt': Muon_pt, 'eta': Muon_eta, 'phi': 0 * Muon_pt, 'mass': 0 * Muon_pt})"
    toy.config["Definitions"] += [
        {"Name": "muons", "Expression": muons},
        {"Name": "mass", "Expression": "(muons[:, 0] + muons[:, -1]).mass"},
    ]
    toy.config["Regions"][0]["Variable"] = "mass"
    cfg = configuration.from_dict(toy.config)
    got = read_events(cfg)[("SR", "Data", "nominal")].observable.numpy()
    arrays = uproot.open(toy.folder / "data.root")["data"].arrays(library="np")
    expected = []
    for pts, etas in zip(arrays["Muon_pt"], arrays["Muon_eta"], strict=True):
        if sum(abs(e) < 1.5 for e in etas) >= 1:
            # massless, same phi: m^2 = 2 pt1 pt2 (cosh(deta) - 1)
            expected.append(
                np.sqrt(max(2 * pts[0] * pts[-1] * (np.cosh(etas[0] - etas[-1]) - 1), 0))
            )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_jagged_cut_variable_is_rejected(toy):
    toy.config["Regions"][0]["Cuts"][0]["Variable"] = "Muon_pt"
    cfg = configuration.from_dict(toy.config)
    with pytest.raises(ConfigError, match="'Muon_pt' has 2 dimensions"):
        read_events(cfg)


def test_per_sample_definitions_on_one_tree(toy, tmp_path, monkeypatch):
    """Two samples read one tree: "Scaled" replaces the global Definition ``lead_pt`` and
    calibrates the branch ``met`` by a Definition of its own name (it reads the branch). Each
    gets its own columns (against the event-by-event computation), from the files and again
    from the cache, whose key holds each request's Definitions."""
    toy.config["Samples"].append(
        {
            "Name": "Scaled",
            "Tree": "bkg",
            "SamplePath": "mc.root",
            "Weight": "weight",
            "Definitions": [
                {"Name": "met", "Expression": "met * 1.5"},
                {"Name": "lead_pt", "Expression": "Muon_pt[:, 0] * 2"},
            ],
        }
    )
    cfg = configuration.from_dict(toy.config)
    expected = _expected(toy, "mc.root:bkg", "weight")
    cache = tmp_path / "cache"
    for _ in range(2):
        events = read_events(cfg, cache_dir=cache, progress=False)
        plain, scaled = events[("SR", "Background", "nominal")], events[("SR", "Scaled", "nominal")]
        np.testing.assert_array_equal(plain.columns["lead_pt"].numpy(), expected["lead_pt"])
        np.testing.assert_array_equal(plain.columns["met"].numpy(), expected["met"])
        np.testing.assert_array_equal(scaled.columns["lead_pt"].numpy(), 2 * expected["lead_pt"])
        np.testing.assert_array_equal(scaled.columns["met"].numpy(), 1.5 * expected["met"])
        np.testing.assert_array_equal(scaled.observable.numpy(), expected["x"])
        monkeypatch.setattr(uproot, "open", lambda *a, **k: pytest.fail("opened on a hit"))
    assert len(list(cache.glob("*.npz"))) == 4  # still one per (files, tree)
    monkeypatch.undo()  # a changed per-sample Definition is a new key: no stale columns
    toy.config["Samples"][-1]["Definitions"][1]["Expression"] = "Muon_pt[:, 0] * 3"
    events = read_events(configuration.from_dict(toy.config), cache_dir=cache, progress=False)
    scaled = events[("SR", "Scaled", "nominal")].columns["lead_pt"].numpy()
    np.testing.assert_array_equal(scaled, 3 * expected["lead_pt"])
