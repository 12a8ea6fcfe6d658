"""What the user sees of the background MC statistics: the cut flow's block and warning, the
warning of ``optimize`` / ``scan-cuts``, the report's table and the n_eff plot.

The reference is numpy on the ROOT files written in the test (read back with uproot): per bin of
the region, ``n_eff = (sum w)^2 / sum w^2`` of each background sample and of their sum after the
Filter and the boolean cuts (0 where ``sum w <= 0``, as :mod:`analysis.mc_statistics` defines).
"""

from __future__ import annotations

import html
import json
import math
import pathlib
import re

import awkward as ak
import numpy as np
import pytest
import uproot
from click.testing import CliRunner
from matplotlib.patches import StepPatch

from analysis import config as configuration
from analysis.cli import main
from analysis.cutflow import cut_flow, mc_statistics_summary
from analysis.io import read_events
from analysis.plotting import mc_statistics as plot_module
from analysis.plotting.mc_statistics import effective_events_per_bin
from analysis.report import analysis_report, format_value
from tests.test_report import Parsed

#: the toy's binning with two tail bins: [3, 4.5) holds a few background events, [4.5, 8) none
BINNING = [-3.0, -1.5, -0.5, 0.0, 0.5, 1.5, 3.0, 4.5, 8.0]
GUARD = 150.0
START = {"SR:lead_pt>": 15.0, "SR:met<": 60.0}
TIGHT = {"SR:lead_pt>": 40.0, "SR:met<": 25.0}
BACKGROUNDS = ("Background", "Other")
WARNING = re.compile(
    r"WARNING analysis\.(?:cli\.pipeline|optimize): background MC below (\S+) effective "
    r"events per bin \(Optimization\.MinEffectiveEvents\) at the (.+?): (.*)"
)


# ----------------------------------------------------------------------------- the problem
@pytest.fixture
def analysis(toy):
    """The toy with a second background (the ``bkg_up`` tree), tail bins and a guard of 150."""
    toy.config["Regions"][0]["Binning"] = BINNING
    toy.config["Samples"].append(
        {"Name": "Other", "Tree": "bkg_up", "SamplePath": "mc.root", "Weight": "weight"}
    )
    toy.config["Optimization"] = {"MinEffectiveEvents": GUARD}
    return toy, toy.write_config()


def numpy_effective_events(folder: pathlib.Path, tree: str, cuts: dict[str, float]):
    """``(n_eff per bin, sum w per bin, sum w^2 per bin)`` of one tree by numpy."""
    with uproot.open(folder / "mc.root") as file:
        arrays = file[tree].arrays(["x", "met", "weight", "Muon_pt", "Muon_eta"], library="ak")
    lead_pt = ak.to_numpy(arrays["Muon_pt"][:, 0]).astype(np.float64)
    n_central = ak.to_numpy(ak.sum(np.abs(arrays["Muon_eta"]) < 1.5, axis=1))
    x = ak.to_numpy(arrays["x"]).astype(np.float64)
    met = ak.to_numpy(arrays["met"]).astype(np.float64)
    w = ak.to_numpy(arrays["weight"]).astype(np.float64)
    keep = (n_central >= 1) & (lead_pt > cuts["SR:lead_pt>"]) & (met < cuts["SR:met<"])
    edges = np.asarray(BINNING)
    index = np.searchsorted(edges, x[keep], side="right") - 1  # half-open bins, no flow
    inside = (index >= 0) & (index < len(BINNING) - 1)
    sumw = np.bincount(index[inside], w[keep][inside], len(BINNING) - 1)
    sumw2 = np.bincount(index[inside], w[keep][inside] ** 2, len(BINNING) - 1)
    return n_eff(sumw, sumw2), sumw, sumw2


def n_eff(sumw: np.ndarray, sumw2: np.ndarray) -> np.ndarray:
    populated = (sumw > 0) & (sumw2 > 0)
    return np.where(populated, sumw**2 / np.where(populated, sumw2, 1.0), 0.0)


