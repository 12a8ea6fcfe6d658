"""Pre- and post-fit distributions: stacked samples, data and the model uncertainty band.

cabinetry's ``visualize.data_mc`` (``plot_model.data_mc``) for a
:class:`analysis.prediction.ModelPrediction`, with what a reader needs to sign it: the
observable's title and unit on the x axis, the bin width on the y axis ("Events / 3 GeV"),
data with Poisson (Garwood) intervals, the experiment label, and a legend entry for every
artist (:mod:`analysis.plotting.labels`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mplhep
import numpy as np
from matplotlib.figure import Figure

from analysis.plotting._results import array
from analysis.plotting.labels import (
    ExperimentLabel,
    draw_experiment_label,
    events_label,
    poisson_errors,
    region_axes,
)
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

if TYPE_CHECKING:
    from analysis.config import Config

#: legend labels of the drawn artists (also how tests and users find them)
BAND_LABEL = "Total uncertainty"
DATA_LABEL = "Data"
OFF_SCALE_GID = "off-scale"
"""gid of the markers at the edge of the ratio panel for data / model points outside it."""


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


def _channel_edges(edges: Any, channel: str, nbins: int) -> np.ndarray | None:
    """The channel's bin edges, ``None`` when none are given (bins are numbered)."""
    if isinstance(edges, Mapping):
        edges = edges.get(channel)
    if edges is None or len(edges) == 0:
        return None
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
    unit: str | None = None,
    experiment: ExperimentLabel | None = None,
    config: Config | None = None,
) -> Figure:
    """Stacked pre- or post-fit distribution of one channel, with data and a ratio panel.

    Drawn (top panel): the samples' expected yields stacked (``mplhep.histplot``): the
    backgrounds in the model's order from the bottom, then the ``signal`` samples on top
    (:meth:`analysis.likelihood.Workspace.signal_samples`); each sample keeps its colour (by
    its position in the model) in every figure; samples with no yield in the channel are
    left out. Then the total model uncertainty as a hatched band from ``total - stdev`` to
    ``total + stdev`` (the correlated uncertainty of :func:`analysis.prediction.prediction`),
    and the observed counts as points with their central 68.27% Poisson (Garwood) interval
    (:func:`analysis.plotting.labels.poisson_interval`; a bin with no event has the error bar
    0 .. 1.84). Bottom panel: data / model with the same interval divided by the model, and
    the band ``1 +- stdev / model``; a point outside the panel's range is drawn as a triangle
    at its edge pointing the way it left. The y axis says what a bin holds: "Events / 3 GeV"
    for bins of one width (3, in the observable's ``unit``), "Events / bin" otherwise.

    Args:
        prediction: from :func:`analysis.prediction.prediction`.
        channel: the channel (region) to draw.
        data: observed counts, the model's data vector (auxiliary data may follow) or a
            mapping channel -> counts; ``None`` draws the model only.
        edges: bin edges of the channel, or a mapping channel -> edges; ``None`` numbers the
            bins 0, 1, ...
        observable: x-axis title, with its unit (default ``"bin"`` or ``"observable"``).
        log_y: logarithmic yield axis.
        text: text under the channel name (default: the prediction's label).
        signal: names of the signal samples, stacked on top.
        unit: the observable's unit, for the bin width in the y-axis title.
        experiment: the experiment label drawn above the figure.
        config: the analysis configuration; the defaults of ``edges``, ``observable``,
            ``unit`` (:func:`analysis.plotting.labels.region_axes`) and ``experiment``
            (:meth:`ExperimentLabel.from_config`) come from it.

    Returns:
        A figure with two axes: the distribution and the ratio.
    """
    if channel not in prediction.per_channel:
        raise ValueError(f"unknown channel '{channel}'; channels: {', '.join(prediction.channels)}")
    config_edges, config_title, config_unit = region_axes(config, channel)
    if edges is None:
        edges = config_edges
    observable = observable or config_title
    unit = unit or config_unit
    if experiment is None:
        experiment = ExperimentLabel.from_config(config)
    ch = prediction[channel]
    given_edges = _channel_edges(edges, channel, ch.nbins)
    bin_edges = given_edges if given_edges is not None else np.arange(ch.nbins + 1.0)
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
    errors = None
    if observed is not None:
        errors = poisson_errors(observed)
        ax.errorbar(
            centers,
            observed,
            yerr=errors,
            fmt="o",
            color=DATA_COLOR,
            markersize=5,
            label=DATA_LABEL,
            zorder=5,
        )
    top = max(
        float(np.max(high)),
        float(np.max(observed + errors[1])) if observed is not None and errors is not None else 0.0,
    )
    entries = len(present) + 1 + (observed is not None)
    if log_y:
        ax.set_yscale("log")
        positive = ch.total[ch.total > 0]
        bottom = float(positive.min()) / 10 if positive.size else 0.1
        # the legend takes the upper part: about 0.6 decades per entry above the data
        ax.set_ylim(bottom, max(top, bottom) * 10 ** (1.0 + 0.25 * entries))
    else:
        ax.set_ylim(0.0, (1.25 + 0.08 * entries) * top if top > 0 else 1.0)
    ax.set_ylabel(events_label(given_edges, unit), loc="top")
    # legend: data, the band, then the samples from the top of the stack down
    by_label = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    stacked = [ch.samples[i] for i in reversed(present)]
    labels = [x for x in (DATA_LABEL, BAND_LABEL) if x in by_label] + stacked
    ax.legend([by_label[x] for x in labels], labels, loc="upper right")
    corner_text(ax, f"{channel}\n{prediction.label if text is None else text}")
    draw_experiment_label(ax, experiment)

    _band(ratio_ax, bin_edges, _ratio(low, ch.total), _ratio(high, ch.total))
    ratio_ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
    deviations = [_ratio(ch.total_stdev, ch.total)]
    ratio = None
    if observed is not None and errors is not None:
        ratio = _ratio(observed, ch.total)
        ratio_errors = np.stack([_ratio(errors[0], ch.total), _ratio(errors[1], ch.total)])
        ratio_ax.errorbar(
            centers,
            ratio,
            yerr=ratio_errors,
            fmt="o",
            color=DATA_COLOR,
            markersize=5,
            label=DATA_LABEL,
            zorder=5,
        )
        deviations.append(
            np.maximum(ratio + ratio_errors[1] - 1.0, 1.0 - (ratio - ratio_errors[0]))
        )
        ratio_ax.set_ylabel("Data / Model")
    else:
        ratio_ax.set_ylabel("Rel. unc.")
    # symmetric about 1, holding points and error bars with 10% headroom, at least +-0.5,
    # at most 0..3 (points beyond: off-scale markers)
    reach = np.concatenate(deviations)
    reach = reach[np.isfinite(reach)]
    span = min(max(0.5, 1.1 * float(reach.max()) if reach.size else 0.0), 2.0)
    ratio_low, ratio_high = max(0.0, 1.0 - span), 1.0 + span
    ratio_ax.set_ylim(ratio_low, ratio_high)
    if ratio is not None:
        _off_scale_markers(ratio_ax, centers, ratio, ratio_low, ratio_high)
    ratio_ax.set_xlim(bin_edges[0], bin_edges[-1])
    default = "observable" if given_edges is not None else "bin"
    ratio_ax.set_xlabel(observable or default)
    for axes in (ax, ratio_ax):
        minor_ticks(axes, y=not (log_y and axes is ax))
    return figure


