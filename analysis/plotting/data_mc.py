"""Pre- and post-fit distributions: stacked samples, data and the model uncertainty band.

cabinetry's ``visualize.data_mc`` (``plot_model.data_mc``) for a
:class:`analysis.prediction.ModelPrediction`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import mplhep
import numpy as np
from matplotlib.figure import Figure

from analysis.plotting._results import array
from analysis.plotting.style import (
    BAND_HATCH,
    DATA_COLOR,
    color,
    corner_text,
    minor_ticks,
    ratio_figure,
    styled,
)
from analysis.prediction import ModelPrediction, data_per_channel

#: legend labels of the drawn artists (also how tests and users find them)
BAND_LABEL = "Uncertainty"
DATA_LABEL = "Data"


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full_like(numerator, np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _band(ax: Any, edges: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
    """The hatched total-uncertainty band between ``low`` and ``high`` per bin."""
    ax.stairs(
        high,
        edges,
        baseline=low,
        fill=True,
        facecolor="none",
        edgecolor="0.3",
        hatch=BAND_HATCH,
        linewidth=0,
        label=BAND_LABEL,
    )


def _channel_edges(edges: Any, channel: str, nbins: int) -> np.ndarray:
    if isinstance(edges, Mapping):
        edges = edges.get(channel)
    if edges is None:
        return np.arange(nbins + 1, dtype=np.float64)
    values = array(edges).reshape(-1)
    if values.shape[0] != nbins + 1:
        raise ValueError(
            f"channel '{channel}' has {nbins} bins but {values.shape[0]} bin edges were given"
        )
    return values


@styled
def distribution(
    prediction: ModelPrediction,
    channel: str,
    data: Any = None,
    *,
    edges: Any = None,
    observable: str | None = None,
    log_y: bool = False,
    text: str | None = None,
    signal: Sequence[str] = (),
) -> Figure:
    """Stacked pre- or post-fit distribution of one channel, with data and a ratio panel.

    Drawn (top panel): the samples' expected yields stacked (``mplhep.histplot``): the
    backgrounds in the model's order from the bottom, then the ``signal`` samples on top
    (:meth:`analysis.likelihood.Workspace.signal_samples`); each sample keeps its colour (by
    its position in the model) in every figure; samples with no yield in the channel are
    left out. Then the total
    model uncertainty as a hatched band from ``total - stdev`` to ``total + stdev`` (the
    correlated uncertainty of :func:`analysis.prediction.prediction`), and the observed counts
    as points with ``sqrt(n)`` error bars. Bottom panel: data / model with ``sqrt(n) / model``
    error bars and the band ``1 +- stdev / model``.

    Args:
        prediction: from :func:`analysis.prediction.prediction`.
        channel: the channel (region) to draw.
        data: observed counts, the model's data vector (auxiliary data may follow) or a
            mapping channel -> counts; ``None`` draws the model only.
        edges: bin edges of the channel, or a mapping channel -> edges; ``None`` numbers the
            bins 0, 1, ...
        observable: x-axis label (default ``"bin"`` or ``"observable"``).
        log_y: logarithmic yield axis.
        text: text under the channel name (default: the prediction's label).
        signal: names of the signal samples, stacked on top.

    Returns:
        A figure with two axes: the distribution and the ratio.
    """
    if channel not in prediction.per_channel:
        raise ValueError(f"unknown channel '{channel}'; channels: {', '.join(prediction.channels)}")
    ch = prediction[channel]
    bin_edges = _channel_edges(edges, channel, ch.nbins)
    centers = 0.5 * (bin_edges[1:] + bin_edges[:-1])
    observed = None if data is None else data_per_channel(prediction, data)[channel]

    figure, ax, ratio_ax = ratio_figure()
    order = sorted(range(len(ch.samples)), key=lambda i: ch.samples[i] in signal)  # stable
    present = [i for i in order if np.any(ch.yields[i] != 0)]
    if present:
        mplhep.histplot(
            [ch.yields[i] for i in present],
            bin_edges,
            stack=True,
            histtype="fill",
            label=[ch.samples[i] for i in present],
            color=[color(prediction.samples.index(ch.samples[i])) for i in present],
            ax=ax,
        )
    low, high = ch.total - ch.total_stdev, ch.total + ch.total_stdev
    _band(ax, bin_edges, low, high)
    if observed is not None:
        ax.errorbar(
            centers,
            observed,
            yerr=np.sqrt(np.clip(observed, 0.0, None)),
            fmt="o",
            color=DATA_COLOR,
            markersize=5,
            label=DATA_LABEL,
        )
    top = max(float(np.max(high)), float(np.max(observed)) if observed is not None else 0.0)
    if log_y:
        ax.set_yscale("log")
        positive = ch.total[ch.total > 0]
        bottom = float(positive.min()) / 10 if positive.size else 0.1
        ax.set_ylim(bottom, max(top, bottom) * 100)
    else:
        ax.set_ylim(0.0, 1.5 * top if top > 0 else 1.0)
    ax.set_ylabel("Events")
    # legend: data, the band, then the samples from the top of the stack down
    by_label = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    stacked = [ch.samples[i] for i in reversed(present)]
    labels = [x for x in (DATA_LABEL, BAND_LABEL) if x in by_label] + stacked
    ax.legend([by_label[x] for x in labels], labels, loc="upper right")
    corner_text(ax, f"{channel}\n{prediction.label if text is None else text}")

    _band(ratio_ax, bin_edges, _ratio(low, ch.total), _ratio(high, ch.total))
    ratio_ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
    deviations = [_ratio(ch.total_stdev, ch.total)]
    if observed is not None:
        ratio, ratio_error = (
            _ratio(observed, ch.total),
            _ratio(np.sqrt(np.clip(observed, 0.0, None)), ch.total),
        )
        ratio_ax.errorbar(
            centers,
            ratio,
            yerr=ratio_error,
            fmt="o",
            color=DATA_COLOR,
            markersize=5,
            label=DATA_LABEL,
        )
        deviations.append(np.abs(ratio - 1.0) + ratio_error)
        ratio_ax.set_ylabel("Data / Model")
    else:
        ratio_ax.set_ylabel("Rel. unc.")
    # symmetric about 1, at least +-0.5, at most 0..3, with 10% headroom
    reach = np.concatenate(deviations)
    reach = reach[np.isfinite(reach)]
    span = min(max(0.5, 1.1 * float(reach.max()) if reach.size else 0.0), 2.0)
    ratio_ax.set_ylim(max(0.0, 1.0 - span), 1.0 + span)
    ratio_ax.set_xlim(bin_edges[0], bin_edges[-1])
    default = "observable" if edges is not None else "bin"
    ratio_ax.set_xlabel(observable or default)
    for axes in (ax, ratio_ax):
        minor_ticks(axes, y=not (log_y and axes is ax))
    return figure


def distributions(
    prediction: ModelPrediction,
    data: Any = None,
    *,
    edges: Any = None,
    observable: str | Mapping[str, str] | None = None,
    log_y: bool = False,
    signal: Sequence[str] = (),
) -> dict[str, Figure]:
    """:func:`distribution` for every channel of ``prediction``: ``{channel: Figure}``.

    ``edges`` is one array for all channels or a mapping channel -> edges; ``observable`` one
    x-axis label or a mapping channel -> label; ``signal`` the samples stacked on top.
    """
    figures = {}
    for channel in prediction.channels:
        label = observable.get(channel) if isinstance(observable, Mapping) else observable
        figures[channel] = distribution(
            prediction, channel, data, edges=edges, observable=label, log_y=log_y, signal=signal
        )
    return figures
