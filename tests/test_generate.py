"""Tests of analysis.generate: file layout, determinism, weights, systematics, physics, data."""

from __future__ import annotations

import math

import awkward as ak
import numpy as np
import pytest
import uproot

from analysis import generate as gen

EVENTS = 4000
CHUNK = 1000  # several chunks per sample, so chunk boundaries are exercised
LUMI = 140.0
MC = ["signal", "drell_yan", "ttbar", "multijet"]
VARIATIONS = {"events_MuonScaleUp": +1.0, "events_MuonScaleDown": -1.0}
MUON = ["Muon_pt", "Muon_eta", "Muon_phi", "Muon_charge", "Muon_iso"]
JET = ["Jet_pt", "Jet_eta", "Jet_btag"]
DTYPES = {
    "event": np.int64,
    "nMuon": np.int32,
    "Muon_pt": np.float32,
    "Muon_eta": np.float32,
    "Muon_phi": np.float32,
    "Muon_charge": np.int32,
    "Muon_iso": np.float32,
    "nJet": np.int32,
    "Jet_pt": np.float32,
    "Jet_eta": np.float32,
    "Jet_btag": np.float32,
    "MET_pt": np.float32,
}
WEIGHTS = {"weight": np.float64, "weight_up": np.float64, "weight_down": np.float64}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "nested" / "dir"  # created by generate
    paths = gen.generate(out, events=EVENTS, seed=1, lumi=LUMI, chunk_size=CHUNK)
    return {p.stem: p for p in paths}


def read(path, tree="events"):
    with uproot.open(path) as f:
        return f[tree].arrays()


def leaf_dtype(array):
    return ak.to_numpy(ak.flatten(array, axis=None)).dtype


def dimuon_mass(a):
    """Invariant mass of the two leading (massless) muons, in plain numpy."""
    pt = ak.to_numpy(a.Muon_pt[:, :2]).astype(np.float64)
    eta = ak.to_numpy(a.Muon_eta[:, :2]).astype(np.float64)
    phi = ak.to_numpy(a.Muon_phi[:, :2]).astype(np.float64)
    m2 = 2 * pt[:, 0] * pt[:, 1] * (np.cosh(eta[:, 0] - eta[:, 1]) - np.cos(phi[:, 0] - phi[:, 1]))
    return np.sqrt(m2)


def test_files_trees_and_branches(files):
    assert list(files) == [*MC, "data"]
    for name, path in files.items():
        assert path.exists()
        with uproot.open(path) as f:
            expected = ["events"] if name == "data" else ["events", *VARIATIONS]
            assert sorted(f.keys(cycle=False)) == sorted(expected)
            for tree in expected:
                a = f[tree].arrays()
                want = DTYPES if name == "data" else {**DTYPES, **WEIGHTS}
                assert set(want) <= set(a.fields)
                for branch, dtype in want.items():
                    assert leaf_dtype(a[branch]) == dtype, (name, tree, branch)
                if name == "data":
                    assert not any(b.startswith("weight") for b in a.fields)


def test_jagged_structure_and_ranges(files):
    total_mc = 0
    for name, path in files.items():
        a = read(path)
        n_mu = ak.to_numpy(a.nMuon)
        n_jet = ak.to_numpy(a.nJet)
        for b in MUON:
            np.testing.assert_array_equal(ak.to_numpy(ak.num(a[b])), n_mu)
        for b in JET:
            np.testing.assert_array_equal(ak.to_numpy(ak.num(a[b])), n_jet)
        assert n_mu.min() >= 2 and n_mu.max() <= 4
        assert n_jet.min() >= 0 and n_jet.max() <= 8
        for b in ("Muon_pt", "Jet_pt"):
            pt = a[b]
            assert ak.all(pt[:, 1:] <= pt[:, :-1])
        assert ak.all(a.Muon_pt[:, 0] > 20) and ak.all(a.Muon_pt[:, 1] > 10)
        assert ak.all(abs(a.Muon_eta) < 2.4)
        assert set(np.unique(ak.to_numpy(ak.flatten(a.Muon_charge)))) <= {-1, 1}
        assert ak.all(a.Muon_iso >= 0)
        assert ak.all((a.Jet_btag >= 0) & (a.Jet_btag <= 1))
        assert ak.all(a.MET_pt >= 0)
        event = ak.to_numpy(a.event)
        if name != "data":
            total_mc += len(event)
            # event numbers 0..N-1 across chunk boundaries, unique per sample
            np.testing.assert_array_equal(event, np.arange(len(event)))
        else:
            assert len(np.unique(event)) == len(event)
    assert total_mc == EVENTS


