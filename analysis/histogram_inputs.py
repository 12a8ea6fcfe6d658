"""Histogram inputs: the templates of an analysis read as TH1s from ROOT files (cabinetry's
"collect" mode) instead of filled from ntuples.

**When.** A configuration reads histograms when no sample has a ``Tree``
(``General.input_type == "histogram"``; cabinetry's ``configuration._input_is_ntuple``, see
:func:`analysis.config._check_input_type` for the keys each mode needs and refuses). Regions
then need no ``Variable`` or ``Binning``, samples no ``Tree``.

**Where.** The histogram of a region, sample and template (nominal, or one side of a
``NormPlusShape`` systematic) is at the path formed as cabinetry's
``templates.collector._histo_path`` forms it: in ``General.InputPath``

- ``{RegionPath}`` becomes the region's ``RegionPath`` (a systematic side's ``RegionPath``
  overrides it, as for ntuples here; cabinetry's collector has no such override);
- ``{SamplePath}`` becomes the sample's ``SamplePath``, or the systematic side's ``SamplePath``;
- ``{VariationPath}`` becomes the systematic side's ``VariationPath``, else
  ``General.VariationPath``, which defaults to ``""`` (cabinetry's ``templates.collect``). So the
  nominal histograms, and the templates of a side that overrides only ``SamplePath``, use
  ``General.VariationPath``.

The result is ``file.root:path/in/file``, split at the colon after the file name as uproot does
(``uproot._util.file_object_path_split``: the file is the longest prefix ending in ``.root``
before a colon; the object path loses leading, trailing and doubled ``/``). Relative file paths
are taken from the working directory, as in cabinetry.

**Which.** Exactly the histograms :meth:`analysis.config.Config.templates` lists (cabinetry's
``configuration.histogram_is_needed``): the data and every prediction sample's nominal in each
region it is in (``Samples[].Regions``), and each side of a ``NormPlusShape`` systematic acting on
it, except a ``Symmetrize`` side, which :func:`analysis.workspace.build_spec` derives from the
other side after the normalisation split (``2 n - v / k``, factor ``2 - k``; cabinetry's
symmetrisation). ``Normalization`` systematics need no histogram.

**What.** For a one-dimensional histogram (any ``TH1``, not a ``TH2``/``TH3``/``TProfile``) with
bins ``b = 1 .. B``: ``yields = values()``, ``sumw2 = variances()`` and ``edges`` the axis edges,
underflow and overflow left out, as cabinetry reads them (``uproot ... .to_boost()``, then
``values()`` and ``variances()`` without flow; cabinetry's ``histo.Histogram`` keeps
``stdev = sqrt(variances)``, the workspace's staterror). ``variances()`` is ``fSumw2`` when the
histogram stores it (``TH1::Sumw2``), else the yields themselves (unweighted Poisson counts), as
in uproot and ROOT. The records are the :class:`~analysis.histograms.Histogram` the ntuple path
makes (float64), keyed ``(region, sample, variation)`` as
:func:`analysis.histograms.hard_histograms` returns them, so the workspace, fits, limits and
plots take them unchanged.

**Checks** (one-line errors naming the file and the object path): a missing file
(:class:`~analysis.errors.InputFileError`), a file that is not ROOT
(:class:`~analysis.errors.DataError`), a missing object or one that is not a 1-D histogram
(:class:`~analysis.errors.MissingObjectError`), non-finite bin contents
(:class:`~analysis.errors.DataError`), and bin edges that differ between the histograms of one
region or from the region's ``Binning`` where one is given
(:class:`~analysis.errors.ConfigError`): a channel has one binning.

Histogram inputs have no events, so the cut optimization, the cut scan and the cut flow, which
select events, refuse them (:func:`require_events`).
"""

from __future__ import annotations

import difflib
import logging
import pathlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import uproot

from analysis.config import Config, Template, TemplateOverrides
from analysis.errors import ConfigError, DataError, InputFileError, MissingObjectError
from analysis.histograms import Histogram
from analysis.io import TemplateKey, template_key

log = logging.getLogger(__name__)

__all__ = [
    "HistogramLocation",
    "histogram_locations",
    "histogram_path",
    "read_histograms",
    "region_edges",
    "require_events",
]

_OBJECT_IN_PATH = re.compile(r"(.+\.root(\.[0-9]+)?):(.*$)")
"""uproot's split of ``file.root:object`` (``uproot._util._object_in_path_regex``)."""


@dataclass(frozen=True)
class HistogramLocation:
    """Where one histogram is: ``file`` and the ``object_path`` inside it."""

    file: pathlib.Path
    object_path: str

    def __str__(self) -> str:
        return f"{self.file}:{self.object_path}"