def numpy_table(folder: pathlib.Path, cuts: dict[str, float]) -> dict[str, np.ndarray]:
    """Background sample (and ``background``: their sum) -> n_eff per bin."""
    trees = {"Background": "bkg", "Other": "bkg_up"}
    parts = {name: numpy_effective_events(folder, tree, cuts) for name, tree in trees.items()}
    table = {name: part[0] for name, part in parts.items()}
    table["background"] = n_eff(
        sum(p[1] for p in parts.values()), sum(p[2] for p in parts.values())
    )
    return table


def numpy_below(table: dict[str, np.ndarray], minimum: float) -> list[dict]:
    return [
        {"region": "SR", "bin": b, "low": BINNING[b], "high": BINNING[b + 1], "n_eff": float(v)}
        for b, v in enumerate(table["background"])
        if v < minimum
    ]


def assert_below_guard(found: list[dict], expected: list[dict]) -> None:
    assert [(b["region"], b["bin"], b["low"], b["high"]) for b in found] == [
        (b["region"], b["bin"], b["low"], b["high"]) for b in expected
    ]
    # float32 inside analysis.mc_statistics.summary: see test_summary_below_guard_is_float64
    np.testing.assert_allclose(
        [b["n_eff"] for b in found], [b["n_eff"] for b in expected], rtol=1e-6
    )


NAMED_BIN = re.compile(r"(\w+) bin (\d+) \[([^,]+), ([^)]+)\): n_eff = ([^;]+)(?:; |$)")


def assert_names_every_bin(text: str, bins: list[dict]) -> None:
    """``text`` names each of ``bins`` once, with its edges and n_eff (3 digits), in order."""
    named = NAMED_BIN.findall(text)
    assert [(r, int(b), float(lo), float(hi)) for r, b, lo, hi, _ in named] == [
        (b["region"], b["bin"], b["low"], b["high"]) for b in bins
    ]
    for (*_, value), b in zip(named, bins, strict=True):
        assert float(value) == pytest.approx(b["n_eff"], rel=5e-3, abs=1e-12)


def warnings_of(stderr: str) -> list[tuple[float, str, str]]:
    """``(minimum, where, bins)`` of every MC-guard warning line of the CLI."""
    out = []
    for line in stderr.splitlines():
        match = WARNING.fullmatch(line)
        if match:
            out.append((float(match[1]), match[2], match[3]))
    return out


