"""Histogram inputs (analysis.histogram_inputs): cabinetry configs that point at TH1s.

References: cabinetry's own example (``../shared/reference/cabinetry``: ``config_histograms.yml``,
``histograms.root``, the workspace cabinetry builds, ``REFERENCE_NUMBERS.json``), and a
workspace built here independently with uproot and numpy following cabinetry's rules
(``templates.collector._histo_path``, ``uproot.open(path)`` then values/variances without flow,
staterror ``sqrt(variances)``, the NormPlusShape split ``k = sum(v) / sum(n)``, ``v / k``, and
Symmetrize ``2 n - v / k``, ``2 - k``).
"""

from __future__ import annotations

import copy
import json
import pathlib
from collections.abc import Callable

import boost_histogram as bh
import numpy as np
import pytest
import uproot
import yaml
from click.testing import CliRunner

from analysis import config as configuration
from analysis.cli import main
from analysis.errors import ConfigError
from analysis.histogram_inputs import region_edges
from tests.conftest import reference_path


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: object) -> dict:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result) -> str:
    """The CLI's user error: exit code 2, nothing on stdout, one line on stderr."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------------- independent reference
def _contains(item: dict, key: str, name: str) -> bool:
    value = item.get(key)
    return value is None or name == value or (isinstance(value, list) and name in value)


def cabinetry_histogram(
    raw: dict, region: dict, sample: dict, syst: dict | None = None, side: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cabinetry's ``_histo_path`` and ``histogram_reader.with_uproot`` written out: (values,
    variances) without flow bins."""
    general = raw["General"]
    over = syst[side] if syst is not None and side is not None else {}
    path = (
        general["InputPath"]
        .replace("{RegionPath}", region.get("RegionPath", ""))
        .replace("{SamplePath}", over.get("SamplePath", sample.get("SamplePath", "")))
        .replace("{VariationPath}", over.get("VariationPath", general.get("VariationPath", "")))
    )
    file, obj = path.rsplit(":", 1)
    with uproot.open(file) as f:
        hist = f[obj].to_boost()
    return hist.values(), hist.variances()


def cabinetry_workspace(raw: dict) -> dict:
    """The pyhf workspace cabinetry 0.6 builds from the histograms of ``raw`` (numpy)."""
    channels, observations = [], []
    for region in raw["Regions"]:
        samples = []
        for sample in raw["Samples"]:
            if not _contains(sample, "Regions", region["Name"]):
                continue
            nominal, variances = cabinetry_histogram(raw, region, sample)
            if sample.get("Data"):
                observations.append({"name": region["Name"], "data": list(nominal)})
                continue
            modifiers = [
                {
                    "name": f"staterror_{region['Name']}",
                    "type": "staterror",
                    "data": list(np.sqrt(variances)),
                }
            ]
            for nf in raw["NormFactors"]:
                if _contains(nf, "Samples", sample["Name"]):
                    modifiers.append({"name": nf["Name"], "type": "normfactor", "data": None})
            for syst in raw.get("Systematics", []):
                if not _contains(syst, "Samples", sample["Name"]):
                    continue
                if syst["Type"] == "Normalization":
                    data = {"hi": 1 + syst["Up"]["Normalization"]}
                    data["lo"] = 1 + syst["Down"]["Normalization"]
                    modifiers.append({"name": syst["Name"], "type": "normsys", "data": data})
                    continue
                norm, shape = {}, {}
                for side in ("Up", "Down"):
                    if not syst[side].get("Symmetrize"):
                        varied = cabinetry_histogram(raw, region, sample, syst, side)[0]
                        norm[side] = varied.sum() / nominal.sum()
                        shape[side] = varied / norm[side]
                for side, other in (("Up", "Down"), ("Down", "Up")):
                    if side not in norm:
                        norm[side], shape[side] = 2 - norm[other], 2 * nominal - shape[other]
                modifiers += [
                    {
                        "name": syst["Name"],
                        "type": "normsys",
                        "data": {"hi": norm["Up"], "lo": norm["Down"]},
                    },
                    {
                        "name": syst["Name"],
                        "type": "histosys",
                        "data": {"hi_data": list(shape["Up"]), "lo_data": list(shape["Down"])},
                    },
                ]
            samples.append({"name": sample["Name"], "data": list(nominal), "modifiers": modifiers})
        channels.append({"name": region["Name"], "samples": samples})
    parameters = [
        {"name": nf["Name"], "inits": [nf["Nominal"]], "bounds": [nf["Bounds"]]}
        for nf in raw["NormFactors"]
    ]
    return {
        "channels": channels,
        "measurements": [
            {
                "name": raw["General"]["Measurement"],
                "config": {"parameters": parameters, "poi": raw["General"]["POI"]},
            }
        ],
        "observations": observations,
        "version": "1.0.0",
    }