def histogram_path(config: Config, template: Template) -> str:
    """The path string of ``template``'s histogram (module docstring, "Where"): ``InputPath``
    with ``{RegionPath}``, ``{SamplePath}`` and ``{VariationPath}`` replaced, as cabinetry's
    ``_histo_path``. The configuration's validation guarantees a value for every placeholder
    that ``InputPath`` uses."""
    over = _overrides(config, template)
    region_path = template.region.region_path if over.region_path is None else over.region_path
    sample_paths = template.sample.sample_paths if over.sample_paths is None else over.sample_paths
    variation_path = (
        config.general.variation_path if over.variation_path is None else over.variation_path
    )
    path = config.general.input_path
    if region_path is not None:
        path = path.replace("{RegionPath}", region_path)
    if sample_paths:
        path = path.replace("{SamplePath}", sample_paths[0])
    return path.replace("{VariationPath}", variation_path)


def histogram_locations(config: Config) -> Iterator[tuple[TemplateKey, HistogramLocation]]:
    """``(key, location)`` of every histogram the workspace needs, in
    :meth:`~analysis.config.Config.templates` order. Raises ConfigError for a path without
    ``file.root:`` in front of the object path."""
    _require_histogram_inputs(config)
    for template in config.templates():
        path = histogram_path(config, template)
        match = _OBJECT_IN_PATH.match(path.strip())
        object_path = "" if match is None else re.sub(r"/+", "/", match.group(3).strip("/ "))
        if match is None or not object_path:
            raise ConfigError(
                f"{config.source}: {template.label}: histogram path '{path}' (from "
                f"General.InputPath '{config.general.input_path}') does not name a histogram; "
                "expected 'file.root:path/in/file'"
            )
        yield template_key(template), HistogramLocation(pathlib.Path(match.group(1)), object_path)


def read_histograms(
    config: Config, *, device: torch.device | str = "cpu"
) -> dict[TemplateKey, Histogram]:
    """Every histogram of a histogram-input ``config`` (module docstring), read with uproot.

    Returns ``{(region, sample, variation): Histogram}`` in float64 on ``device``, the record
    :func:`analysis.histograms.hard_histograms` returns for ntuples. Each file is opened once.
    """
    files: dict[pathlib.Path, Any] = {}
    read: dict[TemplateKey, tuple[HistogramLocation, np.ndarray, np.ndarray, np.ndarray]] = {}
    try:
        for key, location in histogram_locations(config):
            if location.file not in files:
                files[location.file] = _open(location, key)
            read[key] = (location, *_read_th1(files[location.file], location, key))
    finally:
        for file in files.values():
            file.close()
    _check_binning(config, read)
    out = {}
    for key, (_, edges, values, variances) in read.items():
        out[key] = Histogram(
            edges=torch.as_tensor(edges, dtype=torch.float64, device=device),
            yields=torch.as_tensor(values, dtype=torch.float64, device=device),
            sumw2=torch.as_tensor(variances, dtype=torch.float64, device=device),
        )
    log.info("read %d histograms from %d file(s)", len(out), len(files))
    return out


def region_edges(config: Config) -> dict[str, tuple[float, ...]]:
    """Bin edges per region, for axes of plots: the region's ``Binning`` where it has one (always
    with ntuple inputs), else the edges of the region's first histogram in the files (histogram
    inputs without ``Binning``; one histogram read per such region, no consistency check:
    :func:`read_histograms` does that)."""
    out = {region.name: region.binning for region in config.regions if region.binning}
    missing = {region.name for region in config.regions} - set(out)
    if not missing:
        return out
    files: dict[pathlib.Path, Any] = {}
    try:
        for key, location in histogram_locations(config):
            if key[0] in missing and key[0] not in out:
                if location.file not in files:
                    files[location.file] = _open(location, key)
                edges = _read_th1(files[location.file], location, key)[0]
                out[key[0]] = tuple(float(e) for e in edges)
    finally:
        for file in files.values():
            file.close()
    return {region.name: out[region.name] for region in config.regions}


def require_events(config: Config, task: str) -> None:
    """Raise ConfigError when ``config`` reads histograms: ``task`` (e.g. "cut optimization")
    selects events, and histogram inputs have none."""
    if config.general.input_type == "histogram":
        raise ConfigError(
            f"{config.source}: {task} needs events (ntuple inputs: a Tree in every sample), "
            "but this analysis reads histograms (no sample has a Tree); use diffana "
            "workspace, fit, limit or significance on it"
        )


