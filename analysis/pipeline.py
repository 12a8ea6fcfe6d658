"""The differentiable analysis as one ``torch.nn.Module``: cuts -> histograms -> likelihood.

:class:`AnalysisPipeline` holds the state of an analysis (DESIGN.md, "Data flow"):

- **Cut thresholds.** A trainable cut's threshold ``c`` lives inside its ``Bounds``
  ``[low, high]`` through an unconstrained parameter ``u`` (one entry of the ``nn.Parameter``
  :attr:`~AnalysisPipeline.cut_parameters`)::

      c = low + (high - low) * sigmoid(u),      u = logit((c - low) / (high - low)).

  Every real ``u`` gives a threshold strictly inside the bounds (in floating point at most on
  them), so no optimizer step can leave them. A configured ``Value`` exactly on a bound has no
  finite ``u``; it is nudged inside by ``BOUND_NUDGE = 1e-6`` of the range
  (``(c - low) / (high - low)`` clamped to ``[1e-6, 1 - 1e-6]``), where ``sigmoid`` still has a
  usable slope (``1e-6``). Non-trainable cuts keep their value as a buffer.
- **Events** of every template (nominal, tree- and weight-based variations, data): the
  observable, each cut variable's column and the weight, as (non-persistent) buffers, so
  ``.to(device)`` moves them and ``state_dict()`` holds only the small state.
- **Temperature scales.** Per cut, ``spread_k = column_spread(x_k, |w|)`` over all nominal
  prediction samples of the cut's region, measured once at construction (a buffer);
  ``tau_k = tau * spread_k`` for a relative temperature ``tau`` (DESIGN.md: knobs in natural
  units).

:meth:`AnalysisPipeline.histograms` passes every template of a region through the same soft
cuts (``w_i exp(sum_k log_soft_cut(x_ik, c_k, tau_k, dir_k))``) and fills a KDE histogram of the
observable with bandwidth ``h = bandwidth * (smallest bin width of the region)`` (the smallest
width, so no bin of non-uniform binning is smoothed by more than ``bandwidth`` of its own width).
``tau = 0`` and ``bandwidth = 0`` give exactly the boolean cuts and ordinary histograms of
:func:`analysis.histograms.hard_histograms`.

:meth:`AnalysisPipeline.workspace_spec` floors small yields (:func:`smooth_floor`, see
:data:`FLOOR_FRACTION`) and builds the pyhf-structured workspace with tensor leaves
(:func:`analysis.workspace.build_spec`, cabinetry semantics); :meth:`AnalysisPipeline.model`
(and ``forward``) returns the differentiable HistFactory model and its observed data. Gradients
flow from any scalar of the model back to :attr:`cut_parameters`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from analysis import workspace as workspace_builder
from analysis.config import Config, Cut
from analysis.errors import ConfigError
from analysis.histograms import Histogram, kde_histogram
from analysis.io import Events, TemplateKey, read_events
from analysis.likelihood import Model, Workspace
from analysis.selection import column_spread, log_soft_cut

__all__ = ["BOUND_NUDGE", "FLOOR_FRACTION", "AnalysisPipeline", "smooth_floor"]

BOUND_NUDGE = 1e-6
"""Fraction of a cut's range by which a configured value on a bound is moved inside."""

FLOOR_FRACTION = 1e-6
"""Yield floor per bin, as a fraction of the template's total ``sum_b |n_b|`` (and of
``sum_b s_b`` for the sum of squared weights); see :func:`smooth_floor`."""


