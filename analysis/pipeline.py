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
  usable slope (``1e-6``). Non-trainable cuts keep their value in the buffer
  ``cut_fixed_values``. A cut Name used in several regions is one threshold (one ``u``, or one
  fixed value), applied in each of them.
- **Fixed cuts are a selection.** A cut with ``Trainable: false`` is a selection: applied as a
  boolean cut in the relaxed path too. When the pipeline is built, every template of a region
  (nominal, variations, data) keeps only its events that pass the region's fixed cuts, by the
  boolean mask of the hard path (:func:`analysis.histograms.hard_cut_mask`: the strict
  ``x > c`` / ``x < c``, as ``1[s (x - c) > 0]`` of :func:`analysis.selection.selection_weights`
  at ``tau = 0``); the other events are not stored at all, and only the trainable cuts are
  softened. So the relaxed histograms are ``sum_i w_i F_i prod_{k trainable} sigmoid(...)``
  with ``F_i`` the 0/1 pass flag of the fixed cuts: dropping an event is its factor 0 of the
  boolean cut, so ``tau = 0`` still gives the hard path's histograms (equal up to the order of
  additions). A fixed cut has no gradient to carry; softening it would spend time on events it
  rejects (on the demo most of a control region's events) and let events on its wrong side
  leak into the region by its temperature. A region whose cuts are all fixed uses the plain
  event weights (no soft-cut call). Because the failing events are gone, a fixed cut's value
  cannot change on a built pipeline: :meth:`~AnalysisPipeline.set_cut_values` and
  ``load_state_dict`` refuse another value (a new pipeline from ``config.with_cut_values``
  moves it).
- **Events** of every template (nominal, tree- and weight-based variations, data) after the
  fixed cuts: the observable, each trainable cut variable's column and the weight, as
  (non-persistent) buffers, so ``.to(device)`` moves them and ``state_dict()`` holds only the
  small state. Templates of a region with equal (selected) observable columns (``torch.equal``:
  the nominal events and the weight-based variations of a sample) form a *group*; its events
  are stored sorted by the observable (one stable permutation for all its columns; sums do not
  depend on the order beyond rounding), and a cut column equal to that of an earlier template
  of the group is stored, and its soft cut computed, once.
- **Temperature scales.** Per trainable cut, ``spread_k = column_spread(x_k, |w|)`` over the
  nominal prediction events of the cut's region (of all its regions, for a shared cut) that
  pass the fixed cuts of their region, measured once at construction (a buffer);
  ``tau_k = tau * spread_k`` for a relative temperature ``tau`` (DESIGN.md: knobs in natural
  units). A fixed cut's ``spread_k`` is 0 (a boolean cut: temperature 0).

:meth:`AnalysisPipeline.histograms` passes every template of a region through the same soft cuts
(the trainable ones: ``w_i prod_k sigmoid(s_k (x_ik - c_k) / tau_k)``, by
:func:`~analysis.selection.selection_weight`:
``w_i exp(sum_k log_soft_cut(x_ik, c_k, tau_k, dir_k))``) and fills a KDE histogram of the
observable with bandwidth ``h = bandwidth * (smallest bin width of the region)`` (the smallest
width, so no bin of non-uniform binning is smoothed by more than ``bandwidth`` of its own width).
Speed (results equal up to rounding): the templates of a group share one kernel evaluation (one row
of weights each) and the groups of a region one :func:`~analysis.histograms.kde_histograms` call;
only the events with an observable within the kernel's truncation ``k h`` of the bins
(:data:`~analysis.histograms.KDE_TAIL_CUTOFF`, with 0.1% to spare) are cut and histogrammed, one
slice of the sorted events, because the others put exactly 0 into every bin and have zero gradient;
and sorted values let the KDE sum each bin's events with a matrix product instead of a scatter;
and the kernel values of each region (``erfc`` at the bin edges near every event, which depend on
the observable, the edges and the bandwidth only) are computed on the first call at a bandwidth
and kept for the next calls at it (:class:`~analysis.histograms.KDELayout`: per region the last
smoothing bandwidth's and the hard histograms' ``bandwidth = 0``), so the steps of an
optimization at one bandwidth (one of its ``BandwidthLevels``) evaluate no kernel.
``tau = 0`` and ``bandwidth = 0`` give exactly the boolean cuts and ordinary histograms of
:func:`analysis.histograms.hard_histograms`.

:meth:`AnalysisPipeline.workspace_spec` builds the pyhf-structured workspace with tensor leaves
(:func:`analysis.workspace.build_spec`: cabinetry semantics, bins without background floored by
:func:`analysis.workspace.smooth_floor`); :meth:`AnalysisPipeline.likelihood` turns histograms
into the differentiable HistFactory model of that spec, building the model's structure once and
feeding it the new numbers on later calls (:meth:`analysis.likelihood.Model.with_spec_values`);
:meth:`AnalysisPipeline.model` (and ``forward``) returns that model of
``histograms(tau, bandwidth)`` and its observed data. Gradients flow from any scalar of the model
back to :attr:`cut_parameters`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from analysis import workspace as workspace_builder
from analysis.config import Config, Cut
from analysis.errors import ConfigError, DataError
from analysis.histograms import (
    KDE_TAIL_CUTOFF,
    Histogram,
    KDELayout,
    hard_cut_mask,
    kde_histograms,
    kde_reach,
)
from analysis.io import Events, TemplateKey, read_events, template_key
from analysis.likelihood import Model, Workspace
from analysis.selection import column_spread, selection_weights

__all__ = ["BOUND_NUDGE", "AnalysisPipeline"]

BOUND_NUDGE = 1e-6
"""Fraction of a cut's range by which a configured value on a bound is moved inside."""


@dataclass(frozen=True)
class _TemplateSlot:
    """Where one template's buffers live: ``t<j>_observable``, ``t<j>_x<k>`` (``k``: the
    position of a trainable cut in the region's cuts; fixed cuts have no column) and its weights,
    row ``row`` of its group's ``weights`` buffer (``t<i>_weights``, ``i`` the group's first
    template: one row per template of the group).

    ``observable`` and ``cut_columns`` (one per trainable cut of the region, in its order) name
    the buffers the computation reads: the first template's buffer holding an equal column
    (possibly this template's own).
    """

    key: TemplateKey
    region: int
    prefix: str
    observable: str
    cut_columns: tuple[str, ...]
    weights: str
    row: int


class AnalysisPipeline(torch.nn.Module):
    """Soft cuts, KDE histograms and the HistFactory model of an analysis (module docstring).

    Build with :meth:`from_config`. Attributes:

    - ``cut_parameters``: ``nn.Parameter`` of shape ``(n_trainable,)``, the unconstrained
      ``u`` of the trainable cuts in config order (``trainable_cut_names``).
    - ``cut_names``: all cuts in config order (``config.cuts``: a cut shared by several
      regions, one Name, once); :meth:`thresholds` gives their values as a
      tensor, :meth:`cut_values` as a ``cuts.json`` dictionary.
    - ``cut_fixed_values``: the values of the non-trainable cuts in config order, a selection
      applied when the pipeline is built (boolean; their failing events are not stored).
    """

    # buffers (register_buffer), declared for the type checker
    cut_low: torch.Tensor
    cut_high: torch.Tensor
    cut_trainable: torch.Tensor
    cut_trainable_index: torch.Tensor
    cut_order: torch.Tensor
    cut_fixed_values: torch.Tensor
    cut_spread: torch.Tensor

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
        # each threshold is kept once: a trainable one as its u, a fixed one in cut_fixed_values
        # (the non-trainable cuts in config order); thresholds() puts them in config order by
        # cut_order, the position of each cut in [fixed values, trainable thresholds]
        self.register_buffer("cut_fixed_values", value[~trainable].clone())
        self.cut_parameters = torch.nn.Parameter(self._unconstrained(value)[trainable])
        self.register_buffer(
            "cut_trainable_index", torch.nonzero(trainable).squeeze(-1), persistent=False
        )
        order = torch.argsort(trainable.to(torch.int8), stable=True)  # fixed first, then trainable
        self.register_buffer("cut_order", torch.argsort(order), persistent=False)
        # per region: the cuts it softens, the trainable ones, as (indices in config.cuts,
        # directions); a cut shared by several regions (one Name) is one threshold. The fixed
        # cuts are applied at construction (below), not in the relaxed computation.
        cut_index = {name: k for k, name in enumerate(self.cut_names)}
        self._soft_cuts: list[tuple[tuple[int, ...], tuple[str, ...]]] = [
            (
                tuple(cut_index[cut.name] for cut in region.cuts if cut.trainable),
                tuple(cut.direction for cut in region.cuts if cut.trainable),
            )
            for region in config.regions
        ]

        region_index = {region.name: i for i, region in enumerate(config.regions)}
        for i, region in enumerate(config.regions):
            edges = torch.tensor(region.binning, dtype=dtype)
            self.register_buffer(f"edges{i}", edges)
            self.register_buffer(f"bin_width{i}", torch.diff(edges).min())
        # The fixed (non-trainable) cuts of a region are a selection: the events of each
        # template that fail them (the boolean mask of the hard path, hard_cut_mask) are dropped
        # here, and only the passing ones are stored. Templates of a region whose selected
        # observable columns are equal (the nominal events and the weight-based variations of a
        # sample) form a group: one KDE call with one row of weights per template. Each group's
        # events are sorted by the observable (one stable permutation for all its columns), so
        # the events within reach of the bins are one slice and the events of one bin are
        # contiguous (see histograms()).
        templates = list(config.templates())
        passing: dict[TemplateKey, torch.Tensor | None] = {}  # fixed-cut mask (None: no cut)
        groups: list[tuple[int, torch.Tensor, list[int]]] = []  # (region, observable, members)
        for j, template in enumerate(templates):
            key = template_key(template)
            if key not in events:
                raise ConfigError(
                    f"{config.source}: no events given for {template.label}; expected one "
                    "entry per template of the configuration (analysis.io.read_events)"
                )
            r = region_index[key[0]]
            fixed = tuple(cut for cut in template.region.cuts if not cut.trainable)
            passing[key] = hard_cut_mask(events[key], fixed) if fixed else None
            observable = _selected(events[key].observable, passing[key]).to(dtype)
            for group_region, other, members in groups:
                if group_region == r and torch.equal(other, observable):
                    members.append(j)
                    break
            else:
                groups.append((r, observable, [j]))
        slots: dict[int, _TemplateSlot] = {}
        self._kde_groups: tuple[tuple[str, tuple[int, ...]], ...] = ()
        for r, observable, members in groups:
            # nominal templates first: their sums of w^2 are the group's leading ones
            # (histograms_and_selected_counts variation_sumw2)
            members.sort(key=lambda j: template_key(templates[j])[2] != "nominal")
            order = torch.argsort(observable, stable=True)
            observable_name = f"t{members[0]}_observable"
            observable = observable[order]
            soft = [k for k, cut in enumerate(config.regions[r].cuts) if cut.trainable]
            seen: dict[int, list[tuple[torch.Tensor, str]]] = {k: [] for k in soft}
            # the weights of the group's templates, one row each (kde_histograms takes them so)
            keys = [template_key(templates[j]) for j in members]
            weights_name = f"t{members[0]}_weights"
            weights = [_selected(events[key].weight, passing[key]).to(dtype) for key in keys]
            self.register_buffer(weights_name, torch.stack(weights)[:, order], persistent=False)
            for row, j in enumerate(members):
                template, prefix = templates[j], f"t{j}_"
                key = template_key(template)
                ev, keep = events[key], passing[key]
                self.register_buffer(prefix + "observable", observable, persistent=False)
                names = []
                for k in soft:  # buffer t<j>_x<k>: position k in the region's cuts
                    column = _selected(ev.columns[template.region.cuts[k].variable], keep)
                    column = column.to(dtype)
                    # an equal column of an earlier template of the group is stored once
                    name = next((n for c, n in seen[k] if torch.equal(c, column)), None)
                    if name is None:
                        name = f"{prefix}x{k}"
                        seen[k].append((column, name))
                        self.register_buffer(name, column[order], persistent=False)
                    else:
                        self.register_buffer(f"{prefix}x{k}", getattr(self, name), persistent=False)
                    names.append(name)
                slots[j] = _TemplateSlot(
                    key=key,
                    region=r,
                    prefix=prefix,
                    observable=observable_name,
                    cut_columns=tuple(names),
                    weights=weights_name,
                    row=row,
                )
            self._kde_groups += ((observable_name, tuple(members)),)
        del groups
        self._slots: list[_TemplateSlot] = [slots[j] for j in range(len(templates))]
        # the observables are stored sorted: without NaN (sorted last, but unordered) the KDE
        # takes the order as given instead of checking it every call (kde_histograms ascending)
        self._observables_ascending = all(
            bool(torch.isfinite(getattr(self, name)).all()) for name, _ in self._kde_groups
        )
        self._likelihood_structure: tuple[object, Model] | None = None  # see likelihood()
        # per (region, bandwidth): the KDE's kernel values and bookkeeping (_kde_layout)
        self._kde_layouts: dict[tuple[int, float, bool], KDELayout] = {}
        # per template: its events in the bins, their bins and weights (_bin_positions)
        self._bin_index: dict[TemplateKey, _BinnedEvents] = {}

        # temperature scale per trainable cut: spread on the nominal prediction events of its
        # region (of every region that shares it) that pass the region's fixed cuts; a fixed cut
        # is not softened: its scale is 0 (temperature 0, the boolean cut it is)
        pooled: dict[str, list[tuple[Events, torch.Tensor | None]]] = {
            name: [] for name in self.cut_names
        }
        for region in config.regions:
            nominal = [(region.name, s.name, "nominal") for s in config.samples_in(region)]
            for cut in region.cuts:
                pooled[cut.name] += [(events[key], passing[key]) for key in nominal]
        spreads = []
        for cut in cuts:
            if not cut.trainable:
                spreads.append(torch.zeros((), dtype=dtype))
                continue
            x = torch.cat(
                [_selected(ev.columns[cut.variable], keep) for ev, keep in pooled[cut.name]]
            )
            w = torch.cat([_selected(ev.weight, keep) for ev, keep in pooled[cut.name]])
            try:
                spreads.append(self._column_spread(x.to(dtype), w.to(dtype).abs()))
            except DataError as err:
                raise DataError(
                    f"{config.source}: cut '{cut.name}': {err} (the nominal prediction events "
                    "of its region(s) that pass the fixed cuts)"
                ) from None
        del passing, pooled
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
        ``c = low + (high - low) sigmoid(u)``; non-trainable ones are ``cut_fixed_values``.
        Each threshold has one source (``u`` or the buffer); this is computed from them."""
        if self.cut_parameters.numel() == 0:
            return self.cut_fixed_values
        index = self.cut_trainable_index
        bounded = self.cut_low[index] + (self.cut_high[index] - self.cut_low[index]) * (
            torch.sigmoid(self.cut_parameters)
        )
        return torch.cat([self.cut_fixed_values, bounded])[self.cut_order]

    def cut_values(self) -> dict[str, float]:
        """Cut name -> threshold, all cuts (the format of ``cuts.json``)."""
        with torch.no_grad():
            values = self.thresholds().tolist()
        return dict(zip(self.cut_names, values, strict=True))

    def set_cut_values(self, values: Mapping[str, float]) -> None:
        """Set thresholds from ``cuts.json``-style ``values`` (a subset of the cuts is fine).

        A trainable cut's ``u`` is set to ``logit`` of its position in the bounds (a value on a
        bound is nudged inside, see the module docstring). A non-trainable cut is a selection
        applied when the pipeline was built (its failing events are not stored): it may be
        given at its current value (``cut_values()`` of this pipeline, or the configured value,
        compared in the pipeline's dtype), as a whole ``cuts.json`` has it, and any other value
        is refused; build a new pipeline from ``config.with_cut_values(...)`` to move it.
        Raises ConfigError for an unknown name, a value outside the Bounds or a moved fixed
        cut, before changing anything.
        """
        index = {name: k for k, name in enumerate(self.cut_names)}
        fixed = dict(zip(self._fixed_cut_names(), self.cut_fixed_values, strict=True))
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
            current = fixed.get(name)
            if current is not None and float(current.new_tensor(float(value))) != float(current):
                raise ConfigError(
                    f"cut '{name}' is not trainable (Trainable: false): it is a selection applied "
                    f"when the pipeline was built, at {float(current)!r}, and cannot be moved to "
                    f"{value!r}; build a new pipeline from config.with_cut_values(...) instead"
                )
        with torch.no_grad():
            current = self.thresholds().clone()
            for name, value in values.items():
                current[index[name]] = float(value)
            self.cut_fixed_values.copy_(current[~self.cut_trainable])
            self.cut_parameters.copy_(self._unconstrained(current)[self.cut_trainable])

    def _fixed_cut_names(self) -> tuple[str, ...]:
        """The non-trainable cuts in config order (the entries of ``cut_fixed_values``)."""
        return tuple(cut.name for cut in self._cuts if not cut.trainable)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """``load_state_dict``: a state whose ``cut_fixed_values`` differ from this pipeline's
        is refused (``RuntimeError`` from ``load_state_dict``; the fixed cuts were applied when
        the pipeline was built, so the stored events belong to these values) and the buffer is
        left as it is."""
        key = prefix + "cut_fixed_values"
        given = state_dict.get(key)
        if isinstance(given, torch.Tensor) and not (
            given.shape == self.cut_fixed_values.shape
            and torch.equal(given.to(self.cut_fixed_values), self.cut_fixed_values)
        ):
            error_msgs.append(
                f"{key}: the state's non-trainable cut values {given.tolist()} differ from "
                f"{self.cut_fixed_values.tolist()}, the selection this pipeline was built with "
                f"({', '.join(self._fixed_cut_names())})"
            )
            state_dict = {**state_dict, key: self.cut_fixed_values}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _column_spread(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The temperature scale of a cut from its column ``x`` and ``|w|`` of the events at
        construction (:func:`~analysis.selection.column_spread`); a seam for
        :class:`analysis.distributed.DistributedPipeline`, which measures it on all ranks'
        events."""
        return column_spread(x, weights)

    def synchronize_gradients(self) -> None:
        """Called after the backward pass, before the optimizer step: nothing to do in one
        process (:class:`analysis.distributed.DistributedPipeline` sums the ranks' shares)."""

    def temperatures(self, tau: float | torch.Tensor) -> torch.Tensor:
        """Cut temperatures in the cut variables' units, ``tau * spread`` per cut (0 for a
        non-trainable cut: it is applied as a boolean cut)."""
        return tau * self.cut_spread

    def _cut_temperatures(self, tau: float | torch.Tensor) -> list[float] | list[torch.Tensor]:
        """:meth:`temperatures` as one entry per cut, as :func:`selection_weights` takes them.

        ``tau = 0`` (a number): ``0.0`` for every cut (boolean cuts). Otherwise ``tau * spread_k``:
        as Python floats when ``tau`` is a number and the buffers are float64 (the number path of
        :func:`~analysis.selection.selection_weights` computes the slopes ``s / tau_k`` on the
        host, with the same float64 values as its tensor path, in fewer tensor operations), else
        as 0-d tensors (float32: the tensor path computes ``s / tau_k`` in float32; a tensor
        ``tau`` keeps its graph).
        """
        if not isinstance(tau, torch.Tensor) and tau == 0:
            return [0.0] * len(self.cut_names)
        taus = self.temperatures(tau)
        if not isinstance(tau, torch.Tensor) and taus.dtype == torch.float64:
            return cast(list[float], taus.tolist())
        return list(taus.unbind())

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
        return self.histograms_and_selected_counts(tau, bandwidth, ())[0]

    def histograms_and_selected_counts(
        self,
        tau: float | torch.Tensor,
        bandwidth: float | torch.Tensor,
        keys: Sequence[TemplateKey],
        *,
        variation_sumw2: bool = True,
    ) -> tuple[dict[TemplateKey, Histogram], dict[TemplateKey, Histogram]]:
        """``(histograms(tau, bandwidth), selected_counts(tau, keys))`` from one evaluation of
        the soft cuts: the selected counts (the MC-statistics guard's input) take the selection
        weights of the events inside the bins from those the histograms computed (the same
        numbers as :meth:`selected_counts` computes on its own, in one autograd node and one
        pass over the events instead of two).

        ``variation_sumw2=False`` leaves out the sums of w^2 of the systematic variations
        (their ``Histogram.sumw2`` is None): the workspace takes the ``staterror`` from the
        nominal templates only (:func:`analysis.workspace.build_spec`), and the variations'
        sums of squares would cost as much as their yields (``sumw2_rows`` of
        :func:`~analysis.histograms.kde_histograms`).
        """
        _check_knob("tau", tau)
        _check_knob("bandwidth", bandwidth)
        thresholds = self.thresholds().unbind()  # one 0-d view per cut, indexed once
        taus = self._cut_temperatures(tau)

        # per region: KDE width h, window K (kde_reach) and the range of observable values whose
        # kernel reaches a bin, [e_0 - m, e_B + m] with m = 1.001 k h, k the kernel's truncation
        # (KDE_TAIL_CUTOFF; the 0.1% is far above rounding): events outside put exactly 0 into
        # every bin, and have zero gradient
        regions = {self._slots[members[0]].region for _, members in self._kde_groups}
        widths, reach, limits = {}, {}, {}
        for r in regions:
            edges = getattr(self, f"edges{r}")
            widths[r] = bandwidth * getattr(self, f"bin_width{r}")
            reach[r] = kde_reach(edges, widths[r], edges.dtype)
            margin = (1.001 * KDE_TAIL_CUTOFF[edges.dtype]) * widths[r]
            limits[r] = torch.stack([edges[0] - margin, edges[-1] + margin]).detach()
        # events sorted by the observable: the events in range are one slice per group
        bounds = torch.stack(
            [
                torch.searchsorted(getattr(self, name), limits[self._slots[members[0]].region])
                for name, members in self._kde_groups
            ]
        ).tolist()

        # selection weights prod_k sigmoid(s_k (x_k - c_k) / tau_k) over the trainable cuts k
        # (the fixed ones were applied at construction; a region without a trainable cut keeps
        # the plain weights), once per distinct set of cut columns (the templates of a group
        # share theirs) and one selection_weights call (one autograd node) per region
        selections: dict[tuple[str, ...], torch.Tensor] = {}  # cut columns -> weights
        pending: dict[int, dict[tuple[str, ...], list[torch.Tensor]]] = {}
        for (_, members), (lo, hi) in zip(self._kde_groups, bounds, strict=True):
            for slot in (self._slots[j] for j in members):
                if slot.cut_columns and hi > lo:  # no event in reach: nothing to select
                    columns = [getattr(self, name)[lo:hi] for name in slot.cut_columns]
                    pending.setdefault(slot.region, {}).setdefault(slot.cut_columns, columns)
        for r, sets in pending.items():
            soft, directions = self._soft_cuts[r]
            selected = selection_weights(
                list(sets.values()),
                [thresholds[k] for k in soft],
                [taus[k] for k in soft],
                directions,
            )
            selections.update(zip(sets, selected, strict=True))

        # the groups of a region share edges and width: one kde_histograms call per region;
        # the templates of a group that share their cut columns (usually all) pass the stored
        # weights and the selection as its factor (kde_histograms factors: no products formed)
        per_region: dict[int, list] = {}  # region -> [(slots, values, weights, factor, S)]
        for (observable, members), (lo, hi) in zip(self._kde_groups, bounds, strict=True):
            slots = [self._slots[j] for j in members]
            factors = [selections.get(slot.cut_columns) for slot in slots]
            factor = factors[0]
            if all(f is factor for f in factors):
                weights = getattr(self, f"t{members[0]}_weights")[:, lo:hi]
            else:
                factor = None
                weights = torch.stack(
                    [
                        self._weight(slot)[lo:hi] * (1.0 if f is None else f)
                        for slot, f in zip(slots, factors, strict=True)
                    ]
                )
            values = getattr(self, observable)[lo:hi]
            # the sums of w^2 of the group's leading rows: all, or its nominal templates
            squared = sum(1 for slot in slots if variation_sumw2 or slot.key[2] == "nominal")
            per_region.setdefault(slots[0].region, []).append(
                (slots, values, weights, factor, squared)
            )
        out = {}
        for r, groups in per_region.items():
            edges = getattr(self, f"edges{r}")
            hists = kde_histograms(
                [(values, weights) for _, values, weights, *_ in groups],
                edges,
                widths[r],
                reach=reach[r],
                ascending=True if self._observables_ascending else None,
                layout=self._kde_layout(r, bandwidth, variation_sumw2),
                factors=[factor for *_, factor, _ in groups],
                sumw2_rows=[squared for *_, squared in groups],
            )
            for (slots, *_), hist in zip(groups, hists, strict=True):
                sumw2 = cast(torch.Tensor, hist.sumw2)  # (S, B)
                for i, slot in enumerate(slots):
                    squared_i = sumw2[i] if i < sumw2.shape[0] else None
                    out[slot.key] = Histogram(edges, hist.yields[i], squared_i)

        # the selected counts of keys: the selection weights of the events in the bins, a part
        # of the slice [lo, hi) that the histograms used (its margin around the bins is >= 0)
        counts = {}
        if keys:
            slots_by_key = {slot.key: slot for slot in self._slots}
            starts = {
                self._slots[j].key: lo
                for (_, members), (lo, _) in zip(self._kde_groups, bounds, strict=True)
                for j in members
            }
            for key in keys:
                slot = slots_by_key[key]
                selection = selections.get(slot.cut_columns)  # its events lo .. hi-1
                counts[key] = self._selected_count(slot, selection, starts[key])
        return {slot.key: out[slot.key] for slot in self._slots}, counts

    def _kde_layout(
        self, region: int, bandwidth: float | torch.Tensor, variation_sumw2: bool
    ) -> KDELayout | None:
        """The :class:`~analysis.histograms.KDELayout` of ``region`` at ``bandwidth`` (the
        events in reach and the kernel values depend on nothing else: the stored observables
        and edges do not change) and the sums of squares asked for; None for a bandwidth that
        needs a gradient (its kernel changes with it).

        A region keeps one layout of each kind: smoothing (``bandwidth > 0``, the relaxed
        steps, with kernel values) and hard (``bandwidth = 0``, the hard evaluations, none).
        A new one replaces the region's layout of its kind, which is dropped before the new
        one is filled, so that the kernel values of the new bandwidth level of an annealed
        run reuse the memory of the old ones (instead of fresh memory, page by page, with
        both alive)."""
        if isinstance(bandwidth, torch.Tensor):
            if bandwidth.requires_grad:
                return None
            bandwidth = float(bandwidth)
        key = (region, float(bandwidth), variation_sumw2)
        layout = self._kde_layouts.get(key)
        if layout is None:
            hard = key[1] == 0.0
            for old in [k for k in self._kde_layouts if k[0] == region and (k[1] == 0.0) == hard]:
                del self._kde_layouts[old]
            layout = self._kde_layouts[key] = KDELayout()
        return layout

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        # .to(), .double(), ...: the kept kernel values and bins are of the old device and dtype
        self._kde_layouts, self._bin_index = {}, {}
        return super()._apply(fn, *args, **kwargs)

    def selected_counts(
        self, tau: float | torch.Tensor, keys: Sequence[TemplateKey]
    ) -> dict[TemplateKey, Histogram]:
        r"""Soft-cut sums of the events of the templates ``keys`` in the ordinary bins (no KDE):

        .. math:: n_b = \sum_{i \in b} w_i s_i, \qquad
                  v_b = \sum_{i \in b} w_i^2 s_i,

        ``s_i`` the event's selection weight (the product of the soft cuts at temperature
        ``tau``), bins half-open ``[e_b, e_{b+1})`` as :func:`analysis.histograms.hard_histogram`.
        Read ``s_i`` as the probability that event ``i`` passes the cuts: then ``n_b`` and
        ``v_b`` are the expected yield and the expected sum of ``w^2`` of the hard selection,
        and ``tau = 0`` gives exactly the hard histogram's yields and sum of ``w^2``. (The
        relaxed histograms' ``sum (w s)^2`` would count a half-passing event as a whole one in
        ``n_eff = n^2 / v``, which does not depend on the scale of the weights.) Returned as
        ``Histogram(edges, n, v)``, differentiable in the thresholds (and ``tau``); used for
        the MC-statistics guard (:mod:`analysis.mc_statistics`).
        """
        _check_knob("tau", tau)
        thresholds = self.thresholds().unbind()
        taus = self._cut_temperatures(tau)
        slots = {slot.key: slot for slot in self._slots}
        out = {}
        for key in keys:
            slot = slots[key]
            binned = self._bin_positions(slot)
            selected = None
            lo, hi = binned.first, binned.last
            if slot.cut_columns and hi > lo:  # (no event in the bins: nothing to select)
                soft, directions = self._soft_cuts[slot.region]
                (selected,) = selection_weights(
                    [[getattr(self, name)[lo:hi] for name in slot.cut_columns]],
                    [thresholds[k] for k in soft],
                    [taus[k] for k in soft],
                    directions,
                )
            out[key] = self._selected_count(slot, selected, lo)
        return out

    def _bin_positions(self, slot: _TemplateSlot) -> _BinnedEvents:
        """The template's events inside the bins (:class:`_BinnedEvents`). Depends on the
        stored observable, weights and edges only, so it is computed once per template (and
        again after ``.to()``)."""
        if slot.key not in self._bin_index:
            edges = getattr(self, f"edges{slot.region}")
            positions = torch.searchsorted(getattr(self, slot.observable), edges)
            first, last = positions[[0, -1]].tolist()
            numbers = torch.arange(len(edges) - 1, device=edges.device)
            bins = torch.repeat_interleave(numbers, torch.diff(positions))
            weight = self._weight(slot)[first:last]
            self._bin_index[slot.key] = _BinnedEvents(
                first, last, bins, torch.diff(positions).tolist(), torch.stack([weight, weight**2])
            )
        return self._bin_index[slot.key]

    def _selected_count(
        self, slot: _TemplateSlot, selected: torch.Tensor | None, start: int
    ) -> Histogram:
        """:meth:`selected_counts` of one template from the selection weights ``selected`` of
        its events ``start ..`` (a range that holds its events in the bins,
        :meth:`_bin_positions`; None: no cuts)."""
        binned = self._bin_positions(slot)
        if selected is None:
            selected, start = torch.ones_like(binned.weights[0]), binned.first
        n, v = _BinSums.apply(selected, binned, start)
        return Histogram(getattr(self, f"edges{slot.region}"), n, v)

    # ------------------------------------------------------------------ likelihood
    def workspace_spec(self, tau: float | torch.Tensor, bandwidth: float | torch.Tensor) -> dict:
        """The pyhf workspace structure (tensor leaves) of the soft histograms
        (:meth:`_spec`), so ``tau = 0``, ``bandwidth = 0`` gives the hard workspace."""
        return self._spec(self.histograms(tau, bandwidth))

    def _spec(self, histograms: Mapping[TemplateKey, Histogram]) -> dict:
        """The workspace spec of ``histograms``: converted to float64 (DESIGN.md: likelihoods run
        in float64) and passed to :func:`analysis.workspace.build_spec` (cabinetry semantics;
        bins without background prediction floored), exactly as for the hard workspace."""
        return workspace_builder.build_spec(
            self.config, {key: _as_float64(h) for key, h in histograms.items()}
        )

    def likelihood(self, histograms: Mapping[TemplateKey, Histogram]) -> Model:
        """The differentiable HistFactory model of ``histograms`` (float64).

        ``histograms``: ``{(region, sample, variation): Histogram}`` of every template, as
        :meth:`histograms` returns them. They are converted to float64 and turned into the
        workspace spec by :func:`analysis.workspace.build_spec` (floors, staterror from the sum
        of w^2, normsys and histosys from the variations; see :meth:`workspace_spec`), and the
        model is that spec's (its first measurement's) :class:`~analysis.likelihood.Model`,
        equal number for number to ``Workspace(spec).model(dtype=float64)``. Gradients flow from
        the model's outputs back to whatever the histograms were computed from
        (:attr:`cut_parameters`).

        The model's structure (layout, parameter sets, index tables) depends only on the
        configuration and the bin counts, so it is built once: the first call validates the
        spec (:meth:`Workspace.from_spec`: pyhf schema, names, lengths) and builds the model
        from scratch; later calls whose spec has the same structure (keys, names, types and
        tensor shapes; not the numbers) and device feed the new spec's numbers into that
        structure (:meth:`Model.with_spec_values`). A spec of another structure is validated
        and built from scratch again, and its structure kept instead.

        The model's fits find their minima with the numpy backend where it is faster
        (:meth:`Model.with_numpy_fits`: small models on the CPU); values and gradients are
        the model's own.
        """
        return self._likelihood(histograms)[0]

    def _likelihood(self, histograms: Mapping[TemplateKey, Histogram]) -> tuple[Model, dict]:
        """:meth:`likelihood` and the workspace spec it was built from."""
        spec = self._spec(histograms)
        source = f"{self.config.source} (pipeline)"
        device = self.cut_low.device
        key = (_structure(spec), device)
        if self._likelihood_structure is not None and self._likelihood_structure[0] == key:
            model_spec = Workspace(spec=spec, source=source).model_spec()
            model = self._likelihood_structure[1].with_spec_values(model_spec)
            return model.with_numpy_fits(), spec
        workspace = Workspace.from_spec(spec, source=source)  # validates: the first call
        model = workspace.model(dtype=torch.float64, device=device)
        # the structure kept is a detached copy, which holds no graph of this call
        template = model.with_spec_values(_detached(workspace.model_spec()))
        self._likelihood_structure = (key, template)
        return model.with_numpy_fits(), spec

    def model(
        self, tau: float | torch.Tensor, bandwidth: float | torch.Tensor
    ) -> tuple[Model, torch.Tensor]:
        """The differentiable HistFactory model and its observed data (main + auxiliary).

        ``likelihood(histograms(tau, bandwidth))`` and the data of its spec: the data
        sample's histograms in the model's channel order, then ``model.auxdata``
        (:meth:`Workspace.data`). The objectives use Asimov data of the model and ignore
        ``data``; an optimization step needs only :meth:`histograms` and :meth:`likelihood`.
        """
        model, spec = self._likelihood(self.histograms(tau, bandwidth))
        source = f"{self.config.source} (pipeline)"
        return model, Workspace(spec=spec, source=source).data(model)

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
        """Number of stored events per template: those that pass the region's Filter and its
        fixed (non-trainable) cuts."""
        return {s.key: int(self._weight(s).shape[0]) for s in self._slots}

    def _weight(self, slot: _TemplateSlot) -> torch.Tensor:
        """The weights of the template of ``slot`` (sorted like its group's observable)."""
        return cast(torch.Tensor, getattr(self, slot.weights))[slot.row]


@dataclass(frozen=True)
class _BinnedEvents:
    """A template's events inside the bins: its (sorted) events ``first .. last-1``, their bin
    numbers ``bins`` (bin ``b``: ``e_b <= y < e_{b+1}``), the number of events per bin
    ``lengths`` and their weights ``[w; w^2]`` ``(2, last - first)``."""

    first: int
    last: int
    bins: torch.Tensor
    lengths: list[int]
    weights: torch.Tensor


class _BinSums(torch.autograd.Function):
    """``(n, v)`` per bin, ``n_b = sum_{i in b} w_i s_i`` and ``v_b = sum_{i in b} w_i^2 s_i``,
    of the events of :class:`_BinnedEvents` with selection weights ``s`` (given for the events
    ``start ..``, a range around them: the gradient, ``dL/ds_i = g_{b(i)} w_i + g'_{b(i)}
    w_i^2``, has the shape of ``s`` and needs no zero-padded slice of autograd's).

    The events are sorted by bin: on CPU each bin is one matrix-vector product of its
    ``[w; w^2]`` and ``s`` (forward and backward), as the KDE sums its sorted bins; a scatter
    (``index_add``) of sorted events serialises on repeated additions to the same bin, and
    composing it from autograd's operations costs several passes over the events more. Other
    devices scatter (``index_add``) and gather (``index_select``)."""

    @staticmethod
    def forward(ctx, selection, binned, start):
        ctx.binned, ctx.start, ctx.size = binned, start, selection.shape[0]
        weights = binned.weights
        selection = selection[binned.first - start : binned.last - start]
        if selection.device.type != "cpu":
            products = weights * selection
            zeros = weights.new_zeros((2, len(binned.lengths)))
            return tuple(zeros.index_add(1, binned.bins, products))
        out = weights.new_empty((len(binned.lengths), 2))
        parts = zip(
            weights.split_with_sizes(binned.lengths, 1),
            selection.split_with_sizes(binned.lengths),
            out,
            strict=True,
        )
        for w, s, sums in parts:
            torch.mv(w, s, out=sums)
        return tuple(out.t())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_n, grad_v):
        binned = ctx.binned
        weights, grad = binned.weights, torch.stack([grad_n, grad_v])  # (2, B)
        out = weights.new_empty(ctx.size)
        lo, hi = binned.first - ctx.start, binned.last - ctx.start
        out[:lo], out[hi:] = 0.0, 0.0
        inside = out[lo:hi]
        if weights.device.type != "cpu":
            torch.sum(weights * grad.index_select(1, binned.bins), 0, out=inside)
            return out, None, None
        parts = zip(
            weights.split_with_sizes(binned.lengths, 1),
            inside.split_with_sizes(binned.lengths),
            grad.t(),
            strict=True,
        )
        for w, g_s, g in parts:
            torch.mv(w.t(), g, out=g_s)
        return out, None, None


