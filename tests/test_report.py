"""HTML report: it parses, holds every section, table cell and image (decodable, not blank),
escapes everything, needs nothing outside the file, and is written atomically."""

from __future__ import annotations

import base64
import importlib.metadata
import io
import os
import pathlib
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from analysis.errors import InputFileError
from analysis.report import (
    Image,
    Listing,
    Marked,
    Section,
    Table,
    build_report,
    format_value,
    software_versions,
    write_report,
)

PIXEL_STD_MIN = 0.02  # a white figure has 0; a figure with a line and axes well above it
SCRIPT = "<script>alert('x')</script>"


class Parsed(HTMLParser):
    """Collects headings, images, tables (cell texts per row), <pre> texts and every tag."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.headings: dict[str, list[str]] = {"title": [], "h1": [], "h2": [], "h3": []}
        self.images: list[dict[str, str | None]] = []
        self.tables: list[list[list[str]]] = []
        self.pre: list[str] = []
        self.links: list[str] = []
        self._text: list[str] | None = None
        self._open: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
            return
        if tag == "a":
            self.links.append(attrs.get("href") or "")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("title", "h1", "h2", "h3", "td", "th", "pre"):
            self._open.append(tag)
            self._text = []

    def handle_endtag(self, tag):
        if self._open and self._open[-1] == tag:
            self._open.pop()
            text = "".join(self._text or [])
            if tag in self.headings:
                self.headings[tag].append(text)
            elif tag in ("td", "th"):
                self.tables[-1][-1].append(text)
            else:
                self.pre.append(text)
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def line_figure() -> Figure:
    figure = Figure(figsize=(4, 3))
    ax = figure.add_subplot()
    x = np.linspace(0, 6, 50)
    ax.plot(x, np.sin(x), color="tab:blue", linewidth=3)
    ax.set_title("a sine")
    return figure


def decode_png(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return imread(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True)), format="png")


ROWS = [
    {"name": "mu1_pt", "start": 30.0, "optimized": 42.123456, "bounds": [20.0, 120.0]},
    {"name": "iso", "start": 0.15, "optimized": 0.0812, "events": 1234, "trainable": True},
    {"name": SCRIPT, "start": -1.5e-7, "optimized": 2.5e7, "events": None, "trainable": False},
]


@pytest.fixture
def report(tmp_path) -> tuple[str, dict]:
    png = tmp_path / "plot.png"
    line_figure().savefig(png, format="png")
    sections = [
        Section(
            "Cut flow",
            text="First paragraph.\n\nSecond paragraph with a < sign & more.",
            figures=[line_figure(), Image(png, caption="from a file")],
            tables=[Table("Cuts", ROWS), ("Second table", [{"a": 1, "b": "two"}])],
        ),
        Section(
            f"Configuration {SCRIPT}",
            preformatted=[
                Listing("dimuon.yaml", "Cuts:\n  - {Name: iso, Value: 0.15}  # x < 1 & y > 2\n"),
                ("versions", "torch 2.13.0"),
                "untitled text",
            ],
        ),
        Section("Empty section"),
    ]
    summary = {"expected significance": 4.0912, "device": "cpu", "note": SCRIPT}
    text = build_report(
        title="dimuon <resonance> & co", summary=summary, sections=sections, footer="made here"
    )
    return text, {"sections": sections, "summary": summary, "png": png}


# ----------------------------------------------------------------------------- content
def test_parses_with_every_section(report):
    text, inputs = report
    parsed = Parsed(text)
    assert text.startswith("<!DOCTYPE html>")
    assert parsed.headings["title"] == ["dimuon <resonance> & co"]
    assert parsed.headings["h1"] == ["dimuon <resonance> & co"]
    titles = [s.title for s in inputs["sections"]]
    assert parsed.headings["h2"] == ["Contents", *titles]
    # the contents link to the sections
    assert parsed.links == [f"#section-{i}" for i in range(1, len(titles) + 1)]
    for i in range(1, len(titles) + 1):
        assert f'id="section-{i}"' in text
    assert parsed.headings["h3"] == ["Cuts", "Second table", "dimuon.yaml", "versions"]
    assert "<p>First paragraph.</p>" in text
    assert "<p>Second paragraph with a &lt; sign &amp; more.</p>" in text
    assert parsed.pre == [
        inputs["sections"][1].preformatted[0].text,
        "torch 2.13.0",
        "untitled text",
    ]
    assert "<footer>made here</footer>" in text


def test_tables_hold_the_input_values(report):
    text, inputs = report
    parsed = Parsed(text)
    summary, cuts, second = parsed.tables
    assert summary == [[label, format_value(v)] for label, v in inputs["summary"].items()]
    columns = ["name", "start", "optimized", "bounds", "events", "trainable"]
    assert cuts[0] == columns
    for row, cells in zip(ROWS, cuts[1:], strict=True):
        assert cells == [format_value(row.get(c)) for c in columns]
        for column, cell in zip(columns, cells, strict=True):
            value = row.get(column)
            if isinstance(value, float):
                assert float(cell) == pytest.approx(value, rel=5e-4)
            elif isinstance(value, bool):
                assert cell == ("yes" if value else "no")
            elif isinstance(value, (int, str)):
                assert cell == str(value)
            elif value is None:
                assert cell == ""
    assert cuts[1][3] == "[20, 120]"
    assert second == [["a", "b"], ["1", "two"]]
    assert '<td class="num">1234</td>' in text  # numbers right-aligned, text not


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        (True, "yes"),
        (12345678, "12345678"),
        (np.int64(7), "7"),
        (30.0, "30"),
        (0.15, "0.15"),
        (11.4239, "11.42"),
        (1258.99, "1259"),
        (-0.0012345, "-0.001234"),
        (2.5e7, "2.5e+07"),
        (1.5e-7, "1.5e-07"),
        (0.0, "0"),
        (float("nan"), "nan"),
        (float("-inf"), "-inf"),
        ((1, 2.5), "[1, 2.5]"),
        (np.array([0.5, 3.0]), "[0.5, 3]"),
        ("text", "text"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_images_decode_and_are_not_blank(report):
    text, inputs = report
    parsed = Parsed(text)
    assert len(parsed.images) == 2
    for image in parsed.images:
        pixels = decode_png(image["src"])
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > PIXEL_STD_MIN
    # the file is embedded byte for byte
    assert base64.b64decode(parsed.images[1]["src"].split(",", 1)[1]) == inputs["png"].read_bytes()
    assert (
        parsed.images[1]["alt"] == "from a file" and "<figcaption>from a file</figcaption>" in text
    )
    # the blankness check would catch an empty figure
    blank = Parsed(build_report(title="t", sections=[Section("s", figures=[Figure((3, 2))])]))
    assert decode_png(blank.images[0]["src"])[..., :3].std() < PIXEL_STD_MIN


def test_everything_is_escaped(report):
    text, _ = report
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    parsed = Parsed(text)
    assert "script" not in parsed.tags
    assert f"Configuration {SCRIPT}" in parsed.headings["h2"]  # shown as text
    assert any(SCRIPT in row for row in parsed.tables[1])
    assert "x &lt; 1 &amp; y &gt; 2" in text  # preformatted text


def test_self_contained(report):
    text, _ = report
    parsed = Parsed(text)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parsed.tags)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert all(image["src"].startswith("data:image/png;base64,") for image in parsed.images)


def test_figure_errors(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        build_report(title="t", sections=[Section("s", figures=[tmp_path / "missing.png"])])
    fake = tmp_path / "fake.png"
    fake.write_text("<svg/>")
    with pytest.raises(InputFileError, match="not a PNG"):
        build_report(title="t", sections=[Section("s", figures=[fake])])


def test_summary_as_pairs():
    parsed = Parsed(build_report(title="t", summary=[("b", 2), ("a", 1.0)]))
    assert parsed.tables == [[["b", "2"], ["a", "1"]]]
    assert parsed.headings["h2"] == []  # no sections: no contents


# ----------------------------------------------------------------------------- writing
def test_write_is_atomic(tmp_path, monkeypatch):
    folder = tmp_path / "results" / "dimuon"
    path = write_report(folder / "report.html", "<p>first ü</p>")
    assert path == folder / "report.html"
    assert path.read_text(encoding="utf-8") == "<p>first ü</p>"
    write_report(path, "<p>second</p>")
    assert path.read_text(encoding="utf-8") == "<p>second</p>"
    assert os.listdir(folder) == ["report.html"]
    assert path.stat().st_mode & 0o777 == 0o644

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(path, "<p>third</p>")
    assert path.read_text(encoding="utf-8") == "<p>second</p>"
    assert os.listdir(folder) == ["report.html"]  # no temporary file left


def test_software_versions():
    versions = software_versions()
    assert list(versions)[:2] == ["python", "diffana"]
    expected = {
        "torch",
        "numpy",
        "pyhf",
        "uproot",
        "awkward",
        "iminuit",
        "matplotlib",
        "mplhep",
        "snakemake",
    }
    assert expected <= versions.keys()
    assert all(isinstance(v, str) and v for v in versions.values())
    assert versions["numpy"] == np.__version__
    assert versions["matplotlib"] == importlib.metadata.version("matplotlib")
    assert versions["python"].count(".") == 2


def test_versions_in_a_report():
    import json

    versions = software_versions()
    text = build_report(
        title="t", sections=[Section("Software", preformatted=[json.dumps(versions, indent=1)])]
    )
    assert json.loads(Parsed(text).pre[0]) == versions


def test_png_path_as_string(tmp_path):
    png = pathlib.Path(tmp_path / "a.png")
    line_figure().savefig(png, format="png")
    parsed = Parsed(build_report(title="t", sections=[Section("s", figures=[str(png)])]))
    assert decode_png(parsed.images[0]["src"])[..., :3].std() > PIXEL_STD_MIN


def test_numeric_cells_are_right_aligned():
    rows = [{"a": 1.5, "b": "11.90 ± 0.43", "c": "-3e-05", "d": "mu1_pt > 30", "e": True}]
    text = build_report(title="t", sections=[Section("s", tables=[Table("x", rows)])])
    assert '<td class="num">1.5</td>' in text
    assert '<td class="num">11.90 ± 0.43</td>' in text
    assert '<td class="num">-3e-05</td>' in text
    assert "<td>mu1_pt &gt; 30</td>" in text and "<td>yes</td>" in text


def test_marked_cells_are_shaded_and_show_their_mark():
    rows = [{"a": Marked(4.21349), "b": Marked("thin <bin>", "!"), "c": 35.0}]
    text = build_report(
        title="t", sections=[Section("s", tables=[Table("x", rows, caption="* below 10")])]
    )
    assert '<td class="num marked">4.213 *</td>' in text
    assert '<td class="marked">thin &lt;bin&gt; !</td>' in text
    assert '<td class="num">35</td>' in text
    assert "td.marked {" in text  # the style sheet shades them
    assert Parsed(text).tables[0] == [["a", "b", "c"], ["4.213 *", "thin <bin> !", "35"]]


# ----------------------------------------------------------------------------- diffana report
def _analysis_yaml(folder: pathlib.Path) -> pathlib.Path:
    """One Signal region (SR) and one Control region (CR); no file is read by the report."""
    import yaml

    region = {"Variable": "x", "Binning": [0.0, 1.0, 2.0]}
    config = {
        "General": {"Measurement": "two_regions", "POI": "mu", "InputPath": "in/{SamplePath}"},
        "Regions": [{"Name": "SR", **region}, {"Name": "CR", "Type": "Control", **region}],
        "Samples": [
            {"Name": "Data", "Tree": "t", "SamplePath": "d.root", "Data": True},
            {"Name": "S", "Tree": "t", "SamplePath": "s.root"},
            {"Name": "B", "Tree": "t", "SamplePath": "b.root"},
        ],
        "NormFactors": [{"Name": "mu", "Samples": "S", "Nominal": 1, "Bounds": [0, 10]}],
    }
    path = folder / "two_regions.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


SR_DATA = [71.0, 38.0]  # an excess over s + b = [35, 26]


def _results(folder: pathlib.Path, *, blinded: bool) -> pathlib.Path:
    """A partial results folder as the workflow writes it: start/workspace.json and
    start/significance.json (diffana's own significance of that workspace), blinding.json."""
    import json

    from analysis.blinding import blind_workspace
    from analysis.inference import significance
    from analysis.likelihood import Workspace

    def channel(name, s, b):
        mu = [{"name": "mu", "type": "normfactor", "data": None}]
        stat = [{"name": f"staterror_{name}", "type": "staterror", "data": [1.0] * len(b)}]
        return {
            "name": name,
            "samples": [
                {"name": "S", "data": s, "modifiers": mu},
                {"name": "B", "data": b, "modifiers": stat},
            ],
        }

    spec = {
        "channels": [channel("SR", [15.0, 6.0], [20.0, 20.0]), channel("CR", [0.5, 0.5], [90, 80])],
        "observations": [{"name": "SR", "data": SR_DATA}, {"name": "CR", "data": [93.0, 77.0]}],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }
    if blinded:
        spec = blind_workspace(spec, ["SR"])
    results = folder / ("blinded" if blinded else "unblinded")
    (results / "start").mkdir(parents=True)
    workspace = Workspace.from_spec(spec)
    model = workspace.model()
    result = significance(model, workspace.data(model)).to_dict()
    (results / "start" / "workspace.json").write_text(json.dumps(spec))
    (results / "start" / "significance.json").write_text(json.dumps(result))
    if blinded:
        record = {"blinded": True, "signal_regions": ["SR"], "control_regions": ["CR"]}
        (results / "blinding.json").write_text(json.dumps(record))
    return results


def _report(*args: str):
    from click.testing import CliRunner

    from analysis.cli import main

    return CliRunner().invoke(main, ["report", *args])


def test_report_on_a_folder_without_results_is_a_one_line_error(tmp_path):
    config = _analysis_yaml(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a result")
    output = tmp_path / "report.html"
    result = _report(str(tmp_path / "other"), "--config", str(config), "-o", str(output))
    assert result.exit_code == 2
    message = result.output.strip()
    assert "\n" not in message and str(tmp_path / "other") in message
    assert "not a diffana results folder" in message and "optimize/result.json" in message
    assert not output.exists()


def test_blinded_and_unblinded_reports_of_partial_results(tmp_path):
    """What is there is shown and what is missing is named at the top; blinded, no SR data row
    and no observed row; results made unblinded are left out of a blinded report and shown,
    with the observed significance, by --unblind."""
    import json

    config = _analysis_yaml(tmp_path)
    pages = {}
    for blinded in (True, False):
        results = _results(tmp_path, blinded=blinded)
        for unblind in (False, True):
            output = tmp_path / f"{results.name}_{unblind}.html"
            args = [str(results), "--config", str(config), "-o", str(output)]
            result = _report(*args, *(["--unblind"] if unblind else []))
            assert result.exit_code == 0, result.output
            pages[blinded, unblind] = output.read_text()
    sr_total, cr_total = format_value(sum(SR_DATA)), format_value(93.0 + 77.0)
    for (blinded, unblind), page in pages.items():
        notice = Parsed(page).tables[0]  # (the notice precedes the summary table)
        assert page.index('class="notice"') < page.index('class="summary"')
        assert "Missing from" in page and "optimize/result.json" in page
        shows_results = blinded or unblind
        assert ("Results before and after optimization" in page) == shows_results
        assert (f'<td class="num">{sr_total}</td>' in page) == (unblind and not blinded)
        assert (f'<td class="num">{cr_total}</td>' in page) == shows_results  # CR data row
        assert ("observed significance Z0" in page) == (unblind and not blinded)
        assert ("UNBLINDED" in page) == (unblind and not blinded)
        assert notice[0][0] == "blinding"
    observed = json.loads((tmp_path / "unblinded/start/significance.json").read_text())
    z = format_value(observed["observed"]["significance"])
    assert f'<td class="num">{z}</td>' in pages[False, True]
    assert z not in pages[False, False] and z not in pages[True, False]
    assert "left out" in pages[False, False]  # results made from the SR data
    assert "--unblind was given, but these results are blinded" in pages[True, True]