def _off_scale_markers(ax: Any, x: np.ndarray, ratio: np.ndarray, low: float, high: float) -> None:
    """Triangles at the top (bottom) edge of the ratio panel where data / model is above
    (below) its range, so that no point silently leaves the figure."""
    margin = 0.06 * (high - low)
    for sign, marker, edge in ((1, "^", high - margin), (-1, "v", low + margin)):
        outside = np.isfinite(ratio) & (sign * (ratio - (high if sign > 0 else low)) > 0)
        if np.any(outside):
            ax.plot(
                x[outside],
                np.full(int(outside.sum()), edge),
                marker,
                color=DATA_COLOR,
                markersize=7,
                linestyle="none",
                gid=OFF_SCALE_GID,
                zorder=6,
            )


def distributions(
    prediction: ModelPrediction,
    data: Any = None,
    *,
    edges: Any = None,
    observable: str | Mapping[str, str] | None = None,
    log_y: bool = False,
    signal: Sequence[str] = (),
    blinded: Collection[str] = (),
    config: Config | None = None,
) -> dict[str, Figure]:
    """:func:`distribution` for every channel of ``prediction``: ``{channel: Figure}``.

    ``edges`` is one array for all channels or a mapping channel -> edges; ``observable`` one
    x-axis label or a mapping channel -> label; ``signal`` the samples stacked on top;
    ``blinded`` the channels drawn without data (blinded signal regions,
    :mod:`analysis.blinding`), marked "data blinded" under the channel name; ``config`` the
    analysis configuration, from which the edges, axis titles, units and the experiment label
    not given are taken.
    """
    figures = {}
    for channel in prediction.channels:
        label = observable.get(channel) if isinstance(observable, Mapping) else observable
        hidden = channel in blinded
        figures[channel] = distribution(
            prediction,
            channel,
            None if hidden else data,
            edges=edges,
            observable=label,
            log_y=log_y,
            signal=signal,
            text=f"{prediction.label}, data blinded" if hidden else None,
            config=config,
        )
    return figures