def smooth_floor(x: torch.Tensor, floor: torch.Tensor | float) -> torch.Tensor:
    r"""``x`` above ``floor``, smoothly bounded below by ``floor / 2`` under it.

    Math: ``g(x) = x`` for ``x >= f``, ``g(x) = (f / 2) (1 + exp(2 (x - f) / f))`` for ``x < f``
    (``f > 0``). ``g`` and ``g'`` are continuous at ``f`` (``g = f``, ``g' = 1``), ``g`` is
    increasing with ``f/2 < g(x) <= f`` below the floor and ``g(x) -> f/2`` for ``x -> -inf``.

    Why: HistFactory needs positive expected yields per bin (``log lambda``) and a positive
    ``sqrt(sum w^2)`` for staterror; soft cuts, KDE smearing and negative weights can empty a bin
    or make it negative. A hard ``clamp`` would do too but its gradient is exactly 0 below the
    floor, so a bin that went empty could never be refilled by the optimizer; here the gradient
    ``exp(2 (x - f) / f)`` decays smoothly (to ``e^-2 = 0.14`` at ``x = 0``) and stays > 0.
    Above the floor the value and gradient are untouched, so the hard limit is exact there.

    Numerics: the exponential is evaluated at ``min(x, f)`` (argument ``<= 0``), so the unused
    branch can neither overflow nor leak NaN into the gradient.
    """
    floor = torch.as_tensor(floor, dtype=x.dtype, device=x.device)
    below = torch.minimum(x, floor)
    soft = 0.5 * floor * (1.0 + torch.exp(2.0 * (below - floor) / floor))
    return torch.where(x >= floor, x, soft)


@dataclass(frozen=True)
class _TemplateSlot:
    """Where one template's buffers live: ``t<j>_observable``, ``t<j>_weight``, ``t<j>_x<k>``."""

    key: TemplateKey
    region: int
    prefix: str


