"""Shared look of every figure: mplhep's ROOT style, applied locally, and small helpers.

The style is applied with :func:`matplotlib.rc_context` around the construction of each figure
(:func:`styled`), never globally (no ``mplhep.style.use``): importing or calling this package
leaves the caller's rcParams alone. Figures are :class:`matplotlib.figure.Figure` objects made
without pyplot, so no global figure state is kept and nothing needs closing; they render with
the Agg canvas and show inline in notebooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, cast

import matplotlib
import mplhep
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import AutoMinorLocator, NullLocator

P = ParamSpec("P")

#: settings matplotlib reads at draw time rather than when an artist is made: a figure drawn
#: after the ``rc_context`` has closed (in a notebook, by :func:`save_figure`) would mix them
#: with the caller's settings (e.g. mathtext in a "custom" fontset whose fonts are then
#: undefined), so they are left out and the figures use matplotlib's default fonts
_DRAW_TIME = ("font.", "mathtext.", "axes.unicode_minus", "savefig.")

#: mplhep's ROOT style (ticks inside on all four sides, minor ticks, no legend frame, its
#: colour cycle), scaled to figures of about 7 inches
STYLE: dict[str, Any] = {
    **{k: v for k, v in mplhep.style.ROOT.items() if not k.startswith(_DRAW_TIME)},
    "font.size": 15,
    "xtick.major.size": 8,
    "xtick.minor.size": 4,
    "ytick.major.size": 8,
    "ytick.minor.size": 4,
    "axes.linewidth": 1.2,
    "figure.figsize": (7.0, 6.0),
}

#: the style's colour cycle; colours are given to line artists as values, since a "C0"
#: string is resolved when the line is drawn, against the caller's colour cycle
PALETTE: tuple[str, ...] = tuple(entry["color"] for entry in STYLE["axes.prop_cycle"])

#: colours of the +-1 sigma and +-2 sigma bands (pulls, Brazil plots)
ONE_SIGMA_COLOR = "#00cc00"
TWO_SIGMA_COLOR = "#ffdd00"
DATA_COLOR = "black"
BAND_HATCH = "////"


def styled(function: Callable[P, Figure]) -> Callable[P, Figure]:
    """Build the figure under :data:`STYLE`, then fix its ticks (see :func:`finalize`)."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with matplotlib.rc_context(cast(Any, STYLE)):
            figure = function(*args, **kwargs)
            finalize(figure)
        return figure

    return wrapper


def color(index: int) -> str:
    """The ``index``-th colour of :data:`PALETTE` (cyclic)."""
    return PALETTE[index % len(PALETTE)]


def sample_colours(samples: Iterable[str]) -> dict[str, str]:
    """Sample name -> its colour in every figure: :func:`color` of its position among the
    names sorted, the order of the likelihood model's samples (pyhf's), which the
    distributions colour by."""
    return {name: color(i) for i, name in enumerate(sorted(set(samples)))}


def new_figure(figsize: tuple[float, float] | None = None) -> Figure:
    """An empty figure with the constrained layout engine (no pyplot)."""
    return Figure(figsize=figsize, layout="constrained")


def ratio_figure(figsize: tuple[float, float] = (7.0, 7.0)) -> tuple[Figure, Axes, Axes]:
    """A figure with a main panel over a ratio panel a third its height, sharing x (no gap):
    ``(figure, ax, ratio_ax)``."""
    figure = new_figure(figsize)
    ax, ratio_ax = figure.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.0}
    )
    return figure, ax, ratio_ax


def finalize(figure: Figure) -> None:
    """Create every axis's ticks while the style is active.

    matplotlib creates tick objects lazily, at draw time, from the rcParams current then; later
    ticks copy the first one's properties. Creating the first ticks here, inside the style's
    ``rc_context``, makes the saved figure use the style's tick sizes and fonts.
    """
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            axis.get_major_ticks()
            if not isinstance(axis.get_minor_locator(), NullLocator):
                axis.get_minor_ticks()


def minor_ticks(ax: Axes, x: bool = True, y: bool = True) -> None:
    """Automatic minor ticks on the linear axes of ``ax``."""
    if x and ax.get_xscale() == "linear":
        ax.xaxis.set_minor_locator(AutoMinorLocator())
    if y and ax.get_yscale() == "linear":
        ax.yaxis.set_minor_locator(AutoMinorLocator())


def corner_text(ax: Axes, text: str, *, loc: str = "upper left") -> None:
    """Plain text in a corner of ``ax`` (region name, pre-/post-fit label, ...)."""
    x, ha = (0.04, "left") if "left" in loc else (0.96, "right")
    y, va = (0.95, "top") if "upper" in loc else (0.05, "bottom")
    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va)


def display_name(key: Any) -> str:
    """A readable name for a template key ``(region, sample, variation)`` or any label."""
    if isinstance(key, tuple):
        return " / ".join(str(part) for part in key)
    return str(key)