def test_event_numbers_identical_across_variations(files):
    for name in MC:
        nominal = ak.to_numpy(read(files[name]).event)
        for tree in VARIATIONS:
            np.testing.assert_array_equal(ak.to_numpy(read(files[name], tree).event), nominal)


def test_determinism(files, tmp_path):
    same = gen.generate(tmp_path / "same", events=EVENTS, seed=1, lumi=LUMI, chunk_size=CHUNK)
    other = gen.generate(tmp_path / "other", events=EVENTS, seed=2, lumi=LUMI, chunk_size=CHUNK)
    for p_same, p_other in zip(same, other, strict=True):
        trees = ["events"] if p_same.stem == "data" else ["events", *VARIATIONS]
        for tree in trees:
            a, b, c = read(files[p_same.stem], tree), read(p_same, tree), read(p_other, tree)
            for field in a.fields:
                assert ak.array_equal(a[field], b[field]), (p_same.stem, tree, field)
            assert not ak.array_equal(a.Muon_pt, c.Muon_pt)


def test_weights_sum_to_expected_yield(files):
    for name in MC:
        spec = gen.SAMPLES[name]
        w = ak.to_numpy(read(files[name]).weight)
        assert math.isclose(w.sum(), spec.expected_yield(LUMI), rel_tol=1e-9)
        assert spec.expected_yield(LUMI) == pytest.approx(spec.cross_section_fb * LUMI)
        # |w| is the same for all events
        np.testing.assert_allclose(np.abs(w), np.abs(w[0]), rtol=1e-15)


def test_negative_weights_only_in_ttbar(files):
    for name in MC:
        spec = gen.SAMPLES[name]
        w = ak.to_numpy(read(files[name]).weight)
        n = len(w)
        assert n == round(EVENTS * spec.fraction)
        sizes = [min(CHUNK, n - s) for s in range(0, n, CHUNK)]
        expected_neg = sum(math.floor(spec.negative_weight_fraction * k + 0.5) for k in sizes)
        assert int((w < 0).sum()) == expected_neg
        if name == "ttbar":
            assert spec.negative_weight_fraction == pytest.approx(0.15)
            assert expected_neg == 180  # 1200 events in chunks 1000 + 200
        else:
            assert spec.negative_weight_fraction == 0.0 and expected_neg == 0
    assert sum(s.fraction for s in gen.SAMPLES.values()) == pytest.approx(1.0)
    assert list(gen.SAMPLES) == MC


def test_efficiency_weight_variation(files):
    for name in MC:
        a = read(files[name])
        w = ak.to_numpy(a.weight)
        pt_sub = ak.to_numpy(a.Muon_pt[:, 1]).astype(np.float64)
        delta = 0.01 + 0.02 * np.exp(-pt_sub / 30.0)
        np.testing.assert_allclose(ak.to_numpy(a.weight_up), w * (1 + delta), rtol=1e-12)
        np.testing.assert_allclose(ak.to_numpy(a.weight_down), w * (1 - delta), rtol=1e-12)
        for tree in VARIATIONS:  # the variation trees carry the same weights
            v = read(files[name], tree)
            for b in WEIGHTS:
                np.testing.assert_array_equal(ak.to_numpy(v[b]), ak.to_numpy(a[b]))