class AnalysisPipeline(torch.nn.Module):
    """Soft cuts, KDE histograms and the HistFactory model of an analysis (module docstring).

    Build with :meth:`from_config`. Attributes:

    - ``cut_parameters``: ``nn.Parameter`` of shape ``(n_trainable,)``, the unconstrained
      ``u`` of the trainable cuts in config order (``trainable_cut_names``).
    - ``cut_names``: all cuts in config order; :meth:`thresholds` gives their values as a
      tensor, :meth:`cut_values` as a ``cuts.json`` dictionary.
    """

    def __init__(
        self,
        config: Config,
        events: Mapping[TemplateKey, Events],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.config = config
        cuts = config.cuts
        self.cut_names: tuple[str, ...] = tuple(cut.name for cut in cuts)
        self._cuts: tuple[Cut, ...] = cuts
        self.trainable_cut_names = tuple(cut.name for cut in cuts if cut.trainable)
        trainable = torch.tensor([cut.trainable for cut in cuts], dtype=torch.bool)
        low = torch.tensor([cut.bounds[0] for cut in cuts], dtype=dtype)
        high = torch.tensor([cut.bounds[1] for cut in cuts], dtype=dtype)
        value = torch.tensor([cut.value for cut in cuts], dtype=dtype)
        self.register_buffer("cut_low", low)
        self.register_buffer("cut_high", high)
        self.register_buffer("cut_trainable", trainable)
        self.register_buffer("cut_fixed_values", value.clone())
        self.cut_parameters = torch.nn.Parameter(self._unconstrained(value)[trainable])
        # cut k of the whole config <-> (region, position in the region's cuts)
        self._region_cuts: list[list[int]] = []
        start = 0
        for region in config.regions:
            self._region_cuts.append(list(range(start, start + len(region.cuts))))
            start += len(region.cuts)

        region_index = {region.name: i for i, region in enumerate(config.regions)}
        for i, region in enumerate(config.regions):
            edges = torch.tensor(region.binning, dtype=dtype)
            self.register_buffer(f"edges{i}", edges)
            self.register_buffer(f"bin_width{i}", torch.diff(edges).min())
        self._slots: list[_TemplateSlot] = []
        for j, template in enumerate(config.templates()):
            key = (template.region.name, template.sample.name, template.variation)
            if key not in events:
                raise ConfigError(
                    f"{config.source}: no events given for {template.label}; expected one "
                    "entry per template of the configuration (analysis.io.read_events)"
                )
            ev = events[key]
            r = region_index[key[0]]
            prefix = f"t{j}_"
            self.register_buffer(prefix + "observable", ev.observable.to(dtype), persistent=False)
            self.register_buffer(prefix + "weight", ev.weight.to(dtype), persistent=False)
            for k, cut in enumerate(template.region.cuts):
                column = ev.columns[cut.variable].to(dtype)
                self.register_buffer(f"{prefix}x{k}", column, persistent=False)
            self._slots.append(_TemplateSlot(key=key, region=r, prefix=prefix))

        # temperature scale per cut: spread on the nominal prediction samples of its region
        spreads = []
        for region in config.regions:
            nominal = [
                events[(region.name, sample.name, "nominal")]
                for sample in config.samples_in(region)
            ]
            for cut in region.cuts:
                x = torch.cat([ev.columns[cut.variable].to(dtype) for ev in nominal])
                w = torch.cat([ev.weight.to(dtype) for ev in nominal])
                spreads.append(column_spread(x, w.abs()))
        self.register_buffer(
            "cut_spread",
            torch.stack(spreads) if spreads else torch.zeros(0, dtype=dtype),
        )
        self.to(device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config: Config,
        events: Mapping[TemplateKey, Events] | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> AnalysisPipeline:
        """The pipeline of ``config``; reads the events (:func:`analysis.io.read_events`) unless
        ``events`` is given. Thresholds start at the configured cut values."""
        if events is None:
            events = read_events(config, device=device, dtype=dtype, cache_dir=cache_dir)
        return cls(config, events, device=device, dtype=dtype)

    # ------------------------------------------------------------------ cut thresholds
    def _unconstrained(self, value: torch.Tensor) -> torch.Tensor:
        """``u = logit((c - low) / (high - low))``, the fraction clamped to the nudge."""
        fraction = (value - self.cut_low) / (self.cut_high - self.cut_low)
        return torch.logit(fraction.clamp(BOUND_NUDGE, 1.0 - BOUND_NUDGE))

    def thresholds(self) -> torch.Tensor:
        """All cut thresholds ``(n_cuts,)`` in config order; trainable ones carry gradient:
        ``c = low + (high - low) sigmoid(u)``."""
        values = self.cut_fixed_values
        if self.cut_parameters.numel() == 0:
            return values
        index = torch.nonzero(self.cut_trainable).squeeze(-1)
        bounded = self.cut_low[index] + (self.cut_high[index] - self.cut_low[index]) * (
            torch.sigmoid(self.cut_parameters)
        )
        return values.index_put((index,), bounded)

    def cut_values(self) -> dict[str, float]:
        """Cut name -> threshold, all cuts (the format of ``cuts.json``)."""
        with torch.no_grad():
            values = self.thresholds().tolist()
        return dict(zip(self.cut_names, values, strict=True))

    def set_cut_values(self, values: Mapping[str, float]) -> None:
        """Set thresholds from ``cuts.json``-style ``values`` (a subset of the cuts is fine).

        A trainable cut's ``u`` is set to ``logit`` of its position in the bounds (a value on a
        bound is nudged inside, see the module docstring); a non-trainable cut's buffer is set
        as given. Raises ConfigError for an unknown name or a value outside the Bounds.
        """
        index = {name: k for k, name in enumerate(self.cut_names)}
        for name, value in values.items():
            if name not in index:
                raise ConfigError(
                    f"unknown cut '{name}'; valid cut names: {', '.join(self.cut_names)}"
                )
            cut = self._cuts[index[name]]
            if not isinstance(value, (int, float)) or not cut.bounds[0] <= value <= cut.bounds[1]:
                raise ConfigError(
                    f"cut '{name}' = {value!r} is outside its Bounds "
                    f"[{cut.bounds[0]}, {cut.bounds[1]}]"
                )
        with torch.no_grad():
            current = self.thresholds().clone()
            for name, value in values.items():
                current[index[name]] = float(value)
            self.cut_fixed_values.copy_(current)  # trainable entries: overridden by u
            self.cut_parameters.copy_(self._unconstrained(current)[self.cut_trainable])

    def temperatures(self, tau: float | torch.Tensor) -> torch.Tensor:
        """Cut temperatures in the cut variables' units, ``tau * spread`` per cut."""
        return tau * self.cut_spread

    # ------------------------------------------------------------------ histograms
    def histograms(
        self, tau: float | torch.Tensor, bandwidth: float | torch.Tensor
    ) -> dict[TemplateKey, Histogram]:
        """Soft-cut KDE histograms of every template, ``{(region, sample, variation): Hist}``.

        ``tau``: temperature in units of each cut's spread (``0``: boolean cuts);
        ``bandwidth``: KDE width in units of the region's smallest bin width (``0``: ordinary
        histogram). Every template of a region (nominal, variations, data) passes through the
        same thresholds. No floor is applied here (see :meth:`workspace_spec`).
        """
        _check_knob("tau", tau)
        _check_knob("bandwidth", bandwidth)
        thresholds = self.thresholds()
        taus = self.temperatures(tau)
        out = {}
        for slot in self._slots:
            region = self.config.regions[slot.region]
            weight = getattr(self, slot.prefix + "weight")
            log_w = None
            for k, global_k in enumerate(self._region_cuts[slot.region]):
                term = log_soft_cut(
                    getattr(self, f"{slot.prefix}x{k}"),
                    thresholds[global_k],
                    taus[global_k] if isinstance(tau, torch.Tensor) or tau > 0 else 0.0,
                    region.cuts[k].direction,
                )
                log_w = term if log_w is None else log_w + term
            weights = weight if log_w is None else weight * torch.exp(log_w)
            edges = getattr(self, f"edges{slot.region}")
            h = bandwidth * getattr(self, f"bin_width{slot.region}")
            out[slot.key] = kde_histogram(
                getattr(self, slot.prefix + "observable"), weights, edges, h
            )
        return out

    # ------------------------------------------------------------------ likelihood
    def workspace_spec(self, tau: float | torch.Tensor, bandwidth: float | torch.Tensor) -> dict:
        """The pyhf workspace structure (tensor leaves) of the soft histograms, with floors.

        Every prediction template (nominal and variations) has its yields floored per bin by
        :func:`smooth_floor` at ``FLOOR_FRACTION * sum_b |n_b|`` of that template (the floor is
        detached: it moves with the sample's size but carries no gradient) and its ``sum w^2``
        at ``FLOOR_FRACTION * sum_b s_b``; bins above the floor are unchanged. Data are not
        floored (their weights are positive; a Poisson term with 0 observed is fine). The spec
        is in float64 whatever the event dtype (DESIGN.md: likelihoods run in float64).
        """
        histograms = self.histograms(tau, bandwidth)
        data_name = self.config.data_sample.name
        floored = {
            key: _as_float64(hist) if key[1] == data_name else _floored(hist)
            for key, hist in histograms.items()
        }
        return workspace_builder.build_spec(self.config, floored)

    def model(
        self, tau: float | torch.Tensor, bandwidth: float | torch.Tensor
    ) -> tuple[Model, torch.Tensor]:
        """The differentiable HistFactory model and its observed data (main + auxiliary)."""
        spec = self.workspace_spec(tau, bandwidth)
        workspace = Workspace.from_spec(spec, source=f"{self.config.source} (pipeline)")
        model = workspace.model(dtype=torch.float64, device=self.cut_low.device)
        return model, workspace.data(model)

    def forward(
        self, tau: float | torch.Tensor, bandwidth: float | torch.Tensor
    ) -> tuple[Model, torch.Tensor]:
        """Same as :meth:`model`: ``(Model, data)`` at temperature ``tau`` and ``bandwidth``."""
        return self.model(tau, bandwidth)

    def extra_repr(self) -> str:
        return (
            f"cuts={len(self.cut_names)} (trainable {len(self.trainable_cut_names)}), "
            f"templates={len(self._slots)}, events={sum(self.event_counts().values())}"
        )

    def event_counts(self) -> dict[TemplateKey, int]:
        """Number of (filtered) events per template."""
        return {s.key: int(getattr(self, s.prefix + "weight").shape[0]) for s in self._slots}


def _check_knob(name: str, value: float | torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) and not (0 <= value < math.inf):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _as_float64(hist: Histogram) -> Histogram:
    return Histogram(hist.edges, hist.yields.to(torch.float64), hist.sumw2.to(torch.float64))


def _floored(hist: Histogram) -> Histogram:
    """``hist`` with :func:`smooth_floor` applied to yields and sum of w^2 (detached floors)."""
    hist = _as_float64(hist)
    tiny = torch.finfo(torch.float64).tiny
    floor_n = torch.clamp(FLOOR_FRACTION * hist.yields.detach().abs().sum(), min=tiny)
    floor_s = torch.clamp(FLOOR_FRACTION * hist.sumw2.detach().abs().sum(), min=tiny)
    return Histogram(
        edges=hist.edges,
        yields=smooth_floor(hist.yields, floor_n),
        sumw2=smooth_floor(hist.sumw2, floor_s),
    )
