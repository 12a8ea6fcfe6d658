r"""Model predictions per channel and sample, pre-fit and post-fit, with uncertainty bands.

This is cabinetry's ``cabinetry.model_utils.prediction`` (and ``yield_stdev``) for the torch
HistFactory model of :mod:`analysis.likelihood`, with the same numbers.

**Parameters.** Pre-fit, the model is evaluated at the nominal point of every parameter
(cabinetry's ``asimov_parameters``): constrained ``histosys``/``normsys`` parameters at 0,
the other constrained ones (``staterror``, ``lumi``, ``shapesys``) at 1, unconstrained ones
(``normfactor``, ``shapefactor``, the POI) at their suggested initial value. Their
uncertainties are the pre-fit (constraint) widths, 0 for unconstrained and fixed parameters
(:meth:`analysis.likelihood.Model.prefit_uncertainties`), and the correlation matrix is the
identity. Post-fit, :class:`analysis.fit.FitResult` supplies the best fit ``bestfit``, the
HESSE ``uncertainty`` and the correlation matrix ``corr_mat``.

**Uncertainty** (linear error propagation with one-standard-deviation shifts, as cabinetry).
For each parameter ``i`` the expected yields ``y`` are evaluated at the central point with
``theta_i`` shifted by ``+sigma_i`` and by ``-sigma_i`` (every other parameter central, no
clipping to bounds); the symmetrised variation is

.. math::

    \delta_i = \frac{y(\theta + \sigma_i e_i) - y(\theta - \sigma_i e_i)}{2},
    \qquad
    \mathrm{Var}(y) = \sum_{i,j} \delta_i\, \rho_{ij}\, \delta_j,

with ``rho`` the correlation matrix. ``y`` stands for every quantity reported: the yield of
each sample in each bin, the total over samples in each bin, and the same summed over the bins
of a channel; the variations of a sum are the sums of the variations, so correlations between
bins and samples are taken into account. All ``2 P`` shifted parameter points are evaluated in
one batched call of :meth:`analysis.likelihood.Model.expected_by_sample`.

Samples are in the model's (alphabetical, pyhf's) order; a sample absent from a channel has
zero yield there. Differences from cabinetry: a fit result whose parameter names are not the
model's is an error (cabinetry logs a warning), and samples are not merged
(``samples_merge_map``).

The nominal point needs each parameter set's constraint kind and modifier types, which
:class:`analysis.likelihood.Model` keeps in its ``_param_sets`` and ``_modifiers``;
:func:`parameter_types` and :func:`asimov_parameters` are the only readers of those here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "ChannelPrediction",
    "ModelPrediction",
    "asimov_parameters",
    "data_per_channel",
    "parameter_types",
    "prediction",
    "yield_table",
]

#: constrained modifier types whose parameters are nominally 0 (all others nominally 1)
_ALPHA_TYPES = frozenset({"histosys", "normsys"})


@dataclass(frozen=True, eq=False)
class ChannelPrediction:
    """Predicted yields of one channel (region) and their standard deviations.

    Attributes:
        name: the channel.
        samples: sample names, the row order of ``yields`` and ``stdev``.
        yields: ``(samples, bins)`` expected yield per sample and bin.
        stdev: ``(samples, bins)`` standard deviation of each sample's yield per bin.
        total: ``(bins,)`` expected yield summed over samples.
        total_stdev: ``(bins,)`` standard deviation of ``total`` (the uncertainty band).
        sample_yields: ``(samples,)`` each sample's yield summed over the channel's bins.
        sample_stdev: ``(samples,)`` standard deviation of ``sample_yields``.
        total_yield: the channel's total expected yield.
        total_yield_stdev: its standard deviation.
    """

    name: str
    samples: tuple[str, ...]
    yields: np.ndarray
    stdev: np.ndarray
    total: np.ndarray
    total_stdev: np.ndarray
    sample_yields: np.ndarray
    sample_stdev: np.ndarray
    total_yield: float
    total_yield_stdev: float

    @property
    def nbins(self) -> int:
        return int(self.total.shape[0])


@dataclass(frozen=True, eq=False)
class ModelPrediction:
    """Yields and uncertainties of a model per channel, sample and bin (cabinetry's
    ``ModelPrediction``).

    Attributes:
        label: ``"pre-fit"`` or ``"post-fit"`` (or the label given to :func:`prediction`).
        channels: channel names in the model's order.
        samples: sample names in the model's order.
        par_names: the model's parameter names.
        parameters: ``(P,)`` parameter values the yields are evaluated at.
        uncertainty: ``(P,)`` parameter uncertainties used for the band.
        corr_mat: ``(P, P)`` parameter correlations used for the band.
        per_channel: channel name -> :class:`ChannelPrediction`.
        model: the model the prediction was computed from (not compared, not printed).
    """

    label: str
    channels: tuple[str, ...]
    samples: tuple[str, ...]
    par_names: tuple[str, ...]
    parameters: np.ndarray
    uncertainty: np.ndarray
    corr_mat: np.ndarray
    per_channel: Mapping[str, ChannelPrediction]
    model: Any = field(default=None, repr=False)

    def __getitem__(self, channel: str) -> ChannelPrediction:
        return self.per_channel[channel]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready lists: per channel the yields and standard deviations."""
        return {
            "label": self.label,
            "samples": list(self.samples),
            "channels": {
                name: {
                    "yields": ch.yields.tolist(),
                    "stdev": ch.stdev.tolist(),
                    "total": ch.total.tolist(),
                    "total_stdev": ch.total_stdev.tolist(),
                    "sample_yields": ch.sample_yields.tolist(),
                    "sample_stdev": ch.sample_stdev.tolist(),
                    "total_yield": ch.total_yield,
                    "total_yield_stdev": ch.total_yield_stdev,
                }
                for name, ch in self.per_channel.items()
            },
        }