@pytest.mark.parametrize("tree", list(VARIATIONS))
def test_muon_scale_trees(files, tree):
    sign = VARIATIONS[tree]
    for name in MC:
        nom, var = read(files[name]), read(files[name], tree)
        pt_nom = ak.to_numpy(ak.flatten(nom.Muon_pt)).astype(np.float64)
        pt_var = ak.to_numpy(ak.flatten(var.Muon_pt)).astype(np.float64)
        np.testing.assert_allclose(pt_var, pt_nom * (1 + sign * gen.MUON_SCALE), rtol=1e-6)
        for b in ["nMuon", "Muon_eta", "Muon_phi", "Muon_charge", "Muon_iso", "nJet", *JET]:
            assert ak.array_equal(nom[b], var[b]), (name, tree, b)
        # MET vector changes by minus the change of the muons' transverse momenta
        counts = ak.to_numpy(nom.nMuon)
        phi = ak.to_numpy(ak.flatten(nom.Muon_phi)).astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        dpx = np.add.reduceat((pt_var - pt_nom) * np.cos(phi), starts)
        dpy = np.add.reduceat((pt_var - pt_nom) * np.sin(phi), starts)
        met = ak.to_numpy(nom.MET_pt).astype(np.float64)
        met_phi = ak.to_numpy(nom.MET_phi).astype(np.float64)
        mex, mey = met * np.cos(met_phi) - dpx, met * np.sin(met_phi) - dpy
        np.testing.assert_allclose(
            ak.to_numpy(var.MET_pt), np.hypot(mex, mey), rtol=1e-5, atol=1e-4
        )
        assert not np.array_equal(ak.to_numpy(var.MET_pt), ak.to_numpy(nom.MET_pt))


def test_signal_mass_peak(files):
    m = dimuon_mass(read(files["signal"]))
    assert abs(np.median(m) / gen.SIGNAL_MASS - 1) < 0.02
    # narrow: central 68% within ~3 sigma_m of a 2% resolution
    lo, hi = np.percentile(m, [16, 84])
    assert 0.5 * (hi - lo) < 0.04 * gen.SIGNAL_MASS


def test_background_shapes(files):
    dy = dimuon_mass(read(files["drell_yan"]))
    assert abs(np.median(dy) - gen.Z_MASS) < 2.0
    assert np.mean((dy > 140) & (dy < 160)) > 0.001  # continuum under the signal
    tt = read(files["ttbar"])
    assert ak.mean(tt.MET_pt) > 40 and ak.mean(read(files["signal"]).MET_pt) < 25
    assert ak.mean(ak.sum(tt.Jet_btag > 0.5, axis=1)) > 0.5
    mj = read(files["multijet"])
    same_sign = ak.to_numpy(mj.Muon_charge[:, 0] == mj.Muon_charge[:, 1])
    assert 0.4 < same_sign.mean() < 0.6
    assert ak.mean(mj.Muon_iso[:, :2]) > 3 * ak.mean(read(files["signal"]).Muon_iso[:, :2])


def test_pseudo_data(files):
    a = read(files["data"])
    expected = sum(s.data_yield(LUMI) for s in gen.SAMPLES.values())
    assert expected == pytest.approx(
        sum(s.data_scale * s.cross_section_fb * LUMI for s in gen.SAMPLES.values())
    )
    assert abs(len(a) - expected) < 5 * math.sqrt(expected)
    with uproot.open(files["data"]) as f:
        assert not [k for k in f["events"].keys() if k.startswith("weight")]
    # shuffled: the Z peak (Drell-Yan) is spread over the whole file, not in one block
    m = dimuon_mass(a)
    z = (m > 86) & (m < 96)
    half = len(m) // 2
    assert abs(z[:half].mean() - z[half:].mean()) < 0.05


