"""What figures say about their axes and their data: axis titles with units, the bin width in
the y-axis title, Poisson (Garwood) intervals for counts, and the experiment label.

Axis titles come from the analysis configuration (:func:`variable_label`): a region's
``Variable`` that is a Definition is titled by the Definition's ``Label``, else by its
``Description`` (without a trailing ``[unit]``), and gets the unit in square brackets
(``"invariant mass of the two leading muons [GeV]"``); a raw branch or an expression is titled
by its text, without a unit. The y axis of a histogram says what one bin holds
(:func:`events_label`): ``"Events / 3 GeV"`` for bins of one width, ``"Events / bin"`` for
bins of different widths (their yields are counts per bin, not densities).

Data are drawn with the central (Garwood) 68.27% confidence interval of a Poisson mean
(:func:`poisson_interval`), which is asymmetric and has a finite upper edge (1.84) at zero
counts, as the CMS and ATLAS statistics committees recommend for event counts.

The experiment label (:class:`ExperimentLabel`) is mplhep's ``exp_label``: experiment name in
bold and a text after it at the top left above the axes, luminosity and centre-of-mass energy
at the top right (``"140 fb$^{-1}$ (13 TeV)"``), from the configuration's ``General``
(``Experiment``, ``Label``, ``Luminosity``, ``Energy``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mplhep
import numpy as np
from matplotlib.axes import Axes
from scipy.stats import chi2

if TYPE_CHECKING:
    from analysis.config import Config, Definition

#: the probability content of the +-1 sigma interval of a normal distribution
ONE_SIGMA = math.erf(1.0 / math.sqrt(2.0))  # 0.682689...

_TRAILING_UNIT = re.compile(r"^(?P<text>.*?)\s*\[(?P<unit>[^\[\]]+)\]\s*$", re.DOTALL)


def poisson_interval(counts: Any, cl: float = ONE_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    r"""The central (Garwood) confidence interval ``(low, high)`` of a Poisson mean given the
    observed ``counts``.

    Math (F. Garwood, Biometrika 28 (1936) 437; the PDG's "Statistics" review, eq. 40.76):
    with ``alpha = 1 - cl``,

    .. math::
        \mathrm{low} = \tfrac12 F^{-1}_{\chi^2_{2n}}(\alpha/2), \qquad
        \mathrm{high} = \tfrac12 F^{-1}_{\chi^2_{2(n+1)}}(1 - \alpha/2),

    and ``low = 0`` for ``n = 0``, where ``high = -ln(alpha/2) = 1.841`` for ``cl = 68.27%``.
    Non-integer ``n`` (Asimov data) use the same formula with real degrees of freedom (the
    gamma-function continuation). Negative counts are treated as 0.

    Returns:
        ``(low, high)`` float64 arrays of the shape of ``counts``; the error bars are
        ``n - low`` and ``high - n``.
    """
    n = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    alpha = 1.0 - cl
    low = np.where(n > 0, 0.5 * chi2.ppf(alpha / 2, 2 * np.where(n > 0, n, 1.0)), 0.0)
    high = 0.5 * chi2.ppf(1 - alpha / 2, 2 * (n + 1))
    return low, high


def poisson_errors(counts: Any, cl: float = ONE_SIGMA) -> np.ndarray:
    """The asymmetric error bars ``[[n - low], [high - n]]`` of :func:`poisson_interval`, in
    the ``(2, N)`` form matplotlib's ``errorbar(yerr=...)`` takes."""
    n = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    low, high = poisson_interval(n, cl)
    return np.stack([n - low, high - n])


def format_number(value: float) -> str:
    """A bin width as a physicist writes it: ``3``, ``2.5``, ``0.05``, ``100``, ``1e-05``
    (four significant digits at most, float noise such as ``0.30000000000000004`` removed)."""
    return f"{value:.4g}"


def uniform_width(edges: Any, rtol: float = 1e-6) -> float | None:
    """The common width of the bins, or ``None`` when the widths differ (by more than
    ``rtol`` relative to the largest)."""
    widths = np.diff(np.asarray(edges, dtype=np.float64))
    if widths.size == 0:
        return None
    if np.max(widths) - np.min(widths) > rtol * np.max(np.abs(widths)):
        return None
    return float(np.mean(widths))


def events_label(edges: Any = None, unit: str | None = None, what: str = "Events") -> str:
    """The y-axis title of a histogram of counts: ``"Events / 3 GeV"`` (bins of one width,
    with the observable's ``unit``), ``"Events / 0.05"`` (no unit), ``"Events / bin"`` for
    bins of different widths or without ``edges`` (numbered bins)."""
    width = None if edges is None else uniform_width(edges)
    if width is None:
        return f"{what} / bin"
    return f"{what} / {format_number(width)}{f' {unit}' if unit else ''}"


def split_unit(description: str) -> tuple[str, str | None]:
    """``"invariant mass [GeV]"`` -> ``("invariant mass", "GeV")``, ``"[GeV]"`` ->
    ``("", "GeV")``; a description without a trailing ``[...]`` -> ``(description, None)``."""
    match = _TRAILING_UNIT.match(description)
    if match is None:
        return description.strip(), None
    return match.group("text").strip(), match.group("unit").strip()


def definition_label(definition: Definition) -> tuple[str, str | None]:
    """``(title, unit)`` of a Definition: the title is its ``label``, else its
    ``description`` without a trailing ``[unit]``, else its name; the unit is its ``unit``,
    else the one in square brackets ending the description, else ``None``."""
    text, unit = split_unit(definition.description) if definition.description else (None, None)
    unit = definition.unit or unit
    title = definition.label or text or definition.name
    return title, unit


def find_definition(config: Config, name: str) -> Definition | None:
    """The Definition called ``name``: the global one, else the first sample's own (per-sample
    Definitions of one name describe the same quantity, read from other branches)."""
    for definition in config.definitions:
        if definition.name == name:
            return definition
    for sample in config.samples:
        for definition in getattr(sample, "definitions", ()):
            if definition.name == name:
                return definition
    return None


def variable_label(config: Config | None, variable: str) -> tuple[str, str | None]:
    """``(title, unit)`` of an observable or cut variable (an expression): the Definition's
    (:func:`definition_label`) when ``variable`` names one, else ``(variable, None)`` (a raw
    branch or an expression has no unit)."""
    variable = variable.strip()
    definition = None if config is None else find_definition(config, variable)
    if definition is None:
        return variable, None
    return definition_label(definition)


def axis_title(title: str, unit: str | None) -> str:
    """``"title [unit]"``, or ``title`` without a unit."""
    return f"{title} [{unit}]" if unit else title


def region_axes(config: Config | None, channel: str) -> tuple[Any, str | None, str | None]:
    """``(edges, x-axis title, unit)`` of the region ``channel`` of ``config``: its Binning
    (``None`` when it has none, e.g. histogram inputs), the title of its Variable with the
    unit (:func:`variable_label`) and the unit; all ``None`` when the
    configuration has no such region."""
    region = (
        None if config is None else next((r for r in config.regions if r.name == channel), None)
    )
    if region is None:
        return None, None, None
    edges = list(region.binning) or None
    if not region.variable:
        return edges, None, None
    title, unit = variable_label(config, region.variable)
    return edges, axis_title(title, unit), unit


@dataclass(frozen=True)
class ExperimentLabel:
    """The experiment label of figures (mplhep's ``exp_label``), from ``General``.

    ``experiment`` in bold and ``text`` after it at the top left, above the axes;
    ``luminosity`` (fb^-1) and ``energy`` (TeV) as ``"140 fb$^{-1}$ (13 TeV)"`` at the top
    right. Every part is optional; with none, nothing is drawn.
    """

    experiment: str | None = None
    text: str | None = None
    luminosity: float | None = None
    energy: float | None = None

    @classmethod
    def from_config(cls, config: Config | None) -> ExperimentLabel | None:
        """The label of ``config``'s ``General`` block, ``None`` when it sets none of
        ``Experiment``, ``Label``, ``Luminosity``, ``Energy``."""
        if config is None:
            return None
        general = config.general
        label = cls(general.experiment, general.label, general.luminosity, general.energy)
        return label if label.drawn else None

    @property
    def drawn(self) -> bool:
        return any(
            v is not None for v in (self.experiment, self.text, self.luminosity, self.energy)
        )

    @property
    def right(self) -> str:
        """The top-right text: ``"140 fb$^{-1}$ (13 TeV)"``, ``"140 fb$^{-1}$"``,
        ``"13 TeV"`` or ``""``."""
        lumi = None if self.luminosity is None else f"{format_number(self.luminosity)} fb$^{{-1}}$"
        energy = None if self.energy is None else f"{format_number(self.energy)} TeV"
        if lumi and energy:
            return f"{lumi} ({energy})"
        return lumi or energy or ""

    def draw(self, ax: Axes) -> None:
        """Draw the label above ``ax`` (mplhep's ``exp_label``, ``loc=0``)."""
        if not self.drawn:
            return
        mplhep.label.exp_label(
            exp=self.experiment or "",
            llabel=self.text or "",
            rlabel=self.right,
            loc=0,
            ax=ax,
        )


def draw_experiment_label(ax: Axes, label: ExperimentLabel | None) -> None:
    """:meth:`ExperimentLabel.draw` when there is a label."""
    if label is not None:
        label.draw(ax)
