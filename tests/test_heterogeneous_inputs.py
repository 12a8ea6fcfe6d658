"""Heterogeneous inputs: three file layouts in one analysis through per-sample Definitions, the
Filter evaluated before the Definitions, wildcard SamplePaths and ``validate --data``.

The three layouts are those of CMS open data: a HZZ sample with jagged ``Muon_Px/Py/Pz/E``, a
Z -> mu mu sample with the flat columns ``px1 ... E2`` of two muons, a NanoAOD sample with jagged
``Muon_pt/eta/phi/mass`` (float32). Every expected number is computed here event by event from
the arrays written to the files, with numpy and hist, independently of the expression language.
"""

from __future__ import annotations

import json
import pathlib

import awkward as ak
import hist
import numpy as np
import pyhf
import pytest
import uproot
import yaml
from click.testing import CliRunner

from analysis import config as configuration
from analysis.cli import main
from analysis.errors import DataError
from analysis.io import read_events

MUON_MASS = 0.1056583755
BINNING = [0.0, 30.0, 60.0, 90.0, 120.0, 200.0, 400.0]
CUTS = {"mu1_pt": 25.0, "mu2_pt": 12.0}


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _write(path: pathlib.Path, columns: dict) -> None:
    """One TTree 'events' written with uproot's mktree (jagged columns as ak arrays)."""
    with uproot.recreate(path) as file:
        tree = file.mktree(
            "events",
            {k: ak.type(v) if isinstance(v, ak.Array) else v.dtype for k, v in columns.items()},
        )
        tree.extend(columns)