# ----------------------------------------------------------------------------- helpers
def _require_histogram_inputs(config: Config) -> None:
    if config.general.input_type != "histogram":
        raise ConfigError(
            f"{config.source}: the samples have Trees, so this analysis reads ntuples "
            "(analysis.io.read_events); histogram inputs have no Tree in any sample"
        )


def _overrides(config: Config, template: Template) -> TemplateOverrides:
    """The systematic side ``template.variation`` names (``<Systematic>_Up`` / ``_Down``), or no
    overrides for the nominal."""
    for syst in config.systematics:
        for side in ("Up", "Down"):
            if template.variation == f"{syst.name}_{side}":
                return syst.side(side)
    return TemplateOverrides()


def _describe(key: TemplateKey) -> str:
    region, sample, variation = key
    return f"sample '{sample}' in region '{region}' ({variation})"


def _open(location: HistogramLocation, key: TemplateKey) -> Any:
    if not location.file.is_file():
        raise InputFileError(
            f"{location.file}: file not found (histogram '{location.object_path}' of "
            f"{_describe(key)})"
        )
    try:
        return uproot.open(location.file)
    except Exception as err:
        raise DataError(
            f"{location.file}: cannot be opened as a ROOT file; it is truncated or corrupt "
            f"({type(err).__name__})"
        ) from None


def _read_th1(
    file: Any, location: HistogramLocation, key: TemplateKey
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(edges, values, variances)`` of the 1-D histogram at ``location``, flow bins left out."""
    try:
        obj = file[location.object_path]
    except Exception:  # uproot raises KeyInFileError, or others for a path through a non-folder
        names = sorted(file.keys(cycle=False))
        close = difflib.get_close_matches(location.object_path, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise MissingObjectError(
            f"{location.file}: no histogram '{location.object_path}' ({_describe(key)}){hint}"
        ) from None
    if isinstance(obj, uproot.ReadOnlyDirectory):
        inside = ", ".join(sorted(obj.keys(recursive=False, cycle=False))) or "nothing"
        raise MissingObjectError(
            f"{location.file}: '{location.object_path}' ({_describe(key)}) is a folder (holding "
            f"{inside}); expected a histogram: check the VariationPath"
        )
    classname = getattr(obj, "classname", type(obj).__name__)
    if not classname.startswith("TH1"):
        raise MissingObjectError(
            f"{location.file}: '{location.object_path}' ({_describe(key)}) is a {classname}; "
            "expected a one-dimensional histogram (TH1)"
        )
    values = np.asarray(obj.values(flow=False), dtype=np.float64)
    variances = np.asarray(obj.variances(flow=False), dtype=np.float64)
    edges = np.asarray(obj.axis().edges(flow=False), dtype=np.float64)
    if not (np.isfinite(values).all() and np.isfinite(variances).all()):
        raise DataError(
            f"{location.file}: histogram '{location.object_path}' ({_describe(key)}) has "
            "NaN or infinite bin contents; expected finite yields and variances"
        )
    return edges, values, variances


def _check_binning(
    config: Config,
    read: dict[TemplateKey, tuple[HistogramLocation, np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """All histograms of a region share its edges, and those equal ``Binning`` if given."""
    regions = {region.name: region for region in config.regions}
    first: dict[str, tuple[HistogramLocation, np.ndarray]] = {}
    for key, (location, edges, _, _) in read.items():
        name = key[0]
        binning = regions[name].binning
        if binning and not _same_edges(edges, np.asarray(binning)):
            raise ConfigError(
                f"{config.source}: region '{name}': histogram {location} has bin edges "
                f"{_edges_text(edges)}, but the region's Binning is {_edges_text(binning)}; "
                "expected equal edges"
            )
        if name not in first:
            first[name] = (location, edges)
            continue
        reference, reference_edges = first[name]
        if not _same_edges(edges, reference_edges):
            raise ConfigError(
                f"{config.source}: region '{name}': histogram {location} has bin edges "
                f"{_edges_text(edges)}, but {reference} has {_edges_text(reference_edges)}; "
                "expected all histograms of a region to share their bin edges"
            )


def _same_edges(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal number of edges, each equal up to ``1e-7`` of the largest ``|edge|`` (float32
    rounding: ROOT stores axis edges as doubles, but edges that went through a float, or a
    uniform axis's ``xmin + i * width``, differ in the last digits)."""
    if a.shape != b.shape:
        return False
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
    return bool(np.all(np.abs(a - b) <= 1e-7 * scale))


def _edges_text(edges: Any) -> str:
    return "[" + ", ".join(f"{float(e):g}" for e in edges) + "]"
