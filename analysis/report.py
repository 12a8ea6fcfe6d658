"""A self-contained HTML report: summary, sections with text, figures, tables and listings.

The report is one HTML file with nothing outside it: figures are PNG images embedded as
``data:image/png;base64`` URIs, the style sheet is inline, and there are no scripts, fonts or
links to other sites, so the file can be mailed, archived next to the results and printed as it
is. Every piece of text that comes from the caller (titles, table cells, the configuration
listing) is HTML-escaped.

Building blocks::

    html = build_report(
        title="dimuon_resonance",
        summary={"expected significance": 4.1, "device": "cuda:0"},
        sections=[
            Section(
                "Cut flow",
                text="Yields after each cut, starting and optimized cuts.",
                figures=[cutflow_chart(start, optimized)],         # Figures or PNG paths
                tables=[Table("Signal region", cut_flow_table(start, optimized))],
            ),
            Section("Software", preformatted=[("versions", json.dumps(software_versions()))]),
        ],
    )
    write_report("results/dimuon/report.html", html)

Numbers in tables and the summary are formatted by :func:`format_value` (integers in full,
floats to four significant digits, exponent notation outside ``[1e-3, 1e6)``). A cell that
needs the reader's attention (a value below a threshold) is a :class:`Marked` value: shown with
its mark and shaded.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
import os
import pathlib
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from matplotlib.figure import Figure

from analysis.errors import InputFileError
from analysis.files import write_atomically

__all__ = [
    "Image",
    "Listing",
    "Marked",
    "Section",
    "Table",
    "build_report",
    "format_value",
    "software_versions",
    "write_report",
]

#: distributions whose versions :func:`software_versions` reports (besides Python)
PACKAGES = (
    "diffana",
    "torch",
    "numpy",
    "scipy",
    "pyhf",
    "uproot",
    "awkward",
    "vector",
    "iminuit",
    "matplotlib",
    "mplhep",
    "snakemake",
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_DPI = 120
"""Resolution of embedded matplotlib figures (dots per inch)."""


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Table:
    """A titled table: one row per mapping, one column per key.

    ``columns`` fixes which keys are shown and in which order; by default every key, in the
    order it first appears in ``rows``. A row without a key shows an empty cell.
    """

    title: str
    rows: Sequence[Mapping[str, Any]]
    columns: Sequence[str] | None = None
    caption: str | None = None


@dataclass(frozen=True)
class Marked:
    """A table cell that needs attention: ``value`` (formatted as any cell) followed by
    ``mark``, shaded (CSS class ``marked``). Say in the table's caption what the mark means."""

    value: Any
    mark: str = "*"


@dataclass(frozen=True)
class Image:
    """A figure with a caption: a matplotlib Figure or the path of a PNG file."""

    source: Figure | str | os.PathLike[str]
    caption: str | None = None


@dataclass(frozen=True)
class Listing:
    """Preformatted text under a title (a configuration file, software versions)."""

    title: str
    text: str


@dataclass(frozen=True)
class Section:
    """One titled section of the report; its parts appear in the order of the fields.

    Attributes:
        title: the heading.
        text: a paragraph, or a sequence of paragraphs (a string with blank lines is split at
            them).
        figures: matplotlib Figures, PNG file paths or :class:`Image` (with a caption).
        tables: :class:`Table`, or ``(title, rows)`` pairs.
        preformatted: :class:`Listing`, ``(title, text)`` pairs, or plain strings (no title).
    """

    title: str
    text: str | Sequence[str] = ()
    figures: Sequence[Figure | str | os.PathLike[str] | Image] = ()
    tables: Sequence[Table | tuple[str, Sequence[Mapping[str, Any]]]] = ()
    preformatted: Sequence[Listing | tuple[str, str] | str] = ()