def _kinematics(rng: np.random.Generator, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    n = int(counts.sum())
    return (
        rng.exponential(25.0, n) + 5.0,
        rng.uniform(-2.4, 2.4, n),
        rng.uniform(-np.pi, np.pi, n),
    )


def _four_vectors(pt, eta, phi, mass):
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    return px, py, pz, np.sqrt(px**2 + py**2 + pz**2 + mass**2)


class Layouts:
    """The three samples and the data (NanoAOD layout, two files), as written, and per sample
    the per-event muon four-vectors (px, py, pz, E) from the written values and the weights."""

    def __init__(self, folder: pathlib.Path, seed: int = 11) -> None:
        rng = np.random.default_rng(seed)
        self.folder = folder
        self.muons: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}

        # HZZ: jagged Muon_Px, Muon_Py, Muon_Pz, Muon_E (float64), 1 to 4 muons, unsorted
        counts = rng.integers(1, 5, 400)
        px, py, pz, e = _four_vectors(*_kinematics(rng, counts), MUON_MASS)
        weight = rng.uniform(0.5, 1.5, counts.size)
        _write(
            folder / "hzz.root",
            {
                "Muon_Px": ak.unflatten(px, counts),
                "Muon_Py": ak.unflatten(py, counts),
                "Muon_Pz": ak.unflatten(pz, counts),
                "Muon_E": ak.unflatten(e, counts),
                "weight": weight,
            },
        )
        self._store("HZZ", counts, np.stack([px, py, pz, e], axis=1), weight)

        # Z -> mu mu: flat px1..E2 (float64), nMuon 1 or 2; the second muon's columns are 0
        # for one-muon events
        counts = np.where(rng.uniform(size=350) < 0.3, 1, 2)
        two = np.zeros((counts.size, 2, 4))
        flat = np.stack(_four_vectors(*_kinematics(rng, counts), MUON_MASS), axis=1)
        first = np.cumsum(counts) - counts
        two[:, 0] = flat[first]
        two[counts == 2, 1] = flat[first[counts == 2] + 1]
        w = rng.uniform(0.8, 1.2, counts.size) * np.where(
            rng.uniform(size=counts.size) < 0.1, -1, 1
        )
        columns = {"nMuon": counts.astype(np.int32), "w": w}
        for i in (1, 2):
            for j, name in enumerate(("px", "py", "pz", "E")):
                columns[f"{name}{i}"] = two[:, i - 1, j]
        _write(folder / "zmumu.root", columns)
        self._store("DY", counts, flat, w)

        # NanoAOD: jagged Muon_pt, Muon_eta, Muon_phi, Muon_mass (float32), 0 to 3 muons; the
        # data in the same layout, in two files
        for name, file, n, gen_weight in (
            ("ttbar", "nano_ttbar.root", 300, True),
            ("Data_2", "data_2.root", 250, False),  # written first: the order must be sorted
            ("Data_1", "data_1.root", 200, False),
        ):
            counts = rng.integers(0, 4, n)
            pt, eta, phi = (a.astype(np.float32) for a in _kinematics(rng, counts))
            mass = np.full(pt.size, MUON_MASS, dtype=np.float32)
            columns = {
                "Muon_pt": ak.unflatten(pt, counts),
                "Muon_eta": ak.unflatten(eta, counts),
                "Muon_phi": ak.unflatten(phi, counts),
                "Muon_mass": ak.unflatten(mass, counts),
            }
            weight = rng.uniform(0.9, 1.1, n) if gen_weight else np.ones(n)
            if gen_weight:
                columns["genWeight"] = weight
            _write(folder / file, columns)
            as64 = [a.astype(np.float64) for a in (pt, eta, phi, mass)]
            self._store(name, counts, np.stack(_four_vectors(*as64), axis=1), weight)

    def _store(self, name: str, counts: np.ndarray, p4: np.ndarray, weight: np.ndarray) -> None:
        stops = np.cumsum(counts)
        self.muons[name] = ([p4[b - c : b] for b, c in zip(stops, counts, strict=True)], weight)

    def expected(self, name: str) -> dict[str, np.ndarray]:
        """Events with two muons or more: leading and subleading pt, the invariant mass of the
        two leading muons and the weight, in file order (numpy, event by event)."""
        events, weight = self.muons[name]
        out: dict[str, list[float]] = {"mu1_pt": [], "mu2_pt": [], "mass": [], "weight": []}
        for p4, w in zip(events, weight, strict=True):
            if len(p4) < 2:
                continue
            pt = np.hypot(p4[:, 0], p4[:, 1])
            lead, sub = np.argsort(-pt, kind="stable")[:2]
            total = p4[lead] + p4[sub]
            out["mu1_pt"].append(pt[lead])
            out["mu2_pt"].append(pt[sub])
            out["mass"].append(np.sqrt(max(total[3] ** 2 - total[:3] @ total[:3], 0.0)))
            out["weight"].append(w)
        return {k: np.array(v) for k, v in out.items()}

    def expected_histogram(self, names: list[str]) -> hist.Hist:
        """The hard histogram of the mass after the cuts, filled with hist."""
        h = hist.Hist(
            hist.axis.Variable(BINNING, underflow=False, overflow=False),
            storage=hist.storage.Weight(),
        )
        for name in names:
            ev = self.expected(name)
            keep = (ev["mu1_pt"] > CUTS["mu1_pt"]) & (ev["mu2_pt"] > CUTS["mu2_pt"])
            h.fill(ev["mass"][keep], weight=ev["weight"][keep])
        return h

    def config(self) -> dict:
        """One analysis over the three layouts: per-sample Definitions map each layout to the
        muon collection 'muons' and the muon count 'n_mu'; the global ones and the region use
        only those common names."""
        stack = ", ".join(f"'{c}': np.stack([{c}1, {c}2], axis=1)" for c in ("px", "py", "pz"))
        return {
            "General": {
                "Measurement": "three_layouts",
                "POI": "mu",
                "InputPath": str(self.folder / "{SamplePath}"),
            },
            "Definitions": [
                {"Name": "mu1_pt", "Expression": "leading.pt[:, 0]"},
                {"Name": "mu2_pt", "Expression": "leading.pt[:, 1]"},
                {"Name": "mass", "Expression": "(leading[:, 0] + leading[:, 1]).mass"},
                # after its users: Definitions are evaluated in dependency order
                {
                    "Name": "leading",
                    "Expression": "muons[ak.argsort(muons.pt, axis=1, ascending=False)]",
                },
                {"Name": "n_mu", "Expression": "ak.num(Muon_pt, axis=1)"},
                {
                    "Name": "muons",
                    "Expression": "vector.zip({'pt': Muon_pt, 'eta': Muon_eta, "
                    "'phi': Muon_phi, 'mass': Muon_mass})",
                },
            ],
            "Regions": [
                {
                    "Name": "SR",
                    "Variable": "mass",
                    "Binning": BINNING,
                    "Filter": "n_mu >= 2",
                    "Cuts": [
                        {"Variable": v, "Direction": ">", "Value": c, "Bounds": [0.0, 100.0]}
                        for v, c in CUTS.items()
                    ],
                }
            ],
            "Samples": [
                {"Name": "Data", "Tree": "events", "SamplePath": "data_*.root", "Data": True},
                {
                    "Name": "HZZ",
                    "Tree": "events",
                    "SamplePath": "hzz.root",
                    "Weight": "weight",
                    "Definitions": [
                        {"Name": "n_mu", "Expression": "ak.num(Muon_Px, axis=1)"},
                        {
                            "Name": "muons",
                            "Expression": "vector.zip({'px': Muon_Px, "
                            "'py': Muon_Py, 'pz': Muon_Pz, 'E': Muon_E})",
                        },
                    ],
                },
                {
                    "Name": "DY",
                    "Tree": "events",
                    "SamplePath": "zmumu.root",
                    "Weight": "w",
                    "Definitions": [
                        {"Name": "n_mu", "Expression": "nMuon"},
                        {
                            "Name": "muons",
                            "Expression": f"vector.zip({{{stack}, "
                            "'E': np.stack([E1, E2], axis=1)})",
                        },
                    ],
                },
                # NanoAOD: the global Definitions fit it as they are
                {
                    "Name": "ttbar",
                    "Tree": "events",
                    "SamplePath": "nano_ttbar.root",
                    "Weight": "genWeight",
                },
            ],
            "NormFactors": [{"Name": "mu", "Samples": "HZZ", "Nominal": 1, "Bounds": [0, 10]}],
        }

    def write_config(self, raw: dict, name: str = "analysis.yaml") -> pathlib.Path:
        path = self.folder / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path