# ----------------------------------------------------------------------------- cut flow
def test_cutflow_block_equals_numpy_and_a_warning_names_the_thin_bins(analysis, tmp_path):
    toy, path = analysis
    cuts_path = tmp_path / "cuts.json"
    cuts_path.write_text(json.dumps(TIGHT))
    result = CliRunner().invoke(
        main, ["cutflow", str(path), "--cuts", str(cuts_path), "--no-cache", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert list(payload) == ["start", "optimized", "cuts", "mc_statistics"]
    assert list(payload["mc_statistics"]) == ["start", "optimized"]
    lines = warnings_of(result.stderr)
    for (name, cuts), line in zip((("start", START), ("optimized", TIGHT)), lines, strict=True):
        block = payload["mc_statistics"][name]
        expected = numpy_table(toy.folder, cuts)
        assert block["min_effective_events"] == GUARD
        assert list(block["effective_events"]) == ["SR"]
        table = block["effective_events"]["SR"]
        assert list(table) == [*BACKGROUNDS, "background"]  # no signal, no data
        for column, values in expected.items():
            np.testing.assert_allclose(table[column], values, rtol=1e-12, atol=1e-12)
        below = numpy_below(expected, GUARD)
        assert 0 < len(below) < len(BINNING) - 1  # the test shows both kinds of bins
        assert_below_guard(block["below_guard"], below)
        # the warning: one line per cut set, naming exactly these bins
        assert line[0] == GUARD and line[1] == f"{name} cuts"
        assert_names_every_bin(line[2], below)
    assert len(lines) == 2
    # the empty tail bin: no background MC at all
    assert payload["mc_statistics"]["start"]["effective_events"]["SR"]["background"][-1] == 0.0
    # the cut flow itself is unchanged: its last step is the sum of the bins
    config = configuration.load(path)
    flow = cut_flow(config, cuts=TIGHT)["SR"].to_dict()
    assert payload["optimized"]["SR"] == json.loads(json.dumps(flow))


def test_cutflow_without_cuts_and_with_the_guard_off(analysis, tmp_path):
    toy, path = analysis
    result = CliRunner().invoke(main, ["cutflow", str(path), "--no-cache", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert list(payload) == ["start", "mc_statistics"]
    assert [w[1] for w in warnings_of(result.stderr)] == ["start cuts"]

    toy.config["Optimization"] = {"MinEffectiveEvents": 0}
    result = CliRunner().invoke(
        main, ["cutflow", str(toy.write_config(name="off.yaml")), "--no-cache", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    block = json.loads(result.stdout)["mc_statistics"]["start"]
    assert block["min_effective_events"] == 0 and block["below_guard"] == []
    expected = numpy_table(toy.folder, START)
    np.testing.assert_allclose(
        block["effective_events"]["SR"]["background"], expected["background"], rtol=1e-12
    )
    assert "WARNING" not in result.stderr


def test_mc_statistics_summary_reads_or_takes_events(analysis):
    toy, path = analysis
    config = configuration.load(path)
    read = mc_statistics_summary(config, cuts=TIGHT)
    events = read_events(config)
    given = mc_statistics_summary(config, events, cuts=TIGHT)
    assert read == given
    expected = numpy_table(toy.folder, TIGHT)
    np.testing.assert_allclose(
        given["effective_events"]["SR"]["Other"], expected["Other"], rtol=1e-12
    )
    del events[("SR", "Other", "nominal")]
    with pytest.raises(KeyError, match="'SR', 'Other', 'nominal'"):
        mc_statistics_summary(config, events)


def test_summary_below_guard_is_float64(analysis):
    _, path = analysis
    block = mc_statistics_summary(configuration.load(path))
    table = block["effective_events"]["SR"]["background"]
    for b in block["below_guard"]:
        assert b["n_eff"] == table[b["bin"]]


# ----------------------------------------------------------------------------- optimize
def scan(path: pathlib.Path, out: pathlib.Path, *options: str):
    return CliRunner().invoke(
        main,
        [
            "scan-cuts",
            str(path),
            "--method",
            "random",
            "--budget",
            "4",
            "--out",
            str(out),
            "--no-cache",
            "--device",
            "cpu",
            *options,
        ],
    )


def test_scan_cuts_names_each_thin_bin_once(analysis, tmp_path):
    """Nothing keeps the guard: the best point is the initial one, and one line says so."""
    toy, _ = analysis
    # twelve bins, more than describe() names by default; each has background (no empty tail
    # bin, where signal and data without background make the hard fit fail)
    toy.config["Regions"][0]["Binning"] = [-3.0 + 0.5 * i for i in range(13)]
    toy.config["Optimization"] = {"MinEffectiveEvents": 1e6}
    path = toy.write_config(name="strict.yaml")
    result = scan(path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert json.loads(result.stdout) == saved  # stdout: the result, nothing else
    assert saved["best"]["cuts"] == saved["initial"]["cuts"]
    bins = saved["initial"]["below_guard"]
    assert len(bins) == 12
    (line,) = warnings_of(result.stderr)
    assert line[0] == 1e6
    assert line[1].startswith("initial cuts, reported as best")
    assert_names_every_bin(line[2], bins)
    assert sum("MinEffectiveEvents" in line for line in result.stderr.splitlines()) == 1


def test_scan_cuts_warns_about_the_initial_point_only(analysis, tmp_path):
    """Tight starting cuts thin out the background; looser scanned points keep the guard."""
    toy, _ = analysis
    toy.config["Regions"][0]["Binning"] = BINNING[:7]  # no empty tail: the guard can hold
    toy.config["Regions"][0]["Cuts"][0]["Value"] = 55.0
    toy.config["Optimization"] = {"MinEffectiveEvents": 20}
    path = toy.write_config(name="tight.yaml")
    result = scan(path, tmp_path / "out", "--seed", "2")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["initial"]["below_guard"] and not saved["best"]["below_guard"]
    (line,) = warnings_of(result.stderr)
    assert line[:2] == (20.0, "initial cuts")
    assert_names_every_bin(line[2], saved["initial"]["below_guard"])
    assert sum("MinEffectiveEvents" in line for line in result.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------- report
def result_json(folder: pathlib.Path, minimum: float, with_block: bool = True) -> dict:
    """A result.json by hand: the toy's n_eff by numpy at the starting and the tight cuts."""
    tables = {
        point: {"SR": {k: v.tolist() for k, v in numpy_table(folder, cuts).items()}}
        for point, cuts in (("initial", START), ("best", TIGHT))
    }

    def point(name: str, cuts: dict, hard: float) -> dict:
        table = {k: np.asarray(v) for k, v in tables[name]["SR"].items()}
        below = numpy_below(table, minimum) if minimum > 0 else []
        return {"cuts": cuts, "relaxed": None, "hard": hard, "below_guard": below}

    result = {
        "objective": "discovery_significance",
        "initial": point("initial", START, 2.0),
        "final": point("best", TIGHT, 2.5),
        "best": point("best", TIGHT, 2.5),
        "history": [],
        "hard_evaluations": 3,
        "seconds": 1.5,
        "device": "cpu",
    }
    if with_block:
        result["mc_statistics"] = {"min_effective_events": minimum, "effective_events": tables}
    else:
        for key in ("initial", "final", "best"):
            del result[key]["below_guard"]
    return result


def write_results(toy, result: dict) -> pathlib.Path:
    results = toy.folder / "results"
    (results / "optimize").mkdir(parents=True, exist_ok=True)
    (results / "optimize" / "result.json").write_text(json.dumps(result))
    return results


def mc_tables(parsed: Parsed) -> list[list[list[str]]]:
    """The n_eff tables of a report (their titles are headings)."""
    tables = [t for t in parsed.tables if t and "total background, initial" in t[0]]
    assert parsed.headings["h3"].count("Effective MC events, SR") == len(tables)
    return tables


def test_report_table_holds_the_result_numbers(analysis):
    toy, path = analysis
    result = result_json(toy.folder, GUARD)
    text = analysis_report(write_results(toy, result), path)
    parsed = Parsed(text)
    (table,) = mc_tables(parsed)
    header, *rows = table
    assert header == [
        "bin",
        "range",
        *(
            f"{name}, {point}"
            for name in (*BACKGROUNDS, "total background")
            for point in ("initial", "best")
        ),
    ]
    assert len(rows) == len(BINNING) - 1
    block = result["mc_statistics"]["effective_events"]
    marked = 0
    for b, cells in enumerate(rows):
        assert cells[:2] == [str(b), f"[{BINNING[b]:g}, {BINNING[b + 1]:g})"]
        k = 2
        for column in (*BACKGROUNDS, "background"):
            for point in ("initial", "best"):
                value = block[point]["SR"][column][b]
                below = column == "background" and value < GUARD
                assert cells[k] == format_value(value) + (" *" if below else "")
                assert float(cells[k].rstrip(" *")) == pytest.approx(value, rel=5e-4, abs=1e-12)
                marked += below
                k += 1
    below_bins = len(result["initial"]["below_guard"]) + len(result["best"]["below_guard"])
    assert marked == below_bins > 0
    assert text.count('class="num marked"') == marked
    assert f"Optimization.MinEffectiveEvents = {GUARD:g}" in text
    paragraphs = [html.unescape(p) for p in re.findall(r"<p>(.*?)</p>", text)]
    for point in ("initial", "best"):
        start = f"Below the guard at the {point} cuts: "
        (paragraph,) = [p for p in paragraphs if p.startswith(start)]
        assert_names_every_bin(paragraph[len(start) : -1], result[point]["below_guard"])
    # the objective table counts the bins below the guard per point
    (objective,) = [t for t in parsed.tables if t and t[0][:3] == ["point", "relaxed", "hard"]]
    assert objective[0][-1] == "bins below the MC guard"
    assert [row[-1] for row in objective[1:]] == [
        str(len(result[p]["below_guard"])) for p in ("initial", "final", "best")
    ]
    # the n_eff figure is embedded: one image more than without the block
    older = analysis_report(write_results(toy, result_json(toy.folder, GUARD, False)), path)
    assert len(parsed.images) == len(Parsed(older).images) + 1


def test_report_without_the_block_says_so_in_one_line(analysis):
    toy, path = analysis
    text = analysis_report(write_results(toy, result_json(toy.folder, GUARD, False)), path)
    parsed = Parsed(text)
    assert mc_tables(parsed) == []
    assert text.count("Effective MC events per bin: not available") == 1
    assert "bins below the MC guard" not in text and "marked" not in text.split("</style>")[1]


def test_report_with_the_guard_off(analysis):
    toy, path = analysis
    text = analysis_report(write_results(toy, result_json(toy.folder, 0.0)), path)
    parsed = Parsed(text)
    (table,) = mc_tables(parsed)
    assert "The guard is off (Optimization.MinEffectiveEvents = 0)." in text
    assert 'class="num marked"' not in text and all("*" not in c for r in table for c in r)


# ----------------------------------------------------------------------------- plot
def stairs(ax) -> dict[str, StepPatch]:
    return {p.get_gid(): p for p in ax.patches if isinstance(p, StepPatch)}


def test_plot_lines_are_the_table(analysis):
    toy, path = analysis
    config = configuration.load(path)
    block = result_json(toy.folder, GUARD)["mc_statistics"]
    figure = effective_events_per_bin(
        block["effective_events"],
        minimum=block["min_effective_events"],
        edges={"SR": BINNING},
        observables={"SR": config.regions[0].variable},
    )
    (ax,) = figure.axes
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "x" and ax.get_title() == "SR"
    lines = stairs(ax)
    columns = (*BACKGROUNDS, "background")
    assert set(lines) == {f"{p}:SR:{c}" for p in ("initial", "best") for c in columns}
    for point in ("initial", "best"):
        for column in columns:
            values, edges, _ = lines[f"{point}:SR:{column}"].get_data()
            np.testing.assert_array_equal(values, block["effective_events"][point]["SR"][column])
            np.testing.assert_array_equal(edges, BINNING)
            assert lines[f"{point}:SR:{column}"].get_label() == plot_module.line_label(
                column, point
            )
        assert lines[f"{point}:SR:background"].get_linestyle() == (
            "--" if point == "initial" else "-"
        )
    (guard,) = [line for line in ax.lines if line.get_gid() == "guard"]
    assert list(guard.get_ydata()) == [GUARD, GUARD]
    # the legend explains every line
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    labels = [p.get_label() for p in lines.values()] + [plot_module.guard_label(GUARD)]
    assert sorted(legend) == sorted(labels) and len(set(legend)) == 2 * len(columns) + 1
    # the empty tail bin: n_eff = 0 drops out of the log axis, and a note says so
    assert block["effective_events"]["initial"]["SR"]["background"][-1] == 0.0
    assert any("leaves through the bottom" in t.get_text() for t in ax.texts)
    low, high = ax.get_ylim()
    positive = [
        v for t in block["effective_events"].values() for r in t["SR"].values() for v in r if v > 0
    ]
    assert low < min(positive) and high > max(positive + [GUARD])


def test_plot_regions_guard_off_and_errors():
    table = {
        "SR": {"A": [5.0, 20.0], "background": [12.0, 30.0]},
        "CR": {"A": [1.0, 2.0, 3.0], "background": [1.0, 2.0, 3.0]},
    }
    figure = effective_events_per_bin({"start": table, "optimized": table})
    assert [ax.get_title() for ax in figure.axes] == ["SR", "CR"]
    for ax in figure.axes:
        assert not [line for line in ax.lines if line.get_gid() == "guard"]
        assert ax.get_xlabel() == "bin"
        values, edges, _ = stairs(ax)[f"optimized:{ax.get_title()}:A"].get_data()
        np.testing.assert_array_equal(edges, np.arange(len(values) + 1))
        assert not math.isnan(ax.get_ylim()[0])
    with pytest.raises(ValueError, match="no effective-events table"):
        effective_events_per_bin({})
    with pytest.raises(ValueError, match="differ in regions, samples or bins"):
        effective_events_per_bin({"a": table, "b": {"SR": table["SR"]}})
