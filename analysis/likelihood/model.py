r"""The HistFactory probability model in torch, with pyhf's semantics, names and order.

.. math::

    L(n, a \mid \theta) = \prod_{b} \mathrm{Pois}(n_b \mid \lambda_b(\theta))
        \prod_{j \in \mathrm{normal}} \mathrm{Gaus}(a_j \mid \theta_j, \sigma_j)
        \prod_{k \in \mathrm{poisson}} \mathrm{Pois}(a_k \mid \theta_k \tau_k)

with :math:`\lambda_b = \sum_c \big(\prod_{\mathrm{mult}} f\big)\,
\big(\nu^0_{cb} + \sum_{\mathrm{add}} \delta_{cb}\big)` summed over the samples ``c`` of bin
``b``'s channel (pyhf's "Mathematical grammar", Cranmer et al. CERN-OPEN-2012-016). Poisson
terms use the continuous extension :math:`n\log\lambda - \lambda - \log\Gamma(n+1)`; every
normalisation constant is kept, so :meth:`Model.logpdf` equals ``pyhf.Model.logpdf``.

Conventions (all pyhf's): channels sorted by name; parameter sets registered modifier type by
type in the registry's (alphabetical) order, within a type in order of first use walking
channels, samples and modifiers sorted by name (``staterror`` sets sorted by name); data is
``[main bins in channel order] + [auxdata in parameter order]``.

Batching: every method takes ``pars`` of shape ``(..., P)`` and ``data`` of shape
``(..., nmain + naux)``; leading dimensions broadcast against each other, so ``(B, 1, P)``
parameters with ``(D, N)`` datasets give ``(B, D)`` results.

Gradients: a model built from spec tensors that require grad holds the graph from those
tensors to its internal constants (templates, constraint widths, aux data). Outputs of
:meth:`logpdf` etc. are differentiable in ``pars``, ``data`` and those tensors. As with any
tensor computed once, back-propagate through one model's constants once per build (or pass
``retain_graph=True``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch

from analysis.errors import ConfigError, DataError
from analysis.likelihood import modifiers as modifier_registry
from analysis.likelihood._tensors import as_tensor, broadcast_shapes, to_plain
from analysis.likelihood.distributions import poisson_logpdf
from analysis.likelihood.modifiers import Block, Layout, Modifier
from analysis.likelihood.modifiers.base import Factor, SlotTable, gather_product, with_ones
from analysis.likelihood.parameters import ParamSet, merge

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# pyhf.Model's default when no modifier_settings are given (also cabinetry's)
#: interpolation codes with a kink at alpha = 0 (piecewise linear / exponential)
KINKED_CODES = frozenset({"code0", "code1"})
DEFAULT_MODIFIER_SETTINGS = {
    "normsys": {"interpcode": "code4"},
    "histosys": {"interpcode": "code4p"},
}


class Model:
    """A HistFactory model built from a pyhf *model* spec (``channels`` and ``parameters``).

    Usually made by :meth:`analysis.likelihood.Workspace.model`. ``spec`` is assumed valid
    against pyhf's schema (the workspace validates it); numbers in it may be tensors.

    Args:
        spec: ``{"channels": [...], "parameters": [...]}`` (the measurement's parameters).
        poi_name: the parameter of interest, or ``None`` for a model without one.
        modifier_settings: pyhf's ``modifier_settings``, e.g.
            ``{"normsys": {"interpcode": "code1"}}``. ``None`` means pyhf's model default
            ``{"normsys": code4, "histosys": code4p}``; a type missing from a given dict uses
            its own default (normsys ``code1``, histosys ``code0``), as in pyhf.
        dtype, device: of every tensor the model makes and returns.
        source: name of the workspace, used in error messages.
    """

    def __init__(
        self,
        spec: Mapping[str, Any],
        *,
        poi_name: str | None = None,
        modifier_settings: Mapping[str, Mapping[str, Any]] | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        source: str = "model",
    ) -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self.source = source
        settings = _check_settings(
            DEFAULT_MODIFIER_SETTINGS if modifier_settings is None else modifier_settings, source
        )
        self.modifier_settings = types.MappingProxyType(settings)
        # structure: what the spec's names, types and bin counts decide (kept by
        # with_spec_values); then the numbers (_set_values, redone by with_spec_values)
        blocks, positions, uses, layout = self._layout(spec)
        self._cell_layout = layout
        self._spec_key = _spec_key(spec)
        self._block_positions = positions
        self._block_uses = uses
        self.channels: tuple[str, ...] = tuple(layout.channel_bins)
        self.channel_slices: Mapping[str, slice] = types.MappingProxyType(dict(layout.channel_bins))
        self.channel_nbins: Mapping[str, int] = types.MappingProxyType(
            {c: s.stop - s.start for c, s in layout.channel_bins.items()}
        )
        self.samples: tuple[str, ...] = tuple(sorted({b.sample for b in blocks}))
        self.nmain = layout.nbins
        self._spec = spec  # the numbers, for with_numpy_fits
        self._set_values(spec, blocks)
        self._build_factor_table(layout, blocks)
        self._cell_bin = torch.cat(
            [torch.arange(b.bins.start, b.bins.stop, device=self.device) for b in blocks]
        )
        self._cell_block = torch.cat(
            [torch.full((b.nbins,), b.index, device=self.device) for b in blocks]
        )
        sample_of = {s: i for i, s in enumerate(self.samples)}
        self._cell_sample = torch.cat(
            [torch.full((b.nbins,), sample_of[b.sample], device=self.device) for b in blocks]
        )
        self.poi_name: str | None = None
        self.poi_index: int | None = None
        if poi_name is not None and poi_name != "":
            self._set_poi(poi_name)

    def with_spec_values(self, spec: Mapping[str, Any]) -> Model:
        r"""The model of ``spec``, a spec of this model's structure, built on this structure.

        ``spec`` must have the channels, samples and modifiers (names and types) of the spec
        this model was built from, in the same order, and the same bin counts; only its numbers
        may differ (yields, modifier data, the measurement's parameter settings). The result
        equals ``Model(spec, ...)`` with this model's POI, settings, dtype, device and source,
        number for number: everything the numbers decide is recomputed from ``spec`` by the
        code that ``__init__`` runs (the nominal yields; staterror's
        :math:`\sigma_b = \sqrt{\sum_c \delta_{cb}^2} / \sum_c \nu_{cb}` and its fixed bins;
        shapesys' :math:`\tau_b = (\nu_b / \delta_b)^2`; the histosys deltas
        :math:`\Delta^\pm`; the normsys factors and code4 coefficients; the parameter sets
        merged with the measurement's settings, whose names must come out as this model's;
        the constraint terms), while the structure is shared with this model, not rebuilt:
        the channel and block layout with the modifier registry lookups, the slot tables of the
        factor products, the cell index tables and the POI (and the index tables of
        :mod:`analysis.likelihood.derivatives`, once computed for this model).

        Tensors in ``spec`` keep their autograd graph: gradients of the new model's outputs
        reach them, and nothing of this model's graph is used. Raises ConfigError when the
        structure differs (build a new :class:`Model` then) or when the numbers are invalid as
        ``__init__`` would; ValueError for a model batched by :meth:`with_sample_yields`.
        """
        if self.nominal_batch != 1:
            raise ValueError("with_spec_values needs a model not batched over nominal yields")
        if _spec_key(spec) != self._spec_key:
            raise ConfigError(
                f"{self.source}: the spec's channels, samples or modifiers differ from those "
                "of the model's structure; build a new Model"
            )
        model = copy.copy(self)  # shares the structure; _set_values replaces every number
        model._spec, model.numpy_fits = spec, None
        blocks = []
        for block, (ci, si) in zip(self._blocks, self._block_positions, strict=True):
            samples = spec["channels"][ci]["samples"]
            nominal = self._nominal(samples[si], block.path, block.nbins, block.channel)
            blocks.append(dataclasses.replace(block, nominal=nominal))
        model._set_values(spec, blocks)
        if model.par_names != self.par_names:  # fixed by the structure
            raise ConfigError(f"{self.source}: the spec's parameters differ from the model's")
        return model

    #: whether a fit of :func:`analysis.inference.mle.minimize` that does not converge raises
    #: :class:`~analysis.fit.FitError` (True, :meth:`with_strict_fits`) or logs a warning
    strict_fits: bool = False

    def with_strict_fits(self) -> Model:
        """This model, whose fits raise :class:`~analysis.fit.FitError` when one of them does
        not converge, instead of a warning (pyhf's fits raise too): for a caller that must not
        use the value of an unconverged fit. A fixed-POI fit that stops short of its minimum
        leaves twice its NLL too high, so ``q0`` and the significance come out too large."""
        model = copy.copy(self)
        model.strict_fits = True
        return model

    #: a :class:`~analysis.numpy_backend.model.NumpyModel` of this model's numbers whose Newton
    #: fits find the minima of :func:`analysis.inference.mle.minimize`, or None (torch's own
    #: fits); set by :meth:`with_numpy_fits`, dropped by every copy with other numbers
    numpy_fits: Any = None

    def with_numpy_fits(self) -> Model:
        """This model, whose fits (:func:`analysis.inference.mle.minimize`) find their minima with
        the numpy backend (:func:`analysis.numpy_backend.fit.minimize`: the same projected
        Newton algorithm, the same starts and tolerance) on a
        :class:`~analysis.numpy_backend.model.NumpyModel` of the same spec. Everything else
        stays here: the minimum's value and its gradient are this model's twice NLL at the
        minimum found (the envelope theorem, as after a torch fit), the parameters' implicit
        gradient uses the numpy fit's Hessian (the same exact Hessian).

        Why: a small model's Newton iteration is a few hundred tiny tensor operations, whose
        dispatch costs more than numpy's arithmetic (see
        :data:`~analysis.numpy_backend.FIT_MAX_PARAMETERS`). Returns ``self`` unchanged where
        that does not hold or apply: not on the CPU, not float64, batched over nominal yields,
        more than ``FIT_MAX_PARAMETERS`` parameters, kinked parameters (histosys code0, normsys
        code1: a minimum on a kink has two one-sided Hessians, and which one a fit ends on is
        decided by rounding), or a spec that the numpy backend does not cover
        (:class:`~analysis.numpy_backend.Unsupported`).
        """
        from analysis.numpy_backend import FIT_MAX_PARAMETERS, Unsupported
        from analysis.numpy_backend.model import NumpyModel

        if (
            self.device.type != "cpu"
            or self.dtype != torch.float64
            or self.nominal_batch != 1
            or self.npars > FIT_MAX_PARAMETERS
            or bool(self.kinked_parameters().any())
        ):
            return self
        try:
            twin = NumpyModel(
                to_plain(self._spec),
                poi_name=self.poi_name,
                modifier_settings=dict(self.modifier_settings),
                source=self.source,
            )
        except Unsupported:
            return self
        if twin.par_names != self.par_names:
            return self
        model = copy.copy(self)
        model.numpy_fits = twin
        return model

    # ------------------------------------------------------------------ build helpers
    def _set_values(self, spec: Mapping[str, Any], blocks: list[Block]) -> None:
        """Everything the numbers of ``spec`` decide, on the structure of this model (its
        layout and block uses): modifiers, parameter sets (with the measurement's settings),
        parameter slices, nominal column and constraint terms. Run by ``__init__`` and, for a
        new spec of the same structure, by :meth:`with_spec_values`."""
        settings, source = self.modifier_settings, self.source
        self._blocks = tuple(blocks)
        # 1. modifiers collect their data in pyhf's walk order
        mods: dict[str, Modifier] = {
            name: cls(self._cell_layout, settings.get(name, {}).get("interpcode"))
            for name, cls in modifier_registry.REGISTRY.items()
        }
        channels = spec["channels"]
        for block, (ci, si), block_uses in zip(
            blocks, self._block_positions, self._block_uses, strict=True
        ):
            sample_mods = channels[ci]["samples"][si]["modifiers"]
            for mod_name, mod_type, mi in block_uses:
                data = sample_mods[mi].get("data")
                mods[mod_type].add(mod_name, data, block, f"{block.path}.modifiers[{mi}]")
        self._modifiers = [m for m in mods.values() if m.active]

        # 2. parameter sets, registered type by type (pyhf's order)
        requirements: dict[str, list] = {}
        for mod in self._modifiers:
            for name, req in mod.requirements().items():
                requirements.setdefault(name, []).append((mod.type, req))
        if not requirements:
            raise ConfigError(f"{source}: the model has no parameters (no modifiers)")
        user = self._user_parameters(spec.get("parameters", []) or [])
        self._param_sets: tuple[ParamSet, ...] = tuple(
            merge(name, reqs, user.get(name), source=source, dtype=self.dtype, device=self.device)
            for name, reqs in requirements.items()
        )
        kinked = {m.type for m in self._modifiers if m.interpcode in KINKED_CODES}
        self._kinked_sets = frozenset(
            name for name, reqs in requirements.items() if any(t in kinked for t, _ in reqs)
        )
        slices, names, start = {}, [], 0
        for ps in self._param_sets:
            slices[ps.name] = slice(start, start + ps.n)
            names += ps.names()
            start += ps.n
        self.par_slices: Mapping[str, slice] = types.MappingProxyType(slices)
        self.par_names: tuple[str, ...] = tuple(names)
        self.par_order: tuple[str, ...] = tuple(slices)
        self.npars = start
        for mod in self._modifiers:
            mod.finalize(self.par_slices, self.npars)
        self._additive = [m for m in self._modifiers if m.op == "add"]
        # multiplicative types with their own unit values (rows after x in the block product)
        factors = [cast(Factor, m) for m in self._modifiers if m.op == "multiply"]
        self._unit_factors: list[Factor] = [m for m in factors if not m.on_pars]
        self._nominal_column = torch.cat([b.nominal for b in blocks])[:, None]
        self._build_constraints()

    def _nominal(
        self, sample: Mapping[str, Any], path: str, nbins: int, channel: str
    ) -> torch.Tensor:
        """The nominal yields of a sample, ``(nbins,)``; ConfigError for another shape."""
        nominal = as_tensor(sample["data"], dtype=self.dtype, device=self.device)
        if nominal.ndim != 1 or nominal.shape[0] != nbins:
            raise ConfigError(
                f"{self.source}: {path}: data has {tuple(nominal.shape)} values but "
                f"channel '{channel}' has {nbins} bins"
            )
        return nominal

    def _layout(
        self, spec: Mapping[str, Any]
    ) -> tuple[list[Block], list[tuple[int, int]], list[tuple], Layout]:
        """Blocks (channels in pyhf's order, samples sorted), each block's ``(channel index,
        sample index)`` in ``spec`` and its modifier uses ``(name, type, index)`` in pyhf's walk
        order (sorted by ``(name, type)``; of a repeated shared modifier the last one), and the
        cell layout."""
        channels = spec["channels"]
        order = sorted(range(len(channels)), key=lambda i: channels[i]["name"])
        channel_bins: dict[str, slice] = {}
        blocks: list[Block] = []
        positions: list[tuple[int, int]] = []
        uses: list[tuple] = []
        cells = bins = 0
        for ci in order:
            channel = channels[ci]
            samples = channel["samples"]
            nbins = len(samples[0]["data"])
            nominals = {}
            for si, sample in enumerate(samples):
                path = f"channels[{ci}].samples[{si}]"
                nominals[sample["name"]] = (si, self._nominal(sample, path, nbins, channel["name"]))
            channel_bins[channel["name"]] = slice(bins, bins + nbins)
            for name in sorted(nominals):
                si, nominal = nominals[name]
                path = f"channels[{ci}].samples[{si}]"
                blocks.append(
                    Block(
                        channel=channel["name"],
                        sample=name,
                        index=len(blocks),
                        cells=slice(cells, cells + nbins),
                        bins=slice(bins, bins + nbins),
                        nominal=nominal,
                        path=path,
                    )
                )
                positions.append((ci, si))
                block_mods: dict[tuple[str, str], int] = {}
                for mi, mod in enumerate(samples[si]["modifiers"]):
                    mod_path = f"{path}.modifiers[{mi}]"
                    mod_type = mod.get("type")
                    cls = modifier_registry.get(mod_type, f"{self.source}: {mod_path}")
                    key = (mod["name"], mod_type)
                    if not cls.shared and key in block_mods:
                        raise ConfigError(
                            f"{self.source}: {mod_path}: {mod_type} '{mod['name']}' appears "
                            "twice on one sample"
                        )
                    block_mods[key] = mi  # the last one wins, as in pyhf
                uses.append(tuple((*key, mi) for key, mi in sorted(block_mods.items())))
                cells += nbins
            bins += nbins
        layout = Layout(
            ncells=cells,
            nbins=bins,
            channel_bins=channel_bins,
            dtype=self.dtype,
            device=self.device,
            source=self.source,
        )
        return blocks, positions, uses, layout

    def _build_factor_table(self, layout: Layout, blocks: list[Block]) -> None:
        """Slot tables for all multiplicative types together (one product per call).

        Factors constant over a block (normfactor, lumi, normsys) are multiplied per block,
        rows of ``[x; unit values; 1]``; the cells then multiply their block's product with
        their per-bin parameters (staterror, shapesys, shapefactor), rows of
        ``[x; block products; 1]``.
        """
        block_table = SlotTable(len(blocks))
        cell_table = SlotTable(layout.ncells)
        offset = self.npars
        has_block_factor = [False] * len(blocks)
        for mod in self._modifiers:
            if mod.op != "multiply":
                continue
            mod = cast(Factor, mod)  # the multiplicative types are Factors
            shift = 0 if mod.on_pars else offset
            if not mod.on_pars:  # one of self._unit_factors, in the same order
                offset += mod.n_units
            for block, units in mod.entries:
                if mod.per_block:
                    block_table.put(slice(block.index, block.index + 1), [shift + units])
                    has_block_factor[block.index] = True
                else:
                    cell_table.put(block.cells, [shift + u for u in units])
        self._block_slots = block_table.build(pad=offset, device=self.device)
        for block in blocks:
            if has_block_factor[block.index]:
                cell_table.put(block.cells, [self.npars + block.index] * block.nbins)
        n_block_rows = len(blocks) if self._block_slots.numel() else 0
        self._cell_slots = cell_table.build(pad=self.npars + n_block_rows, device=self.device)

    def _user_parameters(self, parameters: list[Mapping[str, Any]]) -> dict[str, Mapping]:
        user: dict[str, Mapping] = {}
        for entry in parameters:
            if entry["name"] in user:
                raise ConfigError(
                    f"{self.source}: the measurement configures parameter '{entry['name']}' "
                    "more than once"
                )
            user[entry["name"]] = entry
        return user

    def _build_constraints(self) -> None:
        dev, dt = self.device, self.dtype
        aux, aux_par, aux_scale = [], [], []
        gauss_pos, gauss_sigma, pois_pos = [], [], []
        position = 0
        for ps in self._param_sets:
            if ps.constraint is None:
                continue
            first = self.par_slices[ps.name].start
            par_index = list(range(first, first + ps.n))
            positions = list(range(position, position + ps.n))
            position += ps.n
            # constrained sets have auxdata, normal ones sigmas, Poisson ones factors
            aux.append(cast(torch.Tensor, ps.auxdata))
            aux_par += par_index
            if ps.constraint == "normal":
                gauss_pos += positions
                gauss_sigma.append(cast(torch.Tensor, ps.sigmas))
                aux_scale.append(torch.ones(ps.n, dtype=dt, device=dev))
            else:
                pois_pos += positions
                aux_scale.append(cast(torch.Tensor, ps.factors))

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        def cat(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(values) if values else torch.zeros(0, dtype=dt, device=dev)

        self.naux = position
        self.auxdata: torch.Tensor = cat(aux)
        self._aux_par, self._aux_scale = index(aux_par), cat(aux_scale)[:, None]
        # Gaussian terms on all aux entries with 1/sigma = 0 on Poisson ones (z = 0 there)
        inv_sigma = torch.zeros(position, dtype=dt, device=dev)
        log_norm = torch.zeros((), dtype=dt, device=dev)
        self._has_gauss = bool(gauss_pos)
        if gauss_pos:
            sigma = cat(gauss_sigma)
            inv_sigma = inv_sigma.index_put((index(gauss_pos),), 1.0 / sigma)
            log_norm = -(torch.log(sigma) + _LOG_SQRT_2PI).sum()
        self._inv_sigma, self._gauss_log_norm = inv_sigma, log_norm
        self._has_poisson = bool(pois_pos)
        self._pois_mask = torch.zeros(position, dtype=torch.bool, device=dev)
        self._pois_mask[index(pois_pos)] = True
        self._all_poisson = bool(pois_pos) and not gauss_pos

    def _set_poi(self, name: str) -> None:
        if name not in self.par_slices:
            listed = ", ".join(self.par_order[:20]) + (", ..." if self.npars > 20 else "")
            raise ConfigError(
                f"{self.source}: POI '{name}' is not a parameter of the model (parameters: "
                f"{listed})"
            )
        sl = self.par_slices[name]
        if sl.stop - sl.start != 1:
            raise ConfigError(
                f"{self.source}: POI '{name}' has {sl.stop - sl.start} components; the POI "
                "must be a single parameter"
            )
        self.poi_name, self.poi_index = name, sl.start

    # ------------------------------------------------------------------ suggestions
    def suggested_init(self) -> torch.Tensor:
        """Initial values, shape ``(P,)`` (pyhf ``suggested_init``), detached."""
        return torch.cat([ps.inits for ps in self._param_sets]).detach().clone()

    def suggested_bounds(self) -> torch.Tensor:
        """Bounds ``[low, high]`` per parameter, shape ``(P, 2)``, detached."""
        return torch.cat([ps.bounds for ps in self._param_sets]).detach().clone()

    def suggested_fixed(self) -> torch.Tensor:
        """Whether each parameter is fixed (measurement ``fixed``, masked gammas), ``(P,)``."""
        fixed = [f for ps in self._param_sets for f in ps.fixed]
        return torch.tensor(fixed, dtype=torch.bool, device=self.device)

    def prefit_uncertainties(self) -> torch.Tensor:
        """Constraint width per parameter, ``(P,)``: Gaussian sigma, ``1/sqrt(tau)`` for
        Poisson constraints, 0 for unconstrained and fixed parameters (cabinetry's
        ``prefit_uncertainties``)."""
        parts = []
        for ps in self._param_sets:
            if ps.constraint == "normal":
                width = cast(torch.Tensor, ps.sigmas)
            elif ps.constraint == "poisson":
                width = torch.sqrt(1.0 / cast(torch.Tensor, ps.factors))
            else:
                width = torch.zeros(ps.n, dtype=self.dtype, device=self.device)
            fixed = torch.tensor(ps.fixed, dtype=torch.bool, device=self.device)
            parts.append(torch.where(fixed, torch.zeros_like(width), width))
        return torch.cat(parts).detach().clone()

    def unconstrained_free_count(self) -> int:
        """Number of unconstrained parameters that are not fixed (for goodness of fit)."""
        return sum(sum(not f for f in ps.fixed) for ps in self._param_sets if ps.constraint is None)

    @property
    def nominal_batch(self) -> int:
        """1, or B for a model batched over nominal yields (:meth:`with_sample_yields`), whose
        parameters must then have shape exactly ``(B, P)``."""
        return int(self._nominal_column.shape[1])

    def kinked_parameters(self) -> torch.Tensor:
        """``(P,)`` bool: parameters of piecewise interpolations (histosys code0, normsys code1).

        Their likelihood has a kink at 0, where a fit started at 0 can stop in the local
        minimum on the wrong side; fits that must find the global minimum start from both sides
        (see :mod:`analysis.inference`).
        """
        mask = torch.zeros(self.npars, dtype=torch.bool, device=self.device)
        for name in self._kinked_sets:
            mask[self.par_slices[name]] = True
        return mask & ~self.suggested_fixed()

    def sample(
        self, pars: Any, n: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` pseudo-datasets (toys) drawn at ``pars``: shape ``(n, ..., nmain + naux)``.

        Main bins are Poisson(lambda(pars)); auxiliary data are Gaussian around the expected
        auxiliary value with the constraint's sigma, or Poisson(tau * gamma) for Poisson
        constraints (shapesys), as pyhf's ``model.make_pdf(pars).sample``.
        """
        pars = self._pars(pars)
        main = self.expected_actualdata(pars).detach()
        aux = self.expected_auxdata(pars).detach()
        shape = (n, *main.shape[:-1])
        toys_main = torch.poisson(main.expand(*shape, main.shape[-1]), generator=generator)
        noise = torch.randn(
            *shape, aux.shape[-1], dtype=self.dtype, device=self.device, generator=generator
        )
        sigma = torch.where(self._inv_sigma > 0, 1.0 / self._inv_sigma, 0.0)
        toys_aux = aux + sigma * noise
        if self._has_poisson:
            counts = torch.poisson(aux.clamp(min=0).expand_as(toys_aux), generator=generator)
            toys_aux = torch.where(self._pois_mask, counts, toys_aux)
        return torch.cat([toys_main, toys_aux], dim=-1)

    def with_sample_yields(self, sample: str, yields: Any) -> Model:
        r"""A shallow copy whose nominal yields of ``sample`` are a batch: one model per row.

        ``yields`` has shape ``(B, n)``, ``n`` the number of bins of ``sample`` over all the
        channels it appears in, in the model's channel order (:attr:`channels`, pyhf's sorted
        names; the sample's bins of the first channel come first). Batch element ``b`` of the
        copy is the model built from a spec whose ``sample`` data is ``yields[b]``, with these
        conventions for the modifiers that pyhf derives from the nominal at build time:

        * multiplicative modifiers (normfactor, lumi, normsys, staterror, shapesys,
          shapefactor) multiply the new yields as they did the old ones;
        * histosys acts through its deltas :math:`\Delta^\pm`, which are kept: element ``b``
          is the spec with ``hi_data = yields[b] + (hi_data - nominal)`` and
          ``lo_data = yields[b] - (nominal - lo_data)``; the templates are *not* rescaled;
        * the constraint widths that pyhf computes from the nominals (staterror's relative
          :math:`\sqrt{\sum\sigma^2}/\sum\nu` per bin, shapesys'
          :math:`\tau = (\nu/\sigma)^2`) are kept from this model, so a sample that carries
          (or shares) a staterror or shapesys gives a model that differs from the rebuilt spec
          in those constraint terms.

        Evaluation: ``pars`` must have shape ``(B, P)`` (the batch flattened to exactly
        ``B``: element ``b`` is evaluated with row ``b`` of ``yields``) and ``data`` ``(N + A,)``
        or ``(B, N + A)``; :meth:`logpdf`, :meth:`twice_nll` and :meth:`expected_data` return
        ``(B, ...)``. Inference functions take the batch from the data, so pass the observed
        data as ``data.expand(B, -1)`` (a view). Fits with several starts per element (kinked
        interpolation codes, :meth:`kinked_parameters`) add a leading dimension and are not
        supported: use the smooth codes (code4/code4p, the defaults).

        Gradients flow from every output to ``yields`` (and to whatever this model was built
        from). Nothing is copied but the nominal column, ``(n_cells, B)``. Calling this again on
        the copy with the same ``B`` batches a second sample.
        """
        if sample not in self.samples:
            raise ConfigError(
                f"{self.source}: sample '{sample}' is not in the model (samples: "
                f"{', '.join(self.samples)})"
            )
        cells = torch.nonzero(self._cell_sample == self.samples.index(sample)).squeeze(-1)
        yields = as_tensor(yields, dtype=self.dtype, device=self.device)
        if yields.ndim != 2 or yields.shape[1] != cells.numel():
            raise ValueError(
                f"yields has shape {tuple(yields.shape)} but (B, {cells.numel()}) was expected "
                f"(the {cells.numel()} bins of sample '{sample}' over its channels)"
            )
        if self._nominal_column.shape[1] not in (1, yields.shape[0]):
            raise ValueError(
                f"yields has {yields.shape[0]} rows but this model is already batched over "
                f"{self._nominal_column.shape[1]} yields"
            )
        batched = copy.copy(self)
        batched.numpy_fits = None  # other numbers
        nominal = self._nominal_column.expand(-1, yields.shape[0])
        batched._nominal_column = nominal.index_put((cells,), yields.T)
        return batched

    # ------------------------------------------------------------------ evaluation
    def _pars(self, pars: Any) -> torch.Tensor:
        pars = as_tensor(pars, dtype=self.dtype, device=self.device)
        if pars.ndim == 0 or pars.shape[-1] != self.npars:
            got = pars.shape[-1] if pars.ndim else "a scalar"
            raise ValueError(
                f"pars has {got} entries in its last dimension but {self.npars} were expected"
            )
        return pars

    def _data(self, data: Any) -> torch.Tensor:
        data = as_tensor(data, dtype=self.dtype, device=self.device)
        expected = self.nmain + self.naux
        if data.ndim == 0 or data.shape[-1] != expected:
            got = data.shape[-1] if data.ndim else "a scalar"
            raise DataError(
                f"data has {got} entries in its last dimension but {expected} were expected "
                f"({self.nmain} main bins + {self.naux} auxiliary)"
            )
        return data

    def _columns(self, pars: torch.Tensor) -> torch.Tensor:
        """``(..., P)`` -> contiguous ``(P, batch)`` (the internal column layout)."""
        return pars.reshape(-1, self.npars).T.contiguous()

    def _rows(self, columns: torch.Tensor, batch: torch.Size) -> torch.Tensor:
        """``(F, batch)`` -> ``(..., F)`` with the original batch shape."""
        return columns.T.reshape(batch + columns.shape[:1])

    def _cell_rates(self, x: torch.Tensor) -> torch.Tensor:
        """Expected yield per cell, ``(n_cells, batch)``, for columns ``x``."""
        rates = self._nominal_column
        for mod in self._additive:
            rates = rates + mod.apply(x)
        if self._cell_slots.numel():
            rows = [x]
            if self._block_slots.numel():
                values = with_ones([x] + [mod.values(x) for mod in self._unit_factors])
                rows.append(gather_product(values, self._block_slots))
            rates = rates * gather_product(with_ones(rows), self._cell_slots)
        return rates.expand(-1, x.shape[1])

    def _lambda(self, x: torch.Tensor) -> torch.Tensor:
        rates = self._cell_rates(x)
        out = rates.new_zeros((self.nmain, rates.shape[1]))
        return out.index_add(0, self._cell_bin, rates)

    def expected_actualdata(self, pars: Any) -> torch.Tensor:
        """Expected main-bin yields :math:`\\lambda(\\theta)`, ``(..., nmain)``."""
        pars = self._pars(pars)
        return self._rows(self._lambda(self._columns(pars)), pars.shape[:-1])

    def expected_by_sample(self, pars: Any) -> torch.Tensor:
        """Expected yields per sample, ``(..., len(samples), nmain)`` (0 where a sample is
        absent from a channel); summing over samples gives :meth:`expected_actualdata`."""
        pars = self._pars(pars)
        rates = self._cell_rates(self._columns(pars))
        flat = self._cell_sample * self.nmain + self._cell_bin
        out = rates.new_zeros((len(self.samples) * self.nmain, rates.shape[1]))
        out = self._rows(out.index_add(0, flat, rates), pars.shape[:-1])
        return out.unflatten(-1, (len(self.samples), self.nmain))

    def _expected_aux(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self._aux_par) * self._aux_scale

    def expected_auxdata(self, pars: Any) -> torch.Tensor:
        """Expected auxiliary data, ``(..., naux)``: :math:`\\theta` for Gaussian
        constraints, :math:`\\theta\\tau` for Poisson ones."""
        pars = self._pars(pars)
        return self._rows(self._expected_aux(self._columns(pars)), pars.shape[:-1])

    def expected_data(self, pars: Any, include_auxdata: bool = True) -> torch.Tensor:
        """Main expected yields followed (by default) by the expected auxiliary data."""
        pars = self._pars(pars)
        x = self._columns(pars)
        columns = self._lambda(x)
        if include_auxdata:
            columns = torch.cat([columns, self._expected_aux(x)])
        return self._rows(columns, pars.shape[:-1])

    def main_logpdf(self, pars: Any, maindata: Any) -> torch.Tensor:
        """:math:`\\sum_b \\log\\mathrm{Pois}(n_b \\mid \\lambda_b)`; ``maindata``
        ``(..., nmain)``."""
        lam = self.expected_actualdata(pars)
        n = as_tensor(maindata, dtype=self.dtype, device=self.device)
        return poisson_logpdf(n, lam).sum(-1)

    def constraint_logpdf(self, pars: Any, auxdata: Any) -> torch.Tensor:
        """Sum of the constraint log-densities; ``auxdata`` ``(..., naux)``."""
        pars = self._pars(pars)
        aux = as_tensor(auxdata, dtype=self.dtype, device=self.device)
        expected = self._rows(self._expected_aux(self._columns(pars)), pars.shape[:-1])
        return self._constraint(expected, aux)

    def _constraint(self, expected: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """Constraint log-density for expected aux data ``(..., A)`` and aux data ``(..., A)``:
        the sum of :meth:`_constraint_terms` and the Gaussian normalisation."""
        if not self.naux:  # no constrained parameters
            batch = broadcast_shapes(expected.shape[:-1], aux.shape[:-1])
            return expected.new_zeros(batch)
        return self._constraint_terms(expected, aux).sum(-1) + self._gauss_log_norm

    def _constraint_terms(self, expected: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        r"""Log-density of each constraint term, ``(..., A)``, without the Gaussian constants.

        Gaussian entries: :math:`-\tfrac12 ((a - \theta)/\sigma)^2` (pyhf's ``normal_logpdf``;
        the constants :math:`-\log(\sigma\sqrt{2\pi})` are summed at build time and
        :math:`1/\sigma = 0` on Poisson entries). Poisson entries: :func:`poisson_logpdf`.
        """
        terms = expected.new_zeros(broadcast_shapes(expected.shape, aux.shape))
        if self._has_gauss:
            z = (aux - expected) * self._inv_sigma
            terms = (z * z) * -0.5
        if self._has_poisson:
            if self._all_poisson:
                terms = poisson_logpdf(aux, expected)
            else:  # evaluate on safe values off the Poisson entries (no NaN in gradients)
                mask = self._pois_mask
                n = torch.where(mask, aux, 1.0)
                lam = torch.where(mask, expected, 1.0)
                terms = torch.where(mask, poisson_logpdf(n, lam), terms)
        return terms

    def logpdf(self, pars: Any, data: Any) -> torch.Tensor:
        """Full log-likelihood (pyhf's ``model.logpdf``), shape: broadcast of the batch dims."""
        pars, data = self._pars(pars), self._data(data)
        expected = self._rows(self._expected_columns(pars), pars.shape[:-1])
        main = poisson_logpdf(data[..., : self.nmain], expected[..., : self.nmain]).sum(-1)
        return main + self._constraint(expected[..., self.nmain :], data[..., self.nmain :])

    def _expected_columns(self, pars: torch.Tensor) -> torch.Tensor:
        """Expected main and auxiliary data in column layout, ``(nmain + naux, batch)``."""
        x = self._columns(pars)
        return torch.cat([self._lambda(x), self._expected_aux(x)])

    def twice_nll(self, pars: Any, data: Any) -> torch.Tensor:
        """:math:`-2\\log L`, shape as :meth:`logpdf`."""
        return -2.0 * self.logpdf(pars, data)

    def __repr__(self) -> str:
        return (
            f"Model({self.source!r}: {len(self.channels)} channels, {self.nmain} bins, "
            f"{self.npars} parameters, poi={self.poi_name!r}, dtype={self.dtype}, "
            f"device={self.device})"
        )


class TwiceNLL:
    """:math:`-2\\log L` of ``model`` for fixed ``data``: a batched objective of the parameters
    (``pars`` ``(..., P)`` -> ``(...)``), what :mod:`analysis.fit` minimises."""

    def __init__(self, model: Model, data: Any) -> None:
        self.model, self.data = model, data

    def __call__(self, pars: torch.Tensor) -> torch.Tensor:
        return self.model.twice_nll(pars, self.data)

    @property
    def value_grad_hessian(
        self,
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """``pars -> (value, gradient, Hessian)``, exact and detached, from the model's
        structure (:mod:`analysis.likelihood.derivatives`); ``None`` for a duck-typed model that
        only has ``twice_nll`` (then :func:`analysis.fit.value_grad_hessian` uses autograd)."""
        if not isinstance(self.model, Model):
            return None
        from analysis.likelihood.derivatives import twice_nll_derivatives

        model, data = self.model, self.data
        return lambda pars: twice_nll_derivatives(model, pars, data)


def _check_settings(settings: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{source}: modifier_settings must be a mapping, got {settings!r}")
    out: dict[str, dict[str, Any]] = {}
    for type_name, options in settings.items():
        cls = modifier_registry.get(type_name, f"{source}: modifier_settings")
        if not isinstance(options, Mapping):
            raise ConfigError(f"{source}: modifier_settings['{type_name}'] must be a mapping")
        unknown = set(options) - ({"interpcode"} if cls.interpcodes else set())
        if unknown:
            raise ConfigError(
                f"{source}: modifier_settings['{type_name}'] has unknown option(s) "
                f"{', '.join(sorted(unknown))}"
            )
        if "interpcode" in options and options["interpcode"] not in cls.interpcodes:
            raise ConfigError(
                f"{source}: interpolation code '{options['interpcode']}' is not available for "
                f"{type_name}; valid: {', '.join(cls.interpcodes)}"
            )
        out[type_name] = dict(options)
    return out


def _spec_key(spec: Mapping[str, Any]) -> tuple:
    """What fixes a model's structure besides the bin counts: the channels, their samples and
    the samples' modifiers (names and types), in spec order. :meth:`Model.with_spec_values`
    compares it; the bin counts are checked where the numbers are read."""
    return tuple(
        (
            channel["name"],
            tuple(
                (
                    sample["name"],
                    tuple((mod["name"], mod.get("type")) for mod in sample["modifiers"]),
                )
                for sample in channel["samples"]
            ),
        )
        for channel in spec["channels"]
    )