@pytest.fixture
def layouts(tmp_path: pathlib.Path) -> Layouts:
    return Layouts(tmp_path)


def test_three_layouts_give_the_independent_yields(layouts, tmp_path):
    """``diffana histograms`` on one analysis over the three layouts: per sample the yields and
    sum of squared weights of hist filled with the numpy computation; the columns of each
    sample (read through the cache, keyed by each sample's Definitions) equal it too."""
    path = layouts.write_config(layouts.config())
    result = run("histograms", str(path), "--no-cache", "--device", "cpu")
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)["SR"]
    for sample, sources in (
        ("HZZ", ["HZZ"]),
        ("DY", ["DY"]),
        ("ttbar", ["ttbar"]),
        ("Data", ["Data_1", "Data_2"]),
    ):
        expected = layouts.expected_histogram(sources)
        leaf = written[sample]["nominal"]
        assert leaf["edges"] == BINNING
        np.testing.assert_allclose(leaf["yields"], expected.values(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(leaf["sumw2"], expected.variances(), rtol=1e-12, atol=1e-12)
        assert sum(leaf["yields"]) > 10  # the comparison is not between empty histograms

    config = configuration.load(path)
    for _ in range(2):  # computed, then from the cache
        events = read_events(config, cache_dir=tmp_path / "cache", progress=False)
        # float32 NanoAOD: vector computes in float32, m^2 = E^2 - p^2 loses digits
        for sample, rtol, atol in (("HZZ", 1e-12, 0), ("DY", 1e-12, 0), ("ttbar", 1e-5, 5e-3)):
            got, expected = events[("SR", sample, "nominal")], layouts.expected(sample)
            for column in ("mass", "mu1_pt", "mu2_pt"):
                np.testing.assert_allclose(
                    got.columns[column].numpy(), expected[column], rtol=rtol, atol=atol
                )
            np.testing.assert_allclose(got.weight.numpy(), expected["weight"], rtol=1e-15)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # one per (files, tree)


def test_filter_is_evaluated_before_the_definitions(layouts):
    """``Muon_pt[:, 1]`` needs no padding behind ``Filter: ak.num(Muon_pt) >= 2``: it is
    evaluated on the events that pass (two muons or more, in file order, against numpy), and
    the Definition the Filter reads on all events. Without the Filter the Definition fails on
    one-muon events with the one-line message naming it."""
    raw = layouts.config()
    raw["Definitions"] = [
        {"Name": "second_pt", "Expression": "Muon_pt[:, 1]"},
        {"Name": "enough", "Expression": "ak.num(Muon_pt, axis=1) >= 2"},
    ]
    raw["Regions"][0] |= {"Variable": "second_pt", "Filter": "enough", "Cuts": []}
    raw["Samples"] = [raw["Samples"][0], raw["Samples"][3]]
    raw["NormFactors"][0]["Samples"] = "ttbar"
    config = configuration.from_dict(raw)
    got = read_events(config, progress=False)[("SR", "ttbar", "nominal")].observable.numpy()
    arrays = uproot.open(layouts.folder / "nano_ttbar.root")["events"].arrays(library="np")
    expected = [pts[1] for pts in arrays["Muon_pt"] if len(pts) >= 2]
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float64))

    del raw["Regions"][0]["Filter"]
    with pytest.raises(
        DataError,
        match=r"^Definitions\[0\] 'second_pt' = 'Muon_pt\[:, 1\]' "
        r"failed on sample '(Data|ttbar)' \(",
    ):
        read_events(configuration.from_dict(raw), progress=False)