def _structure(value: object) -> object:
    """The structure of a spec (hashable, comparable): containers, keys, strings and the shapes
    of tensors; numbers count as their type only. (The exact types of a spec's nodes first, then
    the same cases by ``isinstance`` for other types: ``isinstance`` with the abstract
    ``Mapping`` or with ``torch.Tensor``, whose metaclass has its own check, costs ~1 us, and a
    spec has hundreds of nodes per step; measured 0.24 ms per spec against 0.44 ms.)"""
    kind = type(value)
    if kind is dict:
        return tuple((key, _structure(item)) for key, item in cast(dict, value).items())
    if kind is list or kind is tuple:
        return ("list", *(_structure(item) for item in cast(list, value)))
    if kind is str or value is None or kind is bool:
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape))
    if isinstance(value, Mapping):
        return tuple((key, _structure(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ("list", *(_structure(item) for item in value))
    if isinstance(value, str):
        return value
    return kind.__name__


def _detached(value: Any) -> Any:
    """A copy of a nested spec (dicts and lists copied) with every tensor detached."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, Mapping):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_detached(item) for item in value]
    return value


def _check_knob(name: str, value: float | torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) and not (0 <= value < math.inf):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _selected(column: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The entries of ``column`` where ``keep`` (a boolean mask) is True; all of it for None."""
    return column if keep is None else column[keep]


def _as_float64(hist: Histogram) -> Histogram:
    sumw2 = None if hist.sumw2 is None else hist.sumw2.to(torch.float64)
    return Histogram(hist.edges, hist.yields.to(torch.float64), sumw2)