# ----------------------------------------------------------------------------- public API
def build_report(
    *,
    title: str,
    summary: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
    sections: Sequence[Section] = (),
    footer: str | None = None,
    notice: str | Sequence[str] = (),
) -> str:
    """The HTML text of a report: title, notice, summary table, contents, sections, optional
    footer.

    ``notice``: paragraphs the reader must see first (blinding, missing results), in a framed
    box under the title (CSS class ``notice``). ``summary`` is a mapping or a sequence of
    ``(label, value)`` pairs, shown as a two-column table under the title. Raises
    :class:`~analysis.errors.InputFileError` for a figure path that does not exist or is not a
    PNG file.
    """
    pairs = list(summary.items() if isinstance(summary, Mapping) else summary)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="diffana">',
        f"<title>{_escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<header><h1>{_escape(title)}</h1></header>",
    ]
    paragraphs = _paragraphs(notice)
    if paragraphs:
        text = "".join(f"<p>{_escape(p)}</p>" for p in paragraphs)
        parts.append(f'<section class="notice">{text}</section>')
    if pairs:
        rows = "".join(
            f'<tr><th scope="row">{_escape(label)}</th>{_cell(value)}</tr>'
            for label, value in pairs
        )
        parts.append(f'<section class="summary"><table>{rows}</table></section>')
    if sections:
        items = "".join(
            f'<li><a href="#section-{i}">{_escape(s.title)}</a></li>'
            for i, s in enumerate(sections, 1)
        )
        parts.append(f"<nav><h2>Contents</h2><ol>{items}</ol></nav>")
    parts.extend(_section(i, section) for i, section in enumerate(sections, 1))
    if footer:
        parts.append(f"<footer>{_escape(footer)}</footer>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(path: str | os.PathLike[str], html_text: str) -> pathlib.Path:
    """Write ``html_text`` to ``path`` atomically (:func:`analysis.files.write_atomically`:
    readers see the old report or the new one, never a partial file) and return the path."""
    return write_atomically(path, html_text)


def software_versions() -> dict[str, str]:
    """Versions of Python and of the packages in :data:`PACKAGES` ("not installed" if absent)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def format_value(value: Any) -> str:
    """The text of a table cell (not yet escaped).

    None -> empty; booleans -> ``yes``/``no``; integers in full; floats to four significant
    digits without trailing zeros (``30``, ``0.15``, ``11.42``, ``1259``), in exponent notation
    outside ``1e-3 <= |x| < 1e6`` (``1.235e+06``); lists and tuples as ``[a, b]``; numpy and
    torch arrays through ``tolist()``; anything else through ``str``.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return _format_float(float(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if not isinstance(value, str) and hasattr(value, "tolist"):  # numpy, torch
        return format_value(value.tolist())
    return str(value)


# ----------------------------------------------------------------------------- rendering
def _format_float(x: float) -> str:
    if not math.isfinite(x) or x == 0:
        return "0" if x == 0 else str(x)
    magnitude = abs(x)
    if not 1e-3 <= magnitude < 1e6:
        return f"{x:.4g}"
    decimals = max(0, 3 - math.floor(math.log10(magnitude)))
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


_NUMBER_TEXT = re.compile(r"[-+]?\d[\d.]*(e[-+]?\d+)?( ± \d[\d.]*(e[-+]?\d+)?)?")


def _is_number(value: Any) -> bool:
    """Numbers, and texts like ``"12.3"`` or ``"12.3 ± 0.4"``, are right-aligned."""
    if isinstance(value, str):
        return _NUMBER_TEXT.fullmatch(value) is not None
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(value: Any, tag: str = "td") -> str:
    if isinstance(value, Marked):
        css = "num marked" if _is_number(value.value) else "marked"
        text = f"{format_value(value.value)} {value.mark}"
        return f'<{tag} class="{css}">{_escape(text)}</{tag}>'
    css = ' class="num"' if _is_number(value) else ""
    return f"<{tag}{css}>{_escape(format_value(value))}</{tag}>"


def _section(index: int, section: Section) -> str:
    parts = [f'<section id="section-{index}">', f"<h2>{_escape(section.title)}</h2>"]
    parts += [f"<p>{_escape(p)}</p>" for p in _paragraphs(section.text)]
    parts += [_figure(item) for item in section.figures]
    for table in section.tables:
        parts.append(_table(table if isinstance(table, Table) else Table(*table)))
    for entry in section.preformatted:
        listing = (
            entry
            if isinstance(entry, Listing)
            else Listing("", entry)
            if isinstance(entry, str)
            else Listing(*entry)
        )
        if listing.title:
            parts.append(f"<h3>{_escape(listing.title)}</h3>")
        parts.append(f"<pre>{_escape(listing.text)}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def _paragraphs(text: str | Sequence[str]) -> list[str]:
    if isinstance(text, str):
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    return [p for p in text if p]


def _figure(item: Figure | str | os.PathLike[str] | Image) -> str:
    image = item if isinstance(item, Image) else Image(item)
    png = _png_bytes(image.source)
    encoded = base64.b64encode(png).decode("ascii")
    alt = image.caption or "figure"
    caption = f"<figcaption>{_escape(image.caption)}</figcaption>" if image.caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{_escape(alt)}">'
        f"{caption}</figure>"
    )


def _png_bytes(source: Figure | str | os.PathLike[str]) -> bytes:
    if isinstance(source, Figure):
        buffer = io.BytesIO()
        source.savefig(buffer, format="png", dpi=FIGURE_DPI, facecolor="white")
        return buffer.getvalue()
    path = pathlib.Path(source)
    if not path.is_file():
        raise InputFileError(f"{path}: figure file not found")
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise InputFileError(f"{path}: not a PNG file; the report embeds PNG images only")
    return data


def _table(table: Table) -> str:
    columns = list(table.columns) if table.columns is not None else _columns(table.rows)
    head = "".join(f'<th scope="col">{_escape(c)}</th>' for c in columns)
    body = "".join(
        "<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in table.rows
    )
    caption = f"<caption>{_escape(table.caption)}</caption>" if table.caption else ""
    title = f"<h3>{_escape(table.title)}</h3>" if table.title else ""
    return (
        f'{title}<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
  color: #1a1a1a; background: #fff; line-height: 1.45; max-width: 1150px;
  margin: 2rem auto; padding: 0 1.5rem; }
h1 { font-size: 1.8rem; margin: 0 0 1rem; border-bottom: 2px solid #333; padding-bottom: .3rem; }
h2 { font-size: 1.35rem; margin: 2rem 0 .6rem; border-bottom: 1px solid #bbb; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .4rem; }
p { margin: .4rem 0 .8rem; }
nav ol { margin: .2rem 0 1rem; padding-left: 1.6rem; }
nav h2 { font-size: 1.1rem; border: none; margin-top: 1rem; }
a { color: #0b5394; }
figure { margin: 1rem 0; text-align: center; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: .9rem; color: #444; margin-top: .3rem; }
.table-wrap { overflow-x: auto; margin: .4rem 0 1rem; }
table { border-collapse: collapse; font-size: .88rem; }
caption { caption-side: bottom; font-size: .85rem; color: #444; padding-top: .3rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; text-align: left; vertical-align: top; }
thead th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.marked { background: #fbdcdc; font-weight: 600; }
.summary th { background: #f7f7f7; font-weight: 600; }
.notice { border: 2px solid #b45f06; background: #fff4e5; padding: .2rem .9rem;
  margin: 0 0 1rem; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: .7rem; font-size: .82rem;
  white-space: pre-wrap; word-break: break-word; }
footer { margin-top: 2.5rem; font-size: .85rem; color: #555; border-top: 1px solid #ccc;
  padding-top: .5rem; }
@media print {
  body { margin: 0; max-width: none; font-size: 10pt; }
  nav { display: none; }
  a { color: inherit; text-decoration: none; }
  figure, table, pre { break-inside: avoid; }
  td.marked { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  h2, h3 { break-after: avoid; }
}
""".strip()


# ----------------------------------------------------------------------------- diffana report
CUT_SETS = ("start", "optimized")
"""The two cut sets of the workflow: the analysis YAML's values and the optimized ones."""

RESULT_FILES = ("workspace", "fit", "pyhf_fit", "significance", "limit", "ranking", "scan")
"""The JSON files of one cut set (``<cut set>/<name>.json``) in a workflow results folder."""


def analysis_report(
    results: str | os.PathLike[str],
    config_path: str | os.PathLike[str],
    *,
    unblind: bool = False,
) -> str:
    """The report of a workflow run (``diffana report``): HTML text built from its files.

    ``results`` is the workflow's results folder (``results/<analysis>``) with
    ``optimize/result.json``, ``cutflow.json``, per cut set (``start``, ``optimized``)
    ``workspace.json``, ``fit.json``, ``pyhf_fit.json``, ``significance.json``,
    ``limit.json``, ``ranking.json``, ``scan.json``, ``plots/`` and ``blinding.json`` as the
    workflow writes them (workflows/rules/). A section whose files are missing is left out;
    a notice at the top names what is missing, so the report also serves partial runs. A
    folder with none of these files is an :class:`~analysis.errors.InputFileError`.

    Blinding (:mod:`analysis.blinding`): unless ``unblind``, the data of the analysis' Signal
    regions are not shown (no data rows in their tables, no observed significance, p-value or
    limit), and fits, significances and limits are shown only when ``blinding.json`` says the
    workflow made them blinded (Asimov data in the signal regions); results made from the
    signal regions' data are left out. With ``unblind``, observed results are shown when the
    results were made unblinded. The notice at the top says which case holds and which regions
    are blinded.
    """
    from analysis import config as configuration

    folder = pathlib.Path(results)
    config_path = pathlib.Path(config_path)
    config = configuration.load(config_path)
    _check_results_folder(folder)
    found = _ResultFiles(folder)
    blinding = _Blinding.of(folder, config, unblind=unblind)
    optimization = found.json("optimize/result.json")
    per_set = {
        name: _CutSetResults.read(found, name) if blinding.results_shown else _CutSetResults(name)
        for name in CUT_SETS
    }

    summary: list[tuple[str, Any]] = [
        ("blinding", blinding.summary),
        ("analysis", config_path.name),
        ("measurement", config.general.measurement),
        ("parameter of interest", config.general.poi or "none"),
    ]
    for name, res in per_set.items():
        if res.significance is not None:
            summary.append(
                (
                    f"expected significance ({name} cuts)",
                    res.significance["expected"]["significance"],
                )
            )
    for name, res in per_set.items():
        if res.limit is not None:
            summary.append((f"expected 95% CLs limit ({name} cuts)", res.limit["expected"][2]))
    if optimization is not None:
        summary += [
            ("objective", optimization["objective"]),
            ("hard evaluations", optimization["hard_evaluations"]),
            ("optimization time [s]", optimization["seconds"]),
            ("device", optimization["device"]),
        ]
    candidates = [
        _results_section(per_set, blinding) if blinding.results_shown else None,
        _optimization_section(found, optimization, config),
        _cutflow_section(found, config, blinding),
        *(
            _fit_section(found, name, per_set[name], blinding) if blinding.results_shown else None
            for name in reversed(CUT_SETS)
        ),
        _templates_section(found),
        Section(
            "Software and configuration",
            text=f"The analysis configuration {config_path.name} as it was used.",
            preformatted=[
                Listing("software versions", _versions_text()),
                Listing(config_path.name, config_path.read_text()),
            ],
        ),
    ]
    sections = [section for section in candidates if section is not None]
    notice = list(blinding.notice)
    if found.missing:
        missing = ", ".join(sorted(found.missing))
        summary.append(("not available", missing))
        notice.append(
            f"Missing from {folder} (the sections that need them are left out): {missing}."
        )
    return build_report(
        title=f"diffana report: {config.general.measurement}",
        summary=summary,
        sections=sections,
        footer=f"diffana {software_versions()['diffana']}, from {folder}",
        notice=notice,
    )


def _check_results_folder(folder: pathlib.Path) -> None:
    """An :class:`InputFileError` unless ``folder`` holds at least one workflow result file."""
    names = ["optimize/result.json", "cutflow.json"]
    names += [f"{cuts}/{name}.json" for cuts in CUT_SETS for name in RESULT_FILES]
    if not any((folder / name).is_file() for name in names):
        raise InputFileError(
            f"{folder}: not a diffana results folder: none of optimize/result.json, "
            f"cutflow.json, {{{','.join(CUT_SETS)}}}/{{{','.join(RESULT_FILES)}}}.json found "
            "(expected the folder a workflow run writes, results/<analysis>)"
        )


@dataclass(frozen=True)
class _Blinding:
    """What the report may show, from the analysis' region types, the results folder's
    ``blinding.json`` and ``--unblind``.

    Attributes:
        hidden: regions whose data rows and data plots are not shown (the signal regions,
            unless the report is unblinded and the results were made unblinded).
        observed: whether observed significances, p-values and limits are shown.
        results_shown: whether significance, limits and fits are shown at all (not when a
            blinded report meets results made from the signal regions' data).
        blinded_results: whether the results were made blinded (Asimov signal-region data).
        summary: one line for the summary table.
        notice: paragraphs for the top of the report.
    """

    hidden: tuple[str, ...]
    observed: bool
    results_shown: bool
    blinded_results: bool
    summary: str
    notice: tuple[str, ...]

    @classmethod
    def of(cls, folder: pathlib.Path, config: Any, *, unblind: bool) -> _Blinding:
        import json

        from analysis.blinding import BLINDING_FILE, METHOD, signal_regions

        signal = signal_regions(config)
        control = [r.name for r in config.regions if r.name not in signal]
        path = folder / BLINDING_FILE
        try:
            record = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError as err:
            raise InputFileError(f"{path}: not valid JSON: {err}") from None
        blinded_results = isinstance(record, dict) and record.get("blinded") is True
        sr, cr = ", ".join(signal), ", ".join(control) or "none"
        again = "rerun the workflow with unblind: true and the report with --unblind"
        if not signal or (unblind and not blinded_results):
            notice = (
                "Not blinded: every region of this analysis is a Control region."
                if not signal
                else f"UNBLINDED: observed data and results are shown in every region, the "
                f"signal regions ({sr}) included."
            )
            summary = "not blinded (no Signal region)" if not signal else f"UNBLINDED ({sr})"
            return cls((), True, True, False, summary, (notice,))
        notice = (
            f"BLINDED: the data of the signal regions ({sr}) are hidden; the control regions "
            f"({cr}) show their data."
        )
        if blinded_results:
            made = (
                f"The results were made blinded ({BLINDING_FILE}): {METHOD}. Significances "
                "and limits are expected results, the fits use the control regions' data and "
                "the Asimov signal regions, and no observed significance, p-value or limit is "
                "shown."
            )
            made += (
                f" --unblind was given, but these results are blinded: {again}."
                if unblind
                else f" To unblind, {again}."
            )
        else:
            made = (
                f"{folder} holds results made from the signal regions' data (no "
                f"{BLINDING_FILE} of a blinded workflow run), so significances, limits and "
                f"fits are left out. Run the workflow with unblind: false for blinded results, "
                f"or {again}."
            )
        summary = f"BLINDED (signal regions: {sr})"
        return cls(signal, False, blinded_results, blinded_results, summary, (notice, made))


class _ResultFiles:
    """Reads the workflow's files under one folder and remembers which were missing."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.missing: set[str] = set()

    def json(self, name: str) -> Any:
        import json

        path = self.folder / name
        if not path.is_file():
            self.missing.add(name)
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise InputFileError(f"{path}: not valid JSON: {err}") from None

    def image(self, name: str, caption: str) -> Image | None:
        path = self.folder / "plots" / name
        if not path.is_file():
            self.missing.add(f"plots/{name}")
            return None
        return Image(path, caption)

    def images(self, *pairs: tuple[str, str]) -> list[Image]:
        return [image for image in (self.image(n, c) for n, c in pairs) if image is not None]


@dataclass(frozen=True)
class _CutSetResults:
    name: str
    significance: Mapping[str, Any] | None = None
    limit: Mapping[str, Any] | None = None
    fit: Mapping[str, Any] | None = None
    pyhf_fit: Mapping[str, Any] | None = None
    workspace: Mapping[str, Any] | None = None

    @classmethod
    def read(cls, found: _ResultFiles, name: str) -> _CutSetResults:
        return cls(
            name,
            *(
                found.json(f"{name}/{what}.json")
                for what in ("significance", "limit", "fit", "pyhf_fit", "workspace")
            ),
        )

    def poi(self) -> tuple[str, float, float] | None:
        if self.fit is None or self.workspace is None:
            return None
        poi = self.workspace["measurements"][0]["config"]["poi"]
        if poi not in self.fit["labels"]:
            return None
        i = self.fit["labels"].index(poi)
        return poi, self.fit["bestfit"][i], self.fit["uncertainty"][i]


def _results_section(per_set: Mapping[str, _CutSetResults], blinding: _Blinding) -> Section:
    """Significance, limits and fit per cut set; observed rows only when ``blinding`` allows."""
    rows: list[dict[str, Any]] = []

    def row(label: str, get: Any) -> None:
        values = {}
        for name, res in per_set.items():
            try:
                values[name] = get(res)
            except (TypeError, KeyError, IndexError):
                values[name] = None
        if any(v is not None for v in values.values()):
            rows.append({"quantity": label, **{f"{n} cuts": v for n, v in values.items()}})

    row("expected significance Z0", lambda r: r.significance["expected"]["significance"])
    row("expected p-value", lambda r: r.significance["expected"]["p_value"])
    if blinding.observed:
        row("observed significance Z0", lambda r: r.significance["observed"]["significance"])
        row("observed p-value", lambda r: r.significance["observed"]["p_value"])
        row("observed 95% CLs upper limit", lambda r: r.limit["observed"])
    for i, band in enumerate(("-2 sigma", "-1 sigma", "median", "+1 sigma", "+2 sigma")):
        row(f"expected limit, {band}", lambda r, i=i: r.limit["expected"][i])
    row("best-fit POI", lambda r: r.poi()[1])
    row("POI uncertainty (HESSE)", lambda r: r.poi()[2])
    row(
        "best-fit POI from pyhf (cross-check)",
        lambda r: r.pyhf_fit["mle_parameters"][r.poi()[0]][0],
    )
    row("-2 ln L at the best fit", lambda r: r.fit["twice_nll"])
    text = [
        "Asymptotic discovery significance (q0), CLs upper limits (qtilde) and the "
        "maximum-likelihood fit, at the analysis' starting cuts and at the optimized cuts. "
        "The pyhf row is an independent fit of the same workspace with pyhf."
    ]
    if blinding.blinded_results:
        text.append(
            "Blinded: the fit is to the control regions' data and the Asimov expectation in "
            f"the signal regions ({', '.join(blinding.hidden)}), so the best-fit POI is its "
            "nominal value by construction and its uncertainty is the expected one."
        )
    return Section(
        "Results before and after optimization",
        text=text,
        tables=[Table("Significance, limits and fit", rows)],
    )


def _optimization_section(found: _ResultFiles, optimization: Any, config: Any) -> Section | None:
    if optimization is None:
        return None
    points = ("initial", "final", "best")
    rows = [
        {"point": key, "relaxed": optimization[key]["relaxed"], "hard": optimization[key]["hard"]}
        for key in points
    ]
    if any("below_guard" in optimization[key] for key in points):
        for row, key in zip(rows, points, strict=True):
            row["bins below the MC guard"] = len(optimization[key].get("below_guard", []))
    figures = found.images(("optimization.png", "Optimization history"))
    figures += [
        image
        for image in (
            found.image(path.name, f"Soft (KDE) against hard histograms, {path.stem[13:]}")
            for path in sorted((found.folder / "plots").glob("soft_vs_hard_*.png"))
        )
        if image is not None
    ]
    text = [
        f"Objective {optimization['objective']}: relaxed (soft cuts, KDE histograms) and hard "
        "(boolean cuts, ordinary histograms, full fit) values at the starting point, the "
        f"last step and the best point by the hard metric; {optimization['hard_evaluations']}"
        f" hard evaluations in {optimization['seconds']:.1f} s on {optimization['device']}."
    ]
    tables = [Table("Relaxed and hard objective", rows)]
    mc_text, mc_tables, mc_figures = _mc_statistics_parts(optimization, config)
    return Section(
        "Optimization",
        text=text + mc_text,
        tables=tables + mc_tables,
        figures=figures + mc_figures,
    )


MC_POINTS = ("initial", "best")
"""The points of ``result.json`` whose effective MC events the report shows."""


def _mc_statistics_parts(
    optimization: Mapping[str, Any], config: Any
) -> tuple[list[str], list[Table], list[Image]]:
    """Paragraphs, tables (one per region: n_eff per bin of each background sample and of
    their sum, at the initial and the best cuts; total-background cells below the guard
    :class:`Marked`) and the figure of ``result.json``'s ``mc_statistics`` block; one
    paragraph saying it is missing for result files written before it existed."""
    from analysis.mc_statistics import describe
    from analysis.plotting.mc_statistics import TOTAL, TOTAL_LABEL, effective_events_per_bin

    block = optimization.get("mc_statistics")
    if not block:
        return (
            [
                "Effective MC events per bin: not available (this result.json has no "
                "mc_statistics record; it was written by an older diffana)."
            ],
            [],
            [],
        )
    minimum = float(block["min_effective_events"])
    tables = {point: block["effective_events"][point] for point in MC_POINTS}
    guard = (
        f"The guard (Optimization.MinEffectiveEvents = {minimum:g}) requires n_eff >= "
        f"{minimum:g} for the total background in every bin; total-background cells below it "
        "are marked * and shaded."
        if minimum > 0
        else "The guard is off (Optimization.MinEffectiveEvents = 0)."
    )
    text = [
        "Effective number of background MC events per bin, n_eff = (sum w)^2 / sum w^2, of "
        "each background sample (the prediction samples the POI does not scale) and of their "
        f"sum (total background), at the initial and the best cuts (hard histograms). {guard}"
    ]
    initial, best = optimization["initial"], optimization["best"]
    if best.get("below_guard") and best["cuts"] == initial["cuts"]:
        text.append(
            "Below the guard at the initial cuts, which are reported as the best because no "
            f"evaluated point keeps the guard: {describe(best['below_guard'])}."
        )
    else:
        for point in MC_POINTS:
            bins = optimization[point].get("below_guard", [])
            if bins:
                text.append(f"Below the guard at the {point} cuts: {describe(bins)}.")
    regions = {region.name: region for region in config.regions}
    out_tables = []
    for region, rows in tables["initial"].items():
        binning = regions[region].binning if region in regions else None
        n_bins = len(rows[TOTAL])
        entries = []
        for b in range(n_bins):
            row: dict[str, Any] = {"bin": b}
            if binning is not None and len(binning) == n_bins + 1:
                row["range"] = f"[{binning[b]:g}, {binning[b + 1]:g})"
            for column in rows:
                name = TOTAL_LABEL if column == TOTAL else column
                for point in MC_POINTS:
                    value = tables[point][region][column][b]
                    marked = column == TOTAL and minimum > 0 and value < minimum
                    row[f"{name}, {point}"] = Marked(value) if marked else value
            entries.append(row)
        caption = (
            f"* total background below the guard of {minimum:g} effective events"
            if minimum > 0
            else None
        )
        out_tables.append(Table(f"Effective MC events, {region}", entries, caption=caption))
    figure = effective_events_per_bin(
        tables,
        minimum=minimum,
        config=config,  # edges, axis titles with units, experiment label
    )
    caption = (
        "Effective background MC events per bin at the initial (dashed) and the best (solid) "
        "cuts, per background sample (colours) and for their sum (black)"
        + (f"; dotted green: the guard, {minimum:g}" if minimum > 0 else "")
    )
    return text, out_tables, [Image(figure, caption)]


def _cutflow_section(found: _ResultFiles, config: Any, blinding: _Blinding) -> Section | None:
    """Cut values and cut flows; the data column of the hidden regions is removed, and their
    cut-flow figure left out if it was drawn with data."""
    from analysis.blinding import blind_cut_flows
    from analysis.cutflow import CutFlow, cut_flow_table

    payload = found.json("cutflow.json")
    if payload is None:
        return None
    drawn_with_data = {
        region for region, flow in payload["start"].items() if flow.get("data") is not None
    }
    payload = blind_cut_flows(payload, blinding.hidden)
    tables = []
    if "cuts" in payload:
        tables.append(Table("Cut values: starting against optimized", payload["cuts"]))
    figures = []
    for region, flow in payload["start"].items():
        start = CutFlow.from_dict(flow)
        optimized = payload.get("optimized", {}).get(region)
        optimized = None if optimized is None else CutFlow.from_dict(optimized)
        tables.append(Table(f"Cut flow, {region}", cut_flow_table(start, optimized)))
        if region in blinding.hidden and region in drawn_with_data:
            continue  # a figure drawn with the region's data
        image = found.image(f"cutflow_{region}.png", f"Cut flow, {region}")
        figures += [image] if image is not None else []
    return Section(
        "Cuts and cut flow",
        text=(
            "Weighted yields (with their statistical uncertainty) after each hard cut, applied "
            "in the order of the configuration; the last row keeps only events inside the "
            "histogram range, which is what the likelihood sees."
        ),
        tables=tables,
        figures=figures,
    )


def _fit_section(
    found: _ResultFiles, name: str, res: _CutSetResults, blinding: _Blinding
) -> Section | None:
    figures = found.images(
        *(
            (f"{name}/{stage}_{region}.png", f"{stage.replace('fit', '-fit')} {region}")
            for stage in ("prefit", "postfit")
            for region in _regions(res)
        ),
        (f"{name}/pulls.png", "Nuisance-parameter pulls"),
        (f"{name}/correlation.png", "Correlation matrix"),
        (f"{name}/ranking.png", "Impact of the nuisance parameters on the POI"),
        (f"{name}/scan.png", "Profile-likelihood scan of the POI"),
        (
            f"{name}/cls.png",
            "Expected CLs against the POI (Brazil plot; blinded: no observed curve)"
            if blinding.blinded_results
            else "CLs against the POI (Brazil plot)",
        ),
    )
    tables = _yield_tables(res, blinding.hidden)
    if not figures and not tables:
        return None
    text = [
        "Pre-fit and post-fit distributions with the total uncertainty band (linear error "
        "propagation with the fit's correlations, as cabinetry), yields, pulls, correlations, "
        "impacts, the POI scan and CLs."
    ]
    if blinding.hidden:
        text.append(
            f"Blinded: no data in the signal regions ({', '.join(blinding.hidden)}); the "
            "post-fit pictures show the fit to the control regions' data and the Asimov "
            "signal regions, and the scan is an expected one. The CLs figure (Brazil plot) is "
            "not drawn while blinded, since its observed curve would be that of the blinded "
            "data; the expected limit and its bands are in the results table."
        )
    return Section(
        f"Fit at the {name} cuts",
        text=text,
        tables=tables,
        figures=figures,
    )


def _templates_section(found: _ResultFiles) -> Section | None:
    """Systematic templates at the optimized cuts (``plots/optimized/templates/``)."""
    paths = sorted((found.folder / "plots" / "optimized" / "templates").glob("templates_*.png"))
    names = [path.name for path in paths]
    images = [found.image(f"optimized/templates/{n}", n[len("templates_") : -4]) for n in names]
    figures = [figure for figure in images if figure is not None]
    if not figures:
        return None
    return Section(
        "Systematic variations at the optimized cuts",
        text=(
            "Each sample's nominal template (with its statistical uncertainty) against its up "
            "and down variations as read, before the split into normalisation and shape; a "
            "symmetrized side is the mirror of the other. Labels give the change of the total "
            "yield."
        ),
        figures=figures,
    )


def _regions(res: _CutSetResults) -> list[str]:
    if res.workspace is None:
        return []
    return [channel["name"] for channel in res.workspace["channels"]]


def _yield_tables(res: _CutSetResults, hidden: Sequence[str] = ()) -> list[Table]:
    """Pre- and post-fit yield tables; no data row for the ``hidden`` regions."""
    if res.workspace is None:
        return []
    from analysis.fit import FitResult
    from analysis.likelihood import Workspace
    from analysis.prediction import prediction, yield_table

    workspace = Workspace.load(res.workspace)
    model = workspace.model()
    data = workspace.data(model, include_auxdata=False)

    def rows(pred: Any) -> list[dict[str, Any]]:
        return [
            row
            for row in yield_table(pred, data)
            if not (row["sample"] == "data" and row["channel"] in hidden)
        ]

    tables = [Table("Pre-fit yields", rows(prediction(model)))]
    if res.fit is not None:
        tables.append(
            Table("Post-fit yields", rows(prediction(model, FitResult.from_dict(res.fit))))
        )
    return tables


def _versions_text() -> str:
    versions = software_versions()
    width = max(map(len, versions))
    return "\n".join(f"{name:<{width}}  {version}" for name, version in versions.items())