def test_wildcard_sample_path_reads_the_sorted_matches(layouts):
    """``data_*.root`` reads data_1.root then data_2.root (sorted, although data_2.root was
    written first): the same events as the list of both files, and as the two files read one
    by one, concatenated. A pattern that matches nothing is one line naming it (exit code 2)."""
    raw = layouts.config()
    config = configuration.from_dict(raw)
    assert [p.name for p in next(config.templates()).paths] == ["data_1.root", "data_2.root"]
    key = ("SR", "Data", "nominal")
    wildcard = read_events(config, progress=False)[key].observable.numpy()
    raw["Samples"][0]["SamplePath"] = ["data_1.root", "data_2.root"]
    listed = read_events(configuration.from_dict(raw), progress=False)[key].observable.numpy()
    parts = []
    for file in ("data_1.root", "data_2.root"):
        raw["Samples"][0]["SamplePath"] = file
        parts.append(read_events(configuration.from_dict(raw), progress=False)[key].observable)
    np.testing.assert_array_equal(wildcard, listed)
    np.testing.assert_array_equal(wildcard, np.concatenate([p.numpy() for p in parts]))
    expected = np.concatenate([layouts.expected(n)["mass"] for n in ("Data_1", "Data_2")])
    np.testing.assert_allclose(wildcard, expected, rtol=1e-5, atol=5e-3)  # float32 masses

    raw["Samples"][0]["SamplePath"] = "dta_*.root"
    result = run("histograms", str(layouts.write_config(raw, "bad.yaml")), "--no-cache")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"{layouts.folder / 'dta_*.root'}: no file matches the wildcard pattern" in lines[0]


def test_validate_data_reports_every_problem(layouts):
    """``validate --data`` opens every file: on the good analysis ``{"valid": true}`` with the
    number of files and trees; with a Z file that lacks ``pz2`` and a NanoAOD sample with a
    Weight branch that does not exist, one line per problem naming file and branch (exit code
    2), nothing on stdout. Plain ``validate`` opens no file: it passes on the broken inputs."""
    good = layouts.write_config(layouts.config())
    result = run("validate", str(good))
    assert result.exit_code == 0 and json.loads(result.stdout) == {"valid": True}
    result = run("validate", str(good), "--data")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["valid"] is True
    assert (summary["files"], summary["trees"], summary["templates"]) == (5, 5, 4)
    assert summary["entries"] == 400 + 350 + 300 + 250 + 200

    arrays = uproot.open(layouts.folder / "zmumu.root")["events"].arrays(library="np")
    arrays["pz_2"] = arrays.pop("pz2")
    _write(layouts.folder / "zmumu_v2.root", arrays)
    raw = layouts.config()
    raw["Samples"][2]["SamplePath"] = "zmumu_v2.root"
    raw["Samples"][3]["Weight"] = "genWeight * puWeight"
    bad = layouts.write_config(raw, "bad.yaml")
    assert run("validate", str(bad)).exit_code == 0
    result = run("validate", str(bad), "--data")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("Error: ") for line in lines), lines
    assert (
        f"{layouts.folder / 'zmumu_v2.root'}:events: no branch 'pz2'; did you mean 'pz_2'"
        in lines[0]
    )
    assert "(used by Samples[2].Definitions[1] 'muons')" in lines[0]
    assert f"{layouts.folder / 'nano_ttbar.root'}:events: no branch 'puWeight'" in lines[1]
    assert "(used by Weight 'genWeight * puWeight')" in lines[1]