# ----------------------------------------------------------------------------- parameters
def parameter_types(model) -> dict[str, tuple[str, ...]]:
    """Parameter-set name -> the modifier types that use it (e.g. ``("histosys", "normsys")``
    for a NormPlusShape systematic, ``("staterror",)``, ``("normfactor",)``)."""
    types: dict[str, list[str]] = {}
    for modifier in model._modifiers:  # the model's active modifier types, in pyhf's order
        for name in modifier.requirements():
            types.setdefault(name, []).append(modifier.type)
    return {name: tuple(kinds) for name, kinds in types.items()}


def asimov_parameters(model) -> torch.Tensor:
    """The nominal parameter point, ``(P,)`` (cabinetry's ``model_utils.asimov_parameters``).

    Constrained ``histosys``/``normsys`` parameters at 0, other constrained parameters
    (``staterror``, ``lumi``, ``shapesys``) at 1, unconstrained parameters at the suggested
    initial value. Like cabinetry, custom auxiliary data in the measurement is ignored.
    """
    init = model.suggested_init()
    types = parameter_types(model)
    for ps in model._param_sets:  # the model's parameter sets with their constraint kind
        if ps.constraint is not None:
            nominal = 0.0 if _ALPHA_TYPES.intersection(types.get(ps.name, ())) else 1.0
            init[model.par_slices[ps.name]] = nominal
    return init


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().astype(np.float64)
    return np.asarray(value, dtype=np.float64)


# ----------------------------------------------------------------------------- prediction
def prediction(model, fit_result=None, *, label: str | None = None) -> ModelPrediction:
    """Yields per channel, sample and bin with their standard deviations (module docstring).

    Args:
        model: an :class:`analysis.likelihood.Model` (not batched over nominal yields).
        fit_result: an :class:`analysis.fit.FitResult` of this model (or its ``to_dict``
            form) for the post-fit prediction, ``None`` for the pre-fit one. Its ``labels``
            must be the model's parameter names.
        label: overrides ``"pre-fit"`` / ``"post-fit"``.

    Returns:
        :class:`ModelPrediction`, numbers as float64 numpy arrays.

    Raises:
        ValueError: the fit result's parameters are not the model's, or the model is batched.
    """
    if model.nominal_batch != 1:
        raise ValueError(
            f"prediction needs a model with one set of nominal yields, this one has "
            f"{model.nominal_batch} (Model.with_sample_yields)"
        )
    npars = model.npars
    dtype, device = model.dtype, model.device
    if fit_result is None:
        parameters = asimov_parameters(model)
        uncertainty = model.prefit_uncertainties()
        corr_mat = torch.eye(npars, dtype=dtype, device=device)
        label = "pre-fit" if label is None else label
    else:

        def get(name: str) -> Any:  # a FitResult or its to_dict form (``diffana fit`` JSON)
            if isinstance(fit_result, Mapping):
                return fit_result[name]
            return getattr(fit_result, name)

        labels = tuple(get("labels"))
        if labels != tuple(model.par_names):
            raise ValueError(
                f"fit result parameters {list(labels)} are not the model's {list(model.par_names)}"
            )
        parameters, uncertainty, corr_mat = (
            torch.as_tensor(get(name), dtype=dtype, device=device)
            for name in ("bestfit", "uncertainty", "corr_mat")
        )
        label = "post-fit" if label is None else label

    with torch.no_grad():
        parameters = parameters.detach().reshape(npars)
        uncertainty = uncertainty.detach().reshape(npars)
        corr_mat = corr_mat.detach().reshape(npars, npars)
        # row 0: central point; rows 1..P: theta_i + sigma_i; rows P+1..2P: theta_i - sigma_i
        shift = torch.diag(uncertainty)
        points = torch.cat([parameters[None], parameters + shift, parameters - shift])
        by_sample = model.expected_by_sample(points)  # (1 + 2P, S, nmain)
        # quantities: per sample and bin, total per bin, and the same summed per channel
        with_total = torch.cat([by_sample, by_sample.sum(dim=-2, keepdim=True)], dim=-2)
        channel_sums = torch.stack(
            [with_total[..., model.channel_slices[c]].sum(dim=-1) for c in model.channels],
            dim=-1,
        )  # (1 + 2P, S + 1, C)
        values = torch.cat([with_total, channel_sums], dim=-1)  # (1 + 2P, S + 1, nmain + C)
        central = values[0]
        sym = (values[1 : 1 + npars] - values[1 + npars :]) / 2  # (P, S + 1, nmain + C)
        # Var = sum_ij delta_i rho_ij delta_j, elementwise in (sample, bin)
        variance = (sym * torch.tensordot(corr_mat, sym, dims=([1], [0]))).sum(dim=0)
        stdev = torch.sqrt(torch.clamp(variance, min=0.0))

    central_np, stdev_np = _as_numpy(central), _as_numpy(stdev)
    per_channel = {}
    for c_index, channel in enumerate(model.channels):
        bins = model.channel_slices[channel]
        column = model.nmain + c_index
        per_channel[channel] = ChannelPrediction(
            name=channel,
            samples=tuple(model.samples),
            yields=central_np[:-1, bins].copy(),
            stdev=stdev_np[:-1, bins].copy(),
            total=central_np[-1, bins].copy(),
            total_stdev=stdev_np[-1, bins].copy(),
            sample_yields=central_np[:-1, column].copy(),
            sample_stdev=stdev_np[:-1, column].copy(),
            total_yield=float(central_np[-1, column]),
            total_yield_stdev=float(stdev_np[-1, column]),
        )
    return ModelPrediction(
        label=label,
        channels=tuple(model.channels),
        samples=tuple(model.samples),
        par_names=tuple(model.par_names),
        parameters=_as_numpy(parameters),
        uncertainty=_as_numpy(uncertainty),
        corr_mat=_as_numpy(corr_mat),
        per_channel=per_channel,
        model=model,
    )