def test_data_scales_with_lumi(tmp_path):
    paths = gen.generate(tmp_path, events=40, seed=3, lumi=14.0)
    expected = sum(s.data_yield(14.0) for s in gen.SAMPLES.values())
    n = uproot.open(paths[-1])["events"].num_entries
    assert abs(n - expected) < 5 * math.sqrt(expected)
    w = ak.to_numpy(read(paths[0]).weight)
    assert math.isclose(w.sum(), gen.SAMPLES["signal"].expected_yield(14.0), rel_tol=1e-9)


def region_columns(a) -> dict[str, np.ndarray]:
    """The demo's region variables (models/dimuon.yaml) in plain numpy: opposite charge, the
    leading two muons' pt and larger isolation, MET, the largest b-tag, the dimuon mass."""
    charge = ak.to_numpy(a.Muon_charge[:, :2])
    iso = ak.to_numpy(a.Muon_iso[:, :2]).astype(np.float64)
    btag = ak.to_numpy(ak.fill_none(ak.max(a.Jet_btag, axis=1), 0.0)).astype(np.float64)
    return {
        "os": charge[:, 0] * charge[:, 1] < 0,
        "pt1": ak.to_numpy(a.Muon_pt[:, 0]).astype(np.float64),
        "pt2": ak.to_numpy(a.Muon_pt[:, 1]).astype(np.float64),
        "iso": iso.max(axis=1),
        "met": ak.to_numpy(a.MET_pt).astype(np.float64),
        "btag": btag,
        "mass": dimuon_mass(a),
        "weight": ak.to_numpy(a.weight) if "weight" in a.fields else np.ones(len(a)),
    }


CONTROL_REGIONS = {  # the starting selections of models/dimuon.yaml's control regions
    "drell_yan": lambda c: (
        (c["met"] < 60) & (c["btag"] < 0.5) & (76 <= c["mass"]) & (c["mass"] < 106)
    ),
    "ttbar": lambda c: (c["btag"] > 0.8) & (c["met"] > 40) & (50 <= c["mass"]) & (c["mass"] < 200),
}


def test_control_regions_are_pure_and_data_follow_data_scale(files):
    """The demo's control regions, selected by hand on the files: each holds its process with
    a purity above 85% (weighted Monte Carlo), and the pseudo-data there agree with the
    simulation scaled by ``data_scale`` within 5 standard deviations (data Poisson and MC
    statistics)."""
    columns = {name: region_columns(read(path)) for name, path in files.items()}

    def selected(c, region):
        muons = c["os"] & (c["pt1"] > 30) & (c["pt2"] > 15) & (c["iso"] < 0.15)
        return muons & CONTROL_REGIONS[region](c)

    for region in CONTROL_REGIONS:
        yields = {s: columns[s]["weight"][selected(columns[s], region)] for s in MC}
        total = sum(w.sum() for w in yields.values())
        assert yields[region].sum() / total > 0.85, region
        assert yields["signal"].size == 0 or yields["signal"].sum() / total < 0.01
        predicted = sum(gen.SAMPLES[s].data_scale * w.sum() for s, w in yields.items())
        variance = sum((gen.SAMPLES[s].data_scale ** 2) * (w**2).sum() for s, w in yields.items())
        observed = int(selected(columns["data"], region).sum())
        assert abs(observed - predicted) < 5 * math.sqrt(predicted + variance), region


def test_data_scale_is_checked():
    spec = gen.SAMPLES["ttbar"]
    assert spec.data_yield(LUMI) == pytest.approx(spec.data_scale * spec.expected_yield(LUMI))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="data_scale"):
            gen.SampleSpec("x", "x", fraction=0.5, cross_section_fb=1.0, data_scale=bad)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"events": 0}, "events"),
        ({"events": -5}, "events"),
        ({"lumi": 0.0}, "lumi"),
        ({"lumi": -1.0}, "lumi"),
        ({"lumi": float("nan")}, "lumi"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        gen.generate(tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_no_partial_file(tmp_path, monkeypatch):
    def boom(rng, n):
        raise RuntimeError("interrupted")

    monkeypatch.setitem(gen._GENERATORS, "ttbar", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        gen.generate(tmp_path, events=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drell_yan.root", "signal.root"]