def test_definition_cycles_are_refused_without_files(layouts):
    raw = layouts.config()
    raw["Samples"][1]["Definitions"].append({"Name": "leading", "Expression": "mass * muons"})
    result = run("validate", str(layouts.write_config(raw, "cycle.yaml")))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "Error: cycle.yaml: Samples[1].Definitions: Definitions 'leading' -> 'mass' -> 'leading' "
        "form a cycle; expected each Definition to read branches and other Definitions "
        "without cycles"
    )


def test_three_layouts_run_end_to_end(layouts, tmp_path):
    """The whole chain on the analysis over the three layouts, the files as written:
    ``validate --data``; ``workspace``, whose pyhf fit (numpy backend) ``diffana fit`` of the
    YAML reproduces; ``optimize``, whose reported best hard significance is pyhf's expected
    discovery Z of the workspace written at its ``cuts.json``; and the report of those results,
    which shows the fitted signal strength."""
    from tests.test_mc_statistics import pyhf_discovery_z

    raw = layouts.config()
    raw["Optimization"] = {"Steps": 4, "EvaluateEvery": 2, "MinEffectiveEvents": 1}
    path = layouts.write_config(raw)
    checked = run("validate", str(path), "--data")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["valid"] is True

    built = run("workspace", str(path), "--no-cache", "--device", "cpu")
    assert built.exit_code == 0, built.output
    spec = json.loads(built.stdout)
    model = pyhf.Workspace(spec).model()
    data = pyhf.Workspace(spec).data(model)
    reference = pyhf.infer.mle.fit(data, model)
    fitted = run("fit", str(path), "--no-cache", "--device", "cpu")
    assert fitted.exit_code == 0, fitted.output
    fit = json.loads(fitted.stdout)
    bestfit = dict(zip(fit["labels"], fit["bestfit"], strict=True))
    for label, value in zip(model.config.par_names, reference, strict=True):
        assert bestfit[label] == pytest.approx(float(value), rel=1e-3, abs=1e-4), label

    out = tmp_path / "optimized"
    optimized = run("optimize", str(path), "--out", str(out), "--no-cache", "--device", "cpu")
    assert optimized.exit_code == 0, optimized.output
    result = json.loads((out / "result.json").read_text())
    at_best = run(
        "workspace", str(path), "--cuts", str(out / "cuts.json"), "--no-cache", "--device", "cpu"
    )
    assert at_best.exit_code == 0, at_best.output
    z_pyhf = pyhf_discovery_z(json.loads(at_best.stdout))
    assert result["best"]["hard"] == pytest.approx(z_pyhf, rel=1e-3)

    # the report of these results (a workflow results folder: start/, optimize/), unblinded
    results = tmp_path / "results"
    (results / "start").mkdir(parents=True)
    (results / "start" / "workspace.json").write_text(built.stdout)
    (results / "start" / "fit.json").write_text(fitted.stdout)
    out.rename(results / "optimize")
    page = results / "report.html"
    reported = run("report", str(results), "--config", str(path), "-o", str(page), "--unblind")
    assert reported.exit_code == 0, reported.output
    html = page.read_text()
    mu = bestfit["mu"]
    assert f"{mu:.4g}" in html and f"{z_pyhf:.4g}" in html