# ----------------------------------------------------------------------------- data, tables
def data_per_channel(pred: ModelPrediction, data: Any) -> dict[str, np.ndarray]:
    """Observed counts per channel of ``pred``'s model.

    ``data`` is either the model's data vector (main bins in channel order, optionally
    followed by the auxiliary data, as :meth:`analysis.likelihood.Workspace.data` returns) or
    a mapping channel -> counts.
    """
    if isinstance(data, Mapping):
        out = {}
        for channel in pred.channels:
            if channel not in data:
                raise ValueError(f"no data for channel '{channel}'")
            values = _as_numpy(data[channel]).reshape(-1)
            if values.shape[0] != pred[channel].nbins:
                raise ValueError(
                    f"data for channel '{channel}' has {values.shape[0]} bins, the model "
                    f"{pred[channel].nbins}"
                )
            out[channel] = values
        return out
    values = _as_numpy(data).reshape(-1)
    nmain = sum(pred[c].nbins for c in pred.channels)
    if values.shape[0] < nmain:
        raise ValueError(f"data has {values.shape[0]} values, the model {nmain} main bins")
    out, start = {}, 0
    for channel in pred.channels:
        n = pred[channel].nbins
        out[channel] = values[start : start + n].copy()
        start += n
    return out


def yield_table(
    pred: ModelPrediction, data: Any = None, *, per_bin: bool = False
) -> list[dict[str, Any]]:
    """Yield table rows (cabinetry's ``tabulate.yields``), per channel: one row per sample,
    a ``"total"`` row (the sum over samples, with its correlated uncertainty) and, when
    ``data`` is given (see :func:`data_per_channel`), a ``"data"`` row without uncertainty.

    Each row is ``{"channel", "sample", "yield", "uncertainty"}``; with ``per_bin=True`` the
    values are lists over the channel's bins, otherwise sums over the channel.
    """
    observed = None if data is None else data_per_channel(pred, data)
    rows: list[dict[str, Any]] = []
    for channel in pred.channels:
        ch = pred[channel]
        if per_bin:
            entries = [
                (s, ch.yields[i].tolist(), ch.stdev[i].tolist()) for i, s in enumerate(ch.samples)
            ]
            entries.append(("total", ch.total.tolist(), ch.total_stdev.tolist()))
        else:
            entries = [
                (s, float(ch.sample_yields[i]), float(ch.sample_stdev[i]))
                for i, s in enumerate(ch.samples)
            ]
            entries.append(("total", ch.total_yield, ch.total_yield_stdev))
        for sample, value, error in entries:
            rows.append(
                {"channel": channel, "sample": sample, "yield": value, "uncertainty": error}
            )
        if observed is not None:
            counts = observed[channel]
            value = counts.tolist() if per_bin else float(counts.sum())
            rows.append({"channel": channel, "sample": "data", "yield": value, "uncertainty": None})
    return rows