def assert_same(ours: object, expected: object, rtol: float, where: str = "workspace") -> None:
    """Same structure, equal strings, numbers equal to ``rtol`` (relative)."""
    if isinstance(expected, dict):
        assert isinstance(ours, dict) and set(ours) == set(expected), where
        for key in expected:
            assert_same(ours[key], expected[key], rtol, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(ours, list) and len(ours) == len(expected), where
        for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
            assert_same(a, b, rtol, f"{where}[{i}]")
    elif isinstance(expected, (int, float, np.floating)) and not isinstance(expected, bool):
        assert ours == pytest.approx(float(expected), rel=rtol, abs=1e-300), where
    else:
        assert ours == expected, where


# ----------------------------------------------------------------------------- cabinetry's example
@pytest.fixture(scope="module")
def cabinetry_example(tmp_path_factory) -> tuple[pathlib.Path, dict, dict]:
    """cabinetry's config_histograms.yml, its InputPath pointed at the reference
    histograms.root (the ROOT file is read in place): (config path, raw config, reference)."""
    folder = reference_path("cabinetry")
    raw = yaml.safe_load((folder / "config_histograms.yml").read_text())
    assert raw["General"]["InputPath"].startswith("inputs/histograms.root:")
    raw["General"]["InputPath"] = raw["General"]["InputPath"].replace(
        "inputs/histograms.root", str(folder / "histograms.root")
    )
    path = tmp_path_factory.mktemp("cabinetry") / "config_histograms.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    reference = json.loads((folder / "REFERENCE_NUMBERS.json").read_text())
    return path, raw, reference


def test_cabinetry_config_validates_unchanged():
    config = configuration.load(reference_path("cabinetry", "config_histograms.yml"))
    assert config.general.input_type == "histogram"
    assert config.general.variation_path == "Nominal"
    modeling = next(s for s in config.systematics if s.name == "Modeling")
    assert modeling.up.variation_path == "Modeling_Up" and modeling.down.symmetrize
    assert config.regions[0].binning == () and config.samples[0].tree == ""


def test_cabinetry_workspace(cabinetry_example):
    path, raw, _ = cabinetry_example
    ours = ok("workspace", path, "--device", "cpu")
    # an independent build from the same histograms: equal up to rounding
    assert_same(ours, cabinetry_workspace(raw), rtol=1e-12)
    # cabinetry's workspace of its ntuple example: create_histograms.py wrote those histograms
    # with yields and stdev rounded to 8 decimals, so up to 0.5e-8 / 0.199 (the smallest stdev)
    # = 2.5e-8 relative
    example = json.loads(reference_path("cabinetry", "example_workspace.json").read_text())
    assert_same(ours, example, rtol=3e-8)


def test_cabinetry_fit_significance_and_limit(cabinetry_example):
    """MIGRAD + HESSE on the histogram config reproduce cabinetry's published fit, and the
    significance and CLs limit its published numbers."""
    path, _, ref = cabinetry_example
    out = ok("fit", path, "--method", "minuit", "--device", "cpu")
    order = [out["labels"].index(name) for name in ref["parameter_order"]]
    np.testing.assert_allclose(np.array(out["bestfit"])[order], ref["bestfit"], rtol=1e-4)
    np.testing.assert_allclose(
        np.array(out["uncertainty"])[order], ref["uncertainty"], atol=ref["uncertainty_atol"]
    )
    assert out["twice_nll"] == pytest.approx(ref["best_twice_nll"], rel=1e-6)
    significance = ok("significance", path, "--device", "cpu")
    for which in ("observed", "expected"):
        expected = ref["significance"][f"{which}_Z"]
        assert significance[which]["significance"] == pytest.approx(expected, rel=1e-3)
    limit, expected_limits = ok("limit", path, "--device", "cpu"), ref["limit_CLs_95"]
    assert limit["observed"] == pytest.approx(
        expected_limits["observed"], rel=expected_limits["rtol"]
    )
    np.testing.assert_allclose(
        limit["expected"], expected_limits["expected"], rtol=expected_limits["rtol"]
    )


def test_cut_optimization_is_refused(cabinetry_example, tmp_path):
    """One line, exit code 2, no output folder: cut optimization and scans need events."""
    path, _, _ = cabinetry_example
    for command in (["optimize"], ["scan-cuts", "--method", "grid", "--budget", "3"]):
        out_dir = tmp_path / command[0]
        # the output-folder option by its current name (the CLI's names are being unified)
        params = main.commands[command[0]].params
        out = next(p.opts[0] for p in params if p.name in ("out_dir", "out"))
        line = one_line_error(run(*command, path, out, out_dir, "--device", "cpu"))
        assert "needs events (ntuple inputs" in line and "reads histograms" in line
        assert not out_dir.exists()
    line = one_line_error(run("cutflow", path, "--device", "cpu"))
    assert "a cut flow needs events" in line


# ------------------------------------------------------------------------ a constructed analysis
SR_EDGES = [0.0, 10.0, 30.0, 70.0]
CR_EDGES = [50.0, 60.0, 80.0, 120.0, 200.0, 400.0]


def _write_th1(file: uproot.WritableDirectory, path: str, edges, rng, scale: float) -> None:
    """A weighted TH1D at ``path`` with random yields and variances, flow bins filled too (the
    reader must leave them out)."""
    hist = bh.Histogram(bh.axis.Variable(edges), storage=bh.storage.Weight())
    view = hist.view(flow=True)
    view.value = scale * rng.uniform(0.5, 1.5, len(edges) + 1)
    view.variance = scale * rng.uniform(0.01, 0.05, len(edges) + 1) * view.value
    file[path] = hist


@pytest.fixture
def constructed(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """Two regions with variable bins, one file per sample, regions as folders and variations
    as histogram names; Signal only in SR (Samples[].Regions); a systematic with a Symmetrize
    side, one whose Up template comes from another file (SamplePath override, nominal
    VariationPath) and whose Down has its own VariationPath; a free normalisation of Top."""
    rng = np.random.default_rng(11)
    layout = {
        "data": ["nom"],
        "signal": ["nom"],
        "top": ["nom", "jes_up"],
        "dy": ["nom", "jes_up", "gen_down"],
        "dy_alt": ["nom"],
    }
    scales = {"data": 300.0, "signal": 20.0, "top": 100.0, "dy": 150.0, "dy_alt": 160.0}
    for name, variations in layout.items():
        with uproot.recreate(tmp_path / f"{name}.root") as file:
            for folder, edges in (("signal_region", SR_EDGES), ("control", CR_EDGES)):
                if name == "signal" and folder == "control":
                    continue
                for variation in variations:
                    _write_th1(file, f"{folder}/{variation}", edges, rng, scales[name])
    raw = {
        "General": {
            "Measurement": "constructed",
            "POI": "mu",
            "InputPath": str(tmp_path / "{SamplePath}.root:{RegionPath}/{VariationPath}"),
            "VariationPath": "nom",
        },
        "Regions": [
            {"Name": "SR", "RegionPath": "signal_region", "Binning": SR_EDGES},
            {"Name": "CR", "RegionPath": "control"},
        ],
        "Samples": [
            {"Name": "Data", "SamplePath": "data", "Data": True},
            {"Name": "Signal", "SamplePath": "signal", "Regions": "SR"},
            {"Name": "Top", "SamplePath": "top"},
            {"Name": "DY", "SamplePath": "dy", "Regions": ["SR", "CR"]},
        ],
        "Systematics": [
            {
                "Name": "JES",
                "Type": "NormPlusShape",
                "Samples": ["Top", "DY"],
                "Up": {"VariationPath": "jes_up"},
                "Down": {"Symmetrize": True},
            },
            {
                "Name": "Generator",
                "Type": "NormPlusShape",
                "Samples": "DY",
                "Up": {"SamplePath": "dy_alt"},
                "Down": {"VariationPath": "gen_down"},
            },
            {
                "Name": "Lumi",
                "Type": "Normalization",
                "Up": {"Normalization": 0.017},
                "Down": {"Normalization": -0.017},
            },
        ],
        "NormFactors": [
            {"Name": "mu", "Samples": "Signal", "Nominal": 1.0, "Bounds": [0.0, 20.0]},
            {"Name": "k_top", "Samples": "Top", "Nominal": 1.0, "Bounds": [0.0, 5.0]},
        ],
    }
    return tmp_path, raw


def _write_config(folder: pathlib.Path, raw: dict) -> pathlib.Path:
    path = folder / "analysis.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_constructed_histograms_and_workspace(constructed):
    folder, raw = constructed
    path = _write_config(folder, raw)
    histograms = ok("histograms", path, "--device", "cpu")
    assert set(histograms) == {"SR", "CR"}
    assert set(histograms["CR"]) == {"Data", "Top", "DY"}  # no Signal in CR
    assert set(histograms["CR"]["DY"]) == {"nominal", "JES_Up", "Generator_Up", "Generator_Down"}
    regions = {r["Name"]: r for r in raw["Regions"]}
    samples = {s["Name"]: s for s in raw["Samples"]}
    systematics = {s["Name"]: s for s in raw["Systematics"]}
    for region, edges in (("SR", SR_EDGES), ("CR", CR_EDGES)):
        for sample, variations in histograms[region].items():
            for variation, hist in variations.items():
                syst, side = variation.rsplit("_", 1) if variation != "nominal" else (None, None)
                values, variances = cabinetry_histogram(
                    raw, regions[region], samples[sample], systematics.get(syst), side
                )
                assert hist["edges"] == edges
                np.testing.assert_array_equal(hist["yields"], values)
                np.testing.assert_array_equal(hist["sumw2"], variances)
    workspace = ok("workspace", path, "--device", "cpu")
    assert_same(workspace, cabinetry_workspace(raw), rtol=1e-12)


def test_region_edges_for_plots(constructed, toy):
    """Plot axes: Binning where given, else the files' edges (CR has no Binning)."""
    _, raw = constructed
    config = configuration.from_dict(raw)
    assert region_edges(config) == {"SR": tuple(SR_EDGES), "CR": tuple(CR_EDGES)}
    ntuples = configuration.from_dict(toy.config)
    assert region_edges(ntuples) == {"SR": tuple(toy.config["Regions"][0]["Binning"])}


def _rename_histogram(folder: pathlib.Path, raw: dict) -> str:
    raw["Systematics"][1]["Down"]["VariationPath"] = "gen_dwn"
    return (
        f"{folder / 'dy.root'}: no histogram 'signal_region/gen_dwn' (sample 'DY' in region "
        "'SR' (Generator_Down)); did you mean 'signal_region/gen_down'"
    )


def _other_edges(folder: pathlib.Path, raw: dict) -> str:
    with uproot.update(folder / "top.root") as file:
        del file["control/jes_up"]
        edges = [50.0, 70.0, 80.0, 120.0, 200.0, 400.0]
        _write_th1(file, "control/jes_up", edges, np.random.default_rng(1), 1.0)
    return f"region 'CR': histogram {folder / 'top.root'}:control/jes_up has bin edges [50, 70"


def _other_binning(folder: pathlib.Path, raw: dict) -> str:
    raw["Regions"][0]["Binning"] = [0.0, 10.0, 40.0, 70.0]
    return "the region's Binning is [0, 10, 40, 70]; expected equal edges"


def _missing_file(folder: pathlib.Path, raw: dict) -> str:
    (folder / "dy_alt.root").unlink()
    return f"{folder / 'dy_alt.root'}: file not found (histogram 'signal_region/nom' of sample 'DY'"


@pytest.mark.parametrize(
    "change",
    [_rename_histogram, _other_edges, _other_binning, _missing_file],
    ids=lambda f: f.__name__,
)
def test_bad_histogram_inputs_give_one_line(constructed, change: Callable[..., str]):
    folder, raw = constructed
    raw = copy.deepcopy(raw)
    expected = change(folder, raw)
    line = one_line_error(run("workspace", _write_config(folder, raw), "--device", "cpu"))
    assert expected in line


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["Samples"][2].update(Tree="top"),
            "Samples[0]: missing required key 'Tree' (Samples[2] has one",
        ),
        (
            lambda c: c["Regions"][1].update(Filter="x > 1"),
            "Regions[1].Filter: histogram inputs (no sample has a Tree) have no events",
        ),
        (
            lambda c: c["Systematics"][0]["Up"].update(Weight="w"),
            "Systematics[0].Up.Weight: histogram inputs",
        ),
        (
            lambda c: c["Regions"][0].pop("RegionPath"),
            "Regions[0]: missing RegionPath; General.InputPath",
        ),
        (
            lambda c: c["Samples"][2].update(SamplePath=["a", "b"]),
            "Samples[2].SamplePath: histogram inputs take one path per sample",
        ),
        (
            lambda c: [s.update(Tree="t") for s in c["Samples"]],
            "Regions[0]: missing required key 'Variable' (ntuple inputs",
        ),
    ],
)
def test_histogram_config_errors_name_the_problem(constructed, change, message):
    _, raw = constructed
    raw = copy.deepcopy(raw)
    change(raw)
    with pytest.raises(ConfigError) as info:
        configuration.from_dict(raw, source="h.yaml")
    text = str(info.value)
    assert text.startswith("h.yaml: ") and message in text and "\n" not in text


def test_ntuple_config_refuses_variation_path(toy):
    raw = copy.deepcopy(toy.config)
    raw["General"]["VariationPath"] = "nominal"
    with pytest.raises(ConfigError, match="General.VariationPath: only histogram inputs"):
        configuration.from_dict(raw, source="toy.yaml")
